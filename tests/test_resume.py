"""Runs that survive: signals and kill -9 mid-run, resumed to the results of a run never stopped;
best.pt and trainer.select; one run per directory; SLURM requeue."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli, run_command, session_status, stop_after_a_save
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.api_pb2 import Status

from jacdistill_cli.analysis.report import UNFINISHED, build_report
from jacdistill_cli.records import directory, resume

# 10 epochs of 17 steps (about 1 s of steps after the first save, here); last.pt after every step, so a
# stop anywhere has something to resume.
ARGS = ["trainer.epochs=10", "teacher.epochs=2", "trainer.threads=1", "trainer.save_every_steps=1"]
WALL_CLOCK = {"train_seconds", "samples_per_second"}
NOT_RESULTS = WALL_CLOCK | {"teacher_source"}   # whether this process trained the teacher or found it cached
SCRIPT = Path(sys.executable).with_name("jacdistill")


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)   # trainer.threads=1 sets it for the process


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_cache, one_thread) -> Path:
    """The run never interrupted (in this process: one thread, as the console runs below)."""
    os.environ["JACDISTILL_CACHE"] = str(teacher_cache)
    run_dir = tmp_path_factory.mktemp("reference")
    run_command("train", ARGS, run_dir)
    return run_dir


def results(run_dir: Path) -> dict:
    return {k: v for k, v in json.loads((run_dir / "metrics.json").read_text()).items() if k not in NOT_RESULTS}


def same_student(a: Path, b: Path) -> bool:
    first, second = (torch.load(d / "student.pt", weights_only=True) for d in (a, b))
    return (first["state_dict"].keys() == second["state_dict"].keys()
            and all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])
            and {k: v for k, v in first["metrics"].items() if k not in WALL_CLOCK}
            == {k: v for k, v in second["metrics"].items() if k not in WALL_CLOCK})


def start(command: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JACDISTILL_CACHE": str(cache)}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def directory_of(process: subprocess.Popen) -> Path:
    """A run's directory, from the line of its log that names it (the first)."""
    line = process.stdout.readline()
    while "run directory: " not in line:
        assert line, process.communicate()
        line = process.stdout.readline()
    return Path(line.split("run directory: ", 1)[1].strip())


def interrupted(code: int, stderr: str, signum: int, run_dir: Path) -> list[str]:
    """Checks what a signal left; returns the printed command that resumes."""
    assert code == 128 + signum, stderr   # 130 for SIGINT, 143 for SIGTERM
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"jacdistill train: interrupted by {signal.Signals(signum).name} at epoch ")
    printed = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert printed == ["jacdistill", "train", *ARGS, f"hydra.run.dir={run_dir}"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["step"] >= 1
    assert loss_steps(run_dir) == list(range(1, metrics["step"] + 1))   # readable, each step once
    assert session_status(run_dir) == Status.Value("STATUS_FAILURE")
    return [str(SCRIPT), *printed[1:]]


def finished_as(run_dir: Path, reference: Path) -> None:
    assert not list(run_dir.glob(".*.tmp"))
    assert results(run_dir) == results(reference) and results(run_dir)["status"] == "finished"
    assert same_student(run_dir, reference)
    assert loss_steps(run_dir) == list(range(1, results(reference)["steps"] + 1))
    assert session_status(run_dir) == Status.Value("STATUS_SUCCESS")


def loss_steps(run_dir: Path) -> list[int]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars("loss/total")]


@pytest.mark.slow
def test_sigint_sigterm_and_kill9_then_resume_end_as_the_uninterrupted_run(reference, tmp_path, teacher_cache):
    """Two runs start together in default directories (two at a time: 2 cores); one is stopped by
    SIGINT, the other by SIGTERM; each printed command continues its run: one to the end, the
    other until kill -9, then once more to the end. Both end as the run never interrupted."""
    first, second = (start([str(SCRIPT), "train", *ARGS], tmp_path, teacher_cache) for _ in range(2))
    first_dir, second_dir = directory_of(first), directory_of(second)
    assert first_dir != second_dir and first_dir.parent.parent == tmp_path / "outputs" / "train"
    for run_dir in (first_dir, second_dir):   # outputs/train/DATE/TIME-<six hex digits>
        time_part, suffix = run_dir.name.rsplit("-", 1)
        assert len(time_part) == len("12-00-00") and len(suffix) == 6 and int(suffix, 16) >= 0
    sigint, sigterm = stop_after_a_save([(first, first_dir, signal.SIGINT), (second, second_dir, signal.SIGTERM)],
                                        new=True)
    first_command = interrupted(*sigint, signal.SIGINT, first_dir)
    second_command = interrupted(*sigterm, signal.SIGTERM, second_dir)
    report = build_report(tmp_path / "outputs")   # both unfinished, with the command that resumes
    assert sorted(r.detail.split(" at epoch")[0] for r in report.runs if r.status == UNFINISHED) == [
        "interrupted by SIGINT", "interrupted by SIGTERM"]

    first, second = (start(command, tmp_path, teacher_cache) for command in (first_command, second_command))
    [(code, stderr)] = stop_after_a_save([(first, first_dir, signal.SIGKILL)])
    assert code == -signal.SIGKILL, stderr
    first = start(first_command, tmp_path, teacher_cache)   # the same command again, after kill -9
    for run in (first, second):
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
    finished_as(first_dir, reference)
    finished_as(second_dir, reference)

    # Another configuration in that directory: refused before Hydra's or the run's files are touched.
    before = {p: p.read_bytes() for p in first_dir.rglob("*") if p.is_file() and p.name != directory.LOCK}
    refused = run_cli("train", *ARGS, "alpha=0.3", f"hydra.run.dir={first_dir}", cwd=tmp_path,
                      env={"JACDISTILL_CACHE": str(teacher_cache)})
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        f"jacdistill train: error: hydra.run.dir='{first_dir}' is not allowed: it holds the results of another "
        "configuration (alpha: 0.5 there, 0.3 here); give this run a directory of its own"]
    assert {p: p.read_bytes() for p in first_dir.rglob("*") if p.is_file() and p.name != directory.LOCK} == before


