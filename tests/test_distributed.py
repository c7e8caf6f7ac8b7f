"""Data-parallel training on torch.distributed (gloo, 2 CPU processes) equals one process on the same
global batch, and `trainer.devices=2` runs end to end through the console script, stopped by signals and
resumed."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import ddp_step
import pytest
import torch
from helpers import run_cli, stop_after_a_save
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from jacdistill_cli.loop import distributed


@pytest.mark.slow
def test_one_step_on_two_ranks_equals_one_process_on_the_global_batch():
    """For top1, target, projected, exact, noise and features=hint: the parameters after one step of
    `fit` with the student in DistributedDataParallel on 2 gloo ranks (each its half of the global
    batch, BatchNorm per rank) equal one process stepping on the mean of the halves' objectives."""
    cases = list(ddp_step.CASES)
    ranked = distributed.launch(ddp_step.rank_step, (cases,), processes=2)
    for case in cases:
        reference = ddp_step.reference_step(case)
        assert len(ranked[case]) == len(reference)
        for ours, expected in zip(ranked[case], reference):
            torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6, msg=case)
    # The step moved the parameters (the comparison is not of untouched initial values).
    initial = [p.detach() for p in ddp_step.models()[0].parameters()]
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(ranked["top1"], initial))


# 10 epochs of 17 steps: a signal sent just after a save lands well before the end (68 steps took 0.4 s).
ARGS = ["recipe=kd_jacobian", "trainer.devices=2", "trainer.device=cpu", "trainer.epochs=10", "teacher.epochs=2"]
NOT_RESULTS = {"train_seconds", "samples_per_second", "teacher_source"}


@pytest.mark.slow
def test_the_process_group_is_left_when_its_block_raises():
    """distributed.joined leaves the group when its block raises (train() returns through it too): a rank
    that exits with a gloo group in place can abort ("terminate called without an active exception")."""
    assert distributed.launch(ddp_step.group_states, (), processes=2) == [True, False]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, teacher_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """`jacdistill train trainer.devices=2` never interrupted: its directory and its output."""
    cwd = tmp_path_factory.mktemp("two_processes")
    run_dir = cwd / "run"
    return run_dir, run_cli("train", *ARGS, f"hydra.run.dir={run_dir}", cwd=cwd,
                            env={"JACDISTILL_CACHE": str(teacher_cache)})   # set before the autouse fixture


@pytest.mark.slow
def test_train_on_two_processes_writes_one_run_directory(two_process_run):
    run_dir, result = two_process_run
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and 0 <= metrics["test_accuracy"] <= 1
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss/total")]   # read every 50 steps and at each epoch's end (17 steps)
    per_epoch = metrics["steps"] // metrics["epochs"]
    assert steps == [s for s in range(1, metrics["steps"] + 1) if s % 50 == 0 or s % per_epoch == 0]
    # Hydra's choices reach the workers: the recipe is a hyperparameter as in one process, and the run ends
    # with the single run's summary table (printed once, by rank 0).
    start = metadata.parse_session_start_info_plugin_data(
        events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["recipe"].string_value == "kd_jacobian"
    assert result.stdout.count("test accuracy") == 1 and result.stdout.splitlines()[-1] == f"run directory: {run_dir}"


@pytest.mark.slow
def test_a_signal_to_the_launching_process_stops_both_workers_and_the_run_resumes(two_process_run, tmp_path):
    """SIGUSR1 (passed on to the workers by the launching process) and then SIGTERM (by torch's agent):
    each time one line says how to resume, with the signal's exit status; the run resumed to its end
    equals the run never interrupted, bit for bit."""
    reference, _ = two_process_run
    run_dir = tmp_path / "run"
    command = [str(Path(sys.executable).with_name("jacdistill")), "train", *ARGS, "trainer.save_every_steps=1",
               f"hydra.run.dir={run_dir}"]
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        [(code, stderr)] = stop_after_a_save([(process, run_dir, signum)])   # training, past a save
        assert code == 128 + signum, stderr
        said = [line for line in stderr.splitlines() if not line.startswith("[")]   # not the workers' log lines
        assert len(said) == 1 and said[0].startswith(
            f"jacdistill train: interrupted by {signal.Signals(signum).name} at epoch "), stderr
        assert shlex.split(said[0].split("resume with: ", 1)[1])[1:] == command[1:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "interrupted" and metrics["signal"] == signal.Signals(signum).name
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

    def results(directory: Path) -> dict:
        metrics = json.loads((directory / "metrics.json").read_text())
        return {k: v for k, v in metrics.items() if k not in NOT_RESULTS}

    assert results(run_dir) == results(reference) and results(run_dir)["status"] == "finished"
    ours, theirs = (torch.load(d / "student.pt", weights_only=True)["state_dict"] for d in (run_dir, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_a_finished_run_started_again_under_torchrun_ends_on_every_rank(two_process_run):
    """torchrun (the ranks from the environment) on the directory of a finished run of the same config:
    rank 0 finds it finished and every rank returns, none waits for the others (it used to hang)."""
    run_dir, _ = two_process_run
    before = (run_dir / "metrics.json").read_text()
    result = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2",
                             "-m", "jacdistill_cli", "train", *ARGS, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "finished in" in result.stdout + result.stderr and "nothing to do" in result.stdout + result.stderr
    assert (run_dir / "metrics.json").read_text() == before
