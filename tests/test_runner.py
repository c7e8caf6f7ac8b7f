"""End to end: the installed console script trains, logs every loss term and sweeps (slow: each test starts
it); train's bad input is refused in one line (in this process, through its entry point)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import FAST, run_in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

STEP_TAGS = ("loss/distill", "loss/jacobian", "loss/total")
EPOCH_TAGS = ("val/accuracy", "val/agreement", "val/jacobian_cosine")
METRIC_KEYS = ("test_accuracy", "val_accuracy", "teacher_test_accuracy", "agreement", "jacobian_cosine",
               "train_seconds", "samples_per_second", "epochs", "steps")


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar series in the event files directly inside run_dir."""
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events, f"no event file directly in {run_dir}"
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.slow
def test_train_logs_every_term_and_writes_its_run_directory(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("train", "hard_weight=0.5", "trainer.epochs=2", "teacher.epochs=2", "trainer.log_every_steps=1",
                 f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"run directory: {run_dir}" in result.stdout + result.stderr

    series = scalars(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = metrics["steps"]
    for tag in (*STEP_TAGS, "loss/hard"):
        assert len(series[tag]) == steps, tag
        assert all(math.isfinite(v) for v in series[tag]), tag
    for tag in EPOCH_TAGS:
        assert len(series[tag]) == 2, tag
        assert all(math.isfinite(v) for v in series[tag]), tag
    assert series["loss/jacobian"] != series["loss/distill"]
    # The logged total is the objective's weighted sum of its terms (alpha=0.5 by default).
    for distill, jac, hard, total in zip(series["loss/distill"], series["loss/jacobian"], series["loss/hard"],
                                         series["loss/total"]):
        assert total == pytest.approx(0.5 * distill + 0.5 * jac + 0.5 * hard, rel=1e-5)

    for key in METRIC_KEYS:
        assert key in metrics, key
    assert metrics["epochs"] == 2 and steps == 2 * math.ceil(1079 / 64)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["samples_per_second"] > 0
    assert (run_dir / "student.pt").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    # What the run was: its seed, that it finished, where and with which torch.
    import torch

    assert metrics["seed"] == 0 and metrics["status"] == "finished"
    assert metrics["device"] == "cpu" and metrics["torch"] == torch.__version__
    # A single run ends with a short table of its results on stdout, and where it is.
    table = result.stdout.strip().splitlines()[-9:]
    assert table[0].split() == ["student", "teacher"]
    assert table[1].split()[-2:] == [f"{metrics['test_accuracy']:.4f}", f"{metrics['teacher_test_accuracy']:.4f}"]
    assert table[2].endswith(f"{metrics['agreement']:.4f}") and table[3].endswith(f"{metrics['jacobian_cosine']:.4f}")
    assert table[4].endswith(f"{metrics['explanation_rank_correlation']:.4f}")
    assert table[5].endswith(f"{metrics['explanation_top10_iou']:.4f}")
    assert table[7].startswith(f"2 epochs, {steps} steps in ") and table[-1] == f"run directory: {run_dir}"


@pytest.mark.slow
def test_exact_jacobian_run_completes(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("train", "loss=kl", "jacobian=exact", "alpha=0.3", *FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    series = scalars(run_dir)
    assert all(math.isfinite(v) and v > 0 for v in series["loss/jacobian"])
    assert json.loads((run_dir / "metrics.json").read_text())["teacher_source"] in ("cache", "trained")


@pytest.mark.slow
def test_two_job_multirun_gives_two_job_directories(cli, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli("train", "-m", "alpha=0,0.3", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split(",")[0] for p in jobs] == ["alpha=0", "alpha=0.3"]
    for job in jobs:   # (the terms are read every 50 steps and at each epoch's end: 17 steps, one point)
        assert (job / "metrics.json").is_file()
        assert len(scalars(job)["loss/total"]) == math.ceil(json.loads((job / "metrics.json").read_text())["steps"] / 50)
    # alpha=0 trains on distillation alone: its total is its distillation term.
    zero = scalars(jobs[0])
    assert zero["loss/total"] == pytest.approx(zero["loss/distill"])


@pytest.mark.slow
def test_teacher_is_trained_once_then_reused_from_the_cache(cli, tmp_path):
    cache = tmp_path / "cache"
    env = {"JACDISTILL_CACHE": str(cache)}
    first = cli("train", "seed=7", *FAST, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path, env=env)
    second = cli("train", "seed=7", *FAST, f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path, env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (a["teacher_source"], b["teacher_source"]) == ("trained", "cache")
    assert len(list((cache / "teachers").glob("*.pt"))) == 1
    # Same config and seed, same numbers on the CPU.
    assert a["test_accuracy"] == b["test_accuracy"] and a["teacher_test_accuracy"] == b["teacher_test_accuracy"]
    # The cache key covers the teacher's settings: another teacher config is another file.
    third = cli("train", "seed=7", "trainer.epochs=1", "teacher.epochs=3", f"hydra.run.dir={tmp_path / 'c'}",
                cwd=tmp_path, env=env)
    assert third.returncode == 0, third.stderr
    assert len(list((cache / "teachers").glob("*.pt"))) == 2


@pytest.mark.slow
def test_teacher_command_checkpoint_is_used_by_train(cli, tmp_path):
    teacher_dir = tmp_path / "teacher"
    made = cli("teacher", "teacher.epochs=2", f"hydra.run.dir={teacher_dir}", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    checkpoint = teacher_dir / "teacher.pt"
    assert checkpoint.is_file()
    run_dir = tmp_path / "run"
    used = cli("train", "trainer.epochs=1", f"teacher.checkpoint={checkpoint}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert used.returncode == 0, used.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["teacher_source"] == "checkpoint"
    assert metrics["teacher_test_accuracy"] == pytest.approx(
        json.loads((teacher_dir / "metrics.json").read_text())["test_accuracy"])


# Bad values of train's settings, in this process through the console script's entry point (the console
# script itself is proven by test_bad_input.py's few cases through it): one line naming the key, the value
# and what is allowed, exit status 2, nothing cached, no run logged.
BAD_INPUTS = [
    ("alpha=1.5", "alpha=1.5", "[0, 1]"),
    ("alpha=-0.1", "alpha=-0.1", "[0, 1]"),
    ("temperature=0", "temperature=0", "> 0"),
    ("hard_weight=-1", "hard_weight=-1", ">= 0"),
    ("trainer.epochs=0", "trainer.epochs=0", ">= 1"),
    ("trainer.batch_size=0", "trainer.batch_size=0", ">= 1"),
    ("alpha=abc", "alpha='abc'", "[0, 1]"),
    ("trainer.device=gpu", "trainer.device='gpu'", "auto, cpu, cuda, cuda:N"),
    ("trainer.saliency=both", "trainer.saliency='both'", "abs, signed"),
    ("teacher.checkpoint=/nonexistent/teacher.pt", "teacher.checkpoint='/nonexistent/teacher.pt'", "no such file"),
]


def train_in_process(*args: str, tmp_path: Path, monkeypatch) -> tuple[int, list[str]]:
    """`jacdistill train ARGS` in this process from tmp_path, with a cache of its own: (status, stderr lines)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JACDISTILL_CACHE", str(tmp_path / "cache"))
    status, stderr = run_in_process(["train", *args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert "Traceback" not in stderr
    return status, stderr.strip().splitlines()


@pytest.mark.parametrize("override,names,allowed", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_key_the_value_and_what_is_allowed(tmp_path, monkeypatch, override, names, allowed):
    status, lines = train_in_process(override, tmp_path=tmp_path, monkeypatch=monkeypatch)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("jacdistill train: error: ") and names in lines[0] and allowed in lines[0]
    assert not (tmp_path / "cache").exists()
    assert list(tmp_path.iterdir()) == []   # a refused run leaves no directory (Hydra's is removed)


def test_cuda_without_a_gpu_is_refused(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    status, lines = train_in_process("trainer.device=cuda", tmp_path=tmp_path, monkeypatch=monkeypatch)
    assert status == 2
    assert lines == [
        "jacdistill train: error: trainer.device='cuda' is not allowed: torch sees no CUDA GPU on this machine; "
        "use trainer.device=auto or trainer.device=cpu"]


def test_a_gpu_torch_does_not_see_is_refused_in_one_line():
    """cuda:N names one of the GPUs torch sees; one past the last (cuda:0 on a machine without) is refused."""
    import torch

    from jacdistill_cli.errors import UsageError
    from jacdistill_cli.loop.device import select_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    seen = "torch sees no CUDA GPU" if count == 0 else f"torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
    with pytest.raises(UsageError, match=f"^trainer.device='cuda:{count}' is not allowed: {seen}"):
        select_device(f"cuda:{count}")
    for index in range(count):
        assert select_device(f"cuda:{index}") == torch.device("cuda", index)
    assert select_device("cpu") == torch.device("cpu")


def test_unknown_group_option_lists_the_available_ones(tmp_path, monkeypatch):
    status, lines = train_in_process("jacobian=bogus", tmp_path=tmp_path, monkeypatch=monkeypatch)
    assert status != 0
    stderr = "\n".join(lines)
    assert "Could not find 'jacobian/bogus'" in stderr
    for option in ("exact", "none", "top1"):
        assert option in stderr
    assert not (tmp_path / "run").exists()