def test_a_finished_run_is_kept_and_another_config_is_refused(reference, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir() if p.name != directory.LOCK}
    assert run_command("train", ARGS, reference) == results(reference)["val_accuracy"]   # finished: nothing to do
    with pytest.raises(SystemExit) as stop:
        run_command("train", [*ARGS, "alpha=0.3"], reference)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"jacdistill train: error: hydra.run.dir='{reference}' is not allowed: it holds the results of another "
        "configuration (alpha: 0.5 there, 0.3 here); give this run a directory of its own"]
    with directory.DirectoryLock(directory.RunPlace(reference)), pytest.raises(SystemExit):   # a live run holds it
        run_command("train", ARGS, reference)
    assert f"another jacdistill run (process {os.getpid()}) is running in it" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir() if p.name != directory.LOCK} == before


def test_select_best_tests_the_best_validation_weights(tmp_path, one_thread):
    run_dir = tmp_path / "run"
    run_command("train", ["trainer.epochs=3", "teacher.epochs=2", "trainer.threads=1", "trainer.select=best",
                          "optim.lr=0.3"], run_dir)   # a large step: validation accuracy need not rise every epoch
    metrics = json.loads((run_dir / "metrics.json").read_text())
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    val = [(e.value, e.step) for e in events.Scalars("val/accuracy")]
    best_value, best_step = max(val, key=lambda v: (v[0], -v[1]))   # the first of equal ones
    assert metrics["selected"] == "best" and metrics["best_step"] == best_step
    assert metrics["val_accuracy"] == pytest.approx(best_value) == metrics["best_val_accuracy"]
    student, best = (torch.load(run_dir / name, weights_only=True) for name in ("student.pt", "best.pt"))
    assert all(torch.equal(student["state_dict"][k], v) for k, v in best["state_dict"].items())


@pytest.mark.slow
def test_sigusr1_requeues_under_slurm(tmp_path, monkeypatch):
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"   # SLURM is not on this machine: a stand-in that records its call
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert resume.requeue_under_slurm() is None and log.read_text() == "requeue 4242\n"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert resume.requeue_under_slurm() == (
        "SLURM_JOB_ID=4242 is set but scontrol is not on PATH: the job is not requeued")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert resume.requeue_under_slurm() is None




def test_a_last_pt_written_before_the_run_spec_continues_to_the_uninterrupted_runs_results(tmp_path, caplog):
    """tests/data/v2_run: a run of the code before the Trainer kept its callbacks' state (last.pt version 2),
    stopped by SIGINT at epoch 2, step 22 (metrics.json says interrupted); the same command continues it from its
    last.pt to the results that code's uninterrupted run gave (tests/data/v2_run_uninterrupted.json)."""
    import shutil

    caplog.set_level("INFO", logger="jacdistill")
    data = Path(__file__).parent / "data"
    run_dir = tmp_path / "run"
    shutil.copytree(data / "v2_run", run_dir)
    assert torch.load(run_dir / "last.pt", weights_only=True)["version"] == 2
    overrides = ["trainer.epochs=3", "teacher.epochs=1", "trainer.save_every_steps=20", "trainer.threads=1",
                 f"cache_dir={tmp_path / 'cache'}"]   # cache_dir changes no result: another one is the same run
    run_command("train", overrides, run_dir)
    assert f"resuming from {run_dir / 'last.pt'}: epoch 2, 5 batches into it, step 22" in caplog.text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((data / "v2_run_uninterrupted.json").read_text())
    assert {key: metrics[key] for key in expected} == expected
