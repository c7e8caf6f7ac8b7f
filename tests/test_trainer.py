"""The run layer: the Trainer with its callbacks, the Distiller that owns the distillation state, and the
train command that only wires them: a diverging run ends in one line, the teacher and the student are
built once, teacher.reuse_outputs=true is refused before any teacher is trained."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from helpers import run_command, session_status
from tensorboard.plugins.hparams.api_pb2 import Status

from jacdistill_cli.loop.distiller import Distiller
from jacdistill_cli.zoo import models

FAST = ["trainer.epochs=2", "teacher.epochs=1", "trainer.threads=1"]


def test_a_diverging_run_ends_in_one_line_with_its_step_and_keeps_the_last_pt_before_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_command("train", [*FAST, "optim=sgd", "optim.lr=1e8", "trainer.save_every_steps=1"], run_dir)
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jacdistill train: error: loss/total is nan at step ")
    assert "training diverged; lower optim.lr" in lines[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and f"at step {metrics['step']} (epoch 1)" in lines[0]
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["progress"]["step"] == metrics["step"] - 1   # saved after every step, not after the diverged one
    assert all(v.isfinite().all() for v in state["model"].values() if v.is_floating_point())
    assert session_status(run_dir) == Status.Value("STATUS_FAILURE")
    assert not (run_dir / "student.pt").exists()


def counted(monkeypatch, name: str) -> list[str]:
    """Each build of the zoo's `name` architecture, by the device it was built on (meta: a check)."""
    builds: list[str] = []
    original = getattr(models, name)

    @functools.wraps(original)
    def counting(*args, **kwargs):
        builds.append(torch.empty(0).device.type)
        return original(*args, **kwargs)

    monkeypatch.setattr(models, name, counting)
    return builds


def test_the_teacher_and_the_student_are_built_once_per_run(tmp_path, monkeypatch):
    """A cache miss (the teacher trained here) and a hit (read from the cache), with feature matching (whose
    module paths are checked before the teacher is obtained): one teacher and one student for real; the early
    checks build on the meta device only."""
    teachers, students = counted(monkeypatch, "cnn"), counted(monkeypatch, "mlp")
    overrides = [*FAST, "trainer.epochs=1", "features=hint", f"cache_dir={tmp_path / 'cache'}"]
    for run in ("miss", "hit"):
        teachers.clear(), students.clear()
        run_command("train", overrides, tmp_path / run)
        assert teachers.count("cpu") == 1 and students.count("cpu") == 1, (run, teachers, students)
        assert set(teachers) | set(students) <= {"cpu", "meta"}
    assert json.loads((tmp_path / "hit" / "metrics.json").read_text())["teacher_source"] == "cache"


def test_reuse_outputs_true_with_exact_is_refused_before_any_teacher_epoch(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="jacdistill")
    with pytest.raises(SystemExit) as stop:
        run_command("train", [*FAST, "jacobian=exact", "teacher.reuse_outputs=true", "teacher.epochs=30",
                              f"cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("jacdistill train: error: teacher.reuse_outputs=true is not allowed: "
                                              "the teacher's side of jacobian=exact")
    assert "training teacher" not in caplog.text and not (tmp_path / "cache").exists()


def test_the_distiller_holds_the_student_and_the_regressors_never_the_teacher():
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    regressor = torch.nn.Linear(3, 5)
    distiller = Distiller(student, teacher, lambda *args, **kwargs: None, regressor)
    assert set(distiller.state_dict()) == {"student.weight", "student.bias", "matching.weight", "matching.bias"}
    assert [id(p) for p in distiller.parameters()] == [id(p) for p in [*student.parameters(),
                                                                        *regressor.parameters()]]
    distiller.train()
    assert student.training and not teacher.training
