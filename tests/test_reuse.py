"""teacher.reuse_outputs: the teacher's outputs computed once per training sample give the same run as
recomputing them every step, and are refused in one line where they cannot stand in for the teacher."""

from __future__ import annotations

import json

import pytest
from helpers import run_command

FAST = ["trainer.epochs=3", "teacher.epochs=2", "trainer.threads=1"]


def metrics(run_dir) -> dict:
    values = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in values.items() if isinstance(v, float) and k not in ("train_seconds", "samples_per_second")}


@pytest.mark.parametrize("method", ["top1", "target", "none"])
def test_reused_teacher_outputs_give_the_run_of_recomputed_ones(method, tmp_path, caplog):
    overrides = [*FAST, f"jacobian={method}", "dataset.samples_per_class=10", "hard_weight=0.5"]
    caplog.set_level("INFO", logger="jacdistill")
    run_command("train", [*overrides, "teacher.reuse_outputs=true"], tmp_path / "reused")
    assert "teacher outputs computed once for the 100 training samples" in caplog.text
    caplog.clear()
    run_command("train", [*overrides, "teacher.reuse_outputs=false"], tmp_path / "recomputed")
    assert "teacher outputs computed once" not in caplog.text
    reused, recomputed = metrics(tmp_path / "reused"), metrics(tmp_path / "recomputed")
    assert reused.keys() == recomputed.keys() and "jacobian_cosine" in reused
    for key in reused:
        assert reused[key] == pytest.approx(recomputed[key], abs=1e-6), key


@pytest.mark.parametrize("overrides,reason", [
    (["jacobian=projected"], "the teacher's side of jacobian=projected with features=none is not a function of the "
                             "sample alone"),
    (["jacobian=noise"], "the teacher's side of jacobian=noise"),
    (["dataset.augment=true"], "the training split is augmented"),
    (["student=cnn", "features=attention"], "with features=attention"),
])
def test_reuse_where_the_teacher_cannot_be_reused_is_one_line(overrides, reason, tmp_path, caplog, capsys):
    with pytest.raises(SystemExit) as stop:
        run_command("train", [*FAST, *overrides, "teacher.reuse_outputs=true"], tmp_path / "run")
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("jacdistill train: error: teacher.reuse_outputs=true is not allowed: ") and reason in lines[0]
    caplog.set_level("INFO", logger="jacdistill")
    run_command("train", [*FAST, "trainer.epochs=1", *overrides], tmp_path / "auto")   # auto: recomputes
    assert "teacher outputs computed once" not in caplog.text


def test_reuse_outputs_takes_auto_true_or_false(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_command("train", [*FAST, "teacher.reuse_outputs=always"], tmp_path / "run")
    assert stop.value.code == 2 and not (tmp_path / "run" / "metrics.json").exists()
    assert capsys.readouterr().err.strip() == ("jacdistill train: error: teacher.reuse_outputs='always' is not "
                                               "allowed: it must be auto, true or false")


def test_a_loss_that_reads_no_teacher_output_skips_the_teachers_pass(tmp_path, caplog):
    """Cross-entropy alone (loss=none, jacobian=none, as the ce_only recipe): no step runs the teacher, so
    there is nothing to keep; any term that reads the teacher brings its pass back."""
    import functools

    import torch
    import torch.nn.functional as F
    from torch import nn

    from jacdistill_cli.engine import losses
    from jacdistill_cli.engine.methods import NoJacobian, Top1
    from jacdistill_cli.engine.objective import distillation_objective

    torch.manual_seed(0)
    teacher, student = (nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
                        for _ in range(2))
    passes = []
    teacher.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    inputs, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    none, kl = functools.partial(losses.no_distillation, temperature=4.0), functools.partial(losses.kl, temperature=4.0)
    ce_only = distillation_objective(none, alpha=0.0, hard_weight=1.0, method=NoJacobian())
    logits, terms = ce_only(student, teacher, inputs, labels)
    assert passes == [] and not ce_only.reads_teacher
    assert terms["distill"] == 0 and terms["jacobian"] == 0
    torch.testing.assert_close(terms["total"], F.cross_entropy(student(inputs), labels))
    terms["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for objective in (distillation_objective(kl, alpha=0.0, hard_weight=1.0, method=NoJacobian()),
                      distillation_objective(none, alpha=0.5, hard_weight=1.0, method=Top1())):
        passes.clear()
        objective(student, teacher, inputs, labels)
        assert objective.reads_teacher and passes and passes[0] == 8

    caplog.set_level("INFO", logger="jacdistill")
    run_command("train", [*FAST, "recipe=ce_only", "teacher.reuse_outputs=true"], tmp_path / "ce_only")
    assert "teacher outputs computed once" not in caplog.text
    assert json.loads((tmp_path / "ce_only" / "metrics.json").read_text())["status"] == "finished"
