"""`jacdistill evaluate`: the numbers it reports, its table and evaluation.json, the dataset it picks,
bad input in one line; and the teacher -> train -> evaluate round trip through the console script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_command
from hydra import compose, initialize_config_module

from jacdistill_cli.loop.assessment import noise_accuracy
from jacdistill_cli.loop.trainer import evaluate
from jacdistill_cli.storage import write_torch
from jacdistill_cli.zoo.checkpoints import make_checkpoint
from jacdistill_cli.zoo.data import build_data
from jacdistill_cli.zoo.models import build_model

CPU = torch.device("cpu")
STUDENT = {"name": "mlp", "hidden": [16], "batchnorm": False}
TEACHER = {"name": "cnn", "channels": [4, 8], "hidden": 8, "batchnorm": True}


def digits(*overrides: str):
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        return build_data(compose(config_name="train", overrides=list(overrides)).dataset)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """An untrained student and teacher, both written for digits split with split_seed=3."""
    folder = tmp_path_factory.mktemp("evaluate")
    data = digits("dataset.split_seed=3")
    torch.manual_seed(0)
    for name, spec, role in (("student", STUDENT, "student"), ("teacher", TEACHER, "teacher")):
        model = build_model(spec, data.input_shape, data.num_classes)
        write_torch(folder / f"{name}.pt", make_checkpoint(model, role, spec, data, {}))
    return {"student": folder / "student.pt", "teacher": folder / "teacher.pt"}


def models_of(paths: dict[str, Path]) -> dict[str, torch.nn.Module]:
    from jacdistill_cli.zoo.checkpoints import load_checkpoint, model_from_checkpoint

    return {name: model_from_checkpoint(load_checkpoint(path, name), name).eval() for name, path in paths.items()}


def test_evaluate_reports_on_the_checkpoints_own_test_split(checkpoints, tmp_path, capsys):
    """Without dataset=..., the dataset settings stored in the checkpoint give the same test split."""
    result = run_command("evaluate", [f"checkpoint={checkpoints['student']}",
                                      f"teacher.checkpoint={checkpoints['teacher']}", "sigmas=[0,0.5]"], tmp_path)
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert written == json.loads(json.dumps(result))
    test = digits("dataset.split_seed=3").test
    models = models_of(checkpoints)
    expected = evaluate(models["student"], models["teacher"], test, 512, CPU)
    assert written["samples"] == len(test)
    assert written["accuracy"] == expected["accuracy"] and written["agreement"] == expected["agreement"]
    assert written["jacobian_cosine"] == pytest.approx(expected["jacobian_cosine"], abs=1e-9)
    assert written["teacher_accuracy"] == evaluate(models["teacher"], None, test, 512, CPU)["accuracy"]
    # no noise is no change
    assert written["noise_accuracy"]["0.0"] == written["accuracy"]
    assert written["teacher_noise_accuracy"]["0.0"] == written["teacher_accuracy"]
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if "accuracy" in line and "sigma=0.5" in line)
    assert "agreement" in header and "jacobian_cosine" in header
    assert any(line.startswith("model") and f"{written['accuracy']:.4f}" in line for line in table.splitlines())
    assert any(line.startswith("teacher") for line in table.splitlines())


def test_noise_accuracy_is_seeded_and_shared_by_both_models(checkpoints):
    models = models_of(checkpoints)
    test = digits("dataset.split_seed=3").test
    first = noise_accuracy(models, test, [0.3, 2.0], 128, CPU, seed=5)
    assert first == noise_accuracy(models, test, [0.3, 2.0], 128, CPU, seed=5)
    # the same noise for both: a model compared with itself agrees exactly
    same = noise_accuracy({"a": models["student"], "b": models["student"]}, test, [2.0], 128, CPU, seed=5)
    assert same["a"] == same["b"]


def test_evaluate_without_a_teacher_reports_accuracy_and_noise_only(checkpoints, tmp_path):
    result = run_command("evaluate", [f"checkpoint={checkpoints['teacher']}", "dataset=digits",
                                      "dataset.split_seed=3", "sigmas=[0.1]"], tmp_path)
    assert set(result["noise_accuracy"]) == {"0.1"} and result["teacher_checkpoint"] is None
    assert "agreement" not in result and "jacobian_cosine" not in result


@pytest.mark.parametrize("overrides,message", [
    ([], "checkpoint=null is not allowed: give a checkpoint written by `jacdistill train`"),
    (["sigmas=[0.1,-1]"], "sigmas=[0.1, -1] is not allowed: it must be a list of numbers >= 0"),
    (["dataset=fake"], "checkpoint does not fit this run: the checkpoint takes inputs of shape (1, 8, 8), "
                       "dataset 'fake' gives (3, 32, 32)"),
])
def test_bad_evaluate_input_is_one_line(checkpoints, tmp_path, capsys, overrides, message):
    args = overrides if not overrides else [f"checkpoint={checkpoints['student']}", *overrides]
    with pytest.raises(SystemExit) as exit_status:
        run_command("evaluate", args, tmp_path)
    assert exit_status.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jacdistill evaluate: error: {message}"] or (len(err) == 1 and message in err[0])
    assert not (tmp_path / "evaluation.json").exists()


@pytest.mark.slow
def test_teacher_then_train_then_evaluate_through_the_console_script(cli, tmp_path):
    teacher_dir, train_dir, evaluate_dir = tmp_path / "teacher", tmp_path / "train", tmp_path / "evaluate"
    teacher = cli("teacher", "teacher.epochs=2", f"hydra.run.dir={teacher_dir}")
    assert teacher.returncode == 0, teacher.stderr
    assert f"use it with: jacdistill train teacher=cnn teacher.checkpoint={teacher_dir / 'teacher.pt'}" in (
        teacher.stdout + teacher.stderr)

    train = cli("train", "trainer.epochs=1", "dataset.samples_per_class=5",
                f"teacher.checkpoint={teacher_dir / 'teacher.pt'}", f"hydra.run.dir={train_dir}")
    assert train.returncode == 0, train.stderr
    metrics = json.loads((train_dir / "metrics.json").read_text())
    assert metrics["teacher_source"] == "checkpoint"

    result = cli("evaluate", f"checkpoint={train_dir / 'student.pt'}",
                 f"teacher.checkpoint={teacher_dir / 'teacher.pt'}", f"hydra.run.dir={evaluate_dir}")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((evaluate_dir / "evaluation.json").read_text())
    # the same model on the same test split: the numbers train reported
    assert evaluation["accuracy"] == metrics["test_accuracy"]
    assert evaluation["agreement"] == metrics["agreement"]
    assert evaluation["jacobian_cosine"] == pytest.approx(metrics["jacobian_cosine"], abs=1e-6)
    teacher_metrics = json.loads((teacher_dir / "metrics.json").read_text())
    assert evaluation["teacher_accuracy"] == teacher_metrics["test_accuracy"]
    assert set(evaluation["noise_accuracy"]) == {"0.1", "0.25", "0.5", "1.0"}
    assert "sigma=0.25" in result.stdout and "jacobian_cosine" in result.stdout
