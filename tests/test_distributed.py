"""Data-parallel training on torch.distributed (gloo, 2 CPU processes) equals one process on the same
global batch, and `trainer.devices=2` runs end to end through the console script."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

import ddp_step
from jacdistill_cli.run import distributed


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


@pytest.mark.slow
def test_train_on_two_processes_writes_one_run_directory(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("train", "recipe=kd_jacobian", "trainer.devices=2", "trainer.device=cpu", "trainer.epochs=1",
                 "teacher.epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and 0 <= metrics["test_accuracy"] <= 1
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss/total")]
    assert steps == sorted(set(steps)) and len(steps) == metrics["steps"]
    # Hydra's choices reach the workers: the recipe is a hyperparameter as in one process, and the run ends
    # with the single run's summary table (printed once, by rank 0).
    start = metadata.parse_session_start_info_plugin_data(
        events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["recipe"].string_value == "kd_jacobian"
    assert result.stdout.count("test accuracy") == 1 and result.stdout.splitlines()[-1] == f"run directory: {run_dir}"
