"""teacher.reuse_outputs: the teacher's outputs computed once per training sample give the same run as
recomputing them every step, and are refused in one line where they cannot stand in for the teacher."""

from __future__ import annotations

import json

import pytest

from run_inprocess import run_command

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
