"""The teacher cache under concurrency and faults, and data files that cannot run code."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Marker, run_command, write_crafted_cifar

from jacdistill_cli.errors import UsageError
from jacdistill_cli.zoo.files import read_cifar_batch

FAST = ["trainer.epochs=1", "teacher.epochs=2"]


@pytest.mark.slow
def test_three_concurrent_runs_train_the_teacher_once(cli, tmp_path):
    cache = tmp_path / "cache"
    env = {"JACDISTILL_CACHE": str(cache)}
    script = Path(sys.executable).with_name("jacdistill")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jacdistill_cli"]
    # teacher.epochs=15: long enough that the three runs overlap while the teacher trains
    runs = [subprocess.Popen([*command, "train", "trainer.epochs=1", "teacher.epochs=15",
                              f"hydra.run.dir={tmp_path / f'run{i}'}"], cwd=tmp_path, text=True,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1", **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err for _, err in outputs]
    sources = sorted(json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["teacher_source"]
                     for i in range(3))
    assert sources == ["cache", "cache", "trained"]
    entries = list((cache / "teachers").glob("*.pt"))
    assert len(entries) == 1 and not list(cache.rglob("*.tmp"))
    teachers = {json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["teacher_test_accuracy"]
                for i in range(3)}
    assert len(teachers) == 1  # all three distilled from the same teacher


@pytest.mark.slow
def test_a_cache_entry_that_does_not_fit_is_retrained_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("JACDISTILL_CACHE", str(tmp_path / "cache"))
    run_command("train", FAST, tmp_path / "first")
    (entry,) = (tmp_path / "cache" / "teachers").glob("*.pt")
    payload = torch.load(entry, weights_only=True)
    payload["state_dict"] = {k: v[..., :1] if v.dim() else v for k, v in payload["state_dict"].items()}
    torch.save(payload, entry)  # same architecture recorded, weights of another shape
    with caplog.at_level("WARNING", logger="jacdistill"):
        run_command("train", FAST, tmp_path / "second")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot be used" in warnings[0] and "training it anew" in warnings[0]
    assert "teacher.checkpoint" not in warnings[0]
    assert json.loads((tmp_path / "second" / "metrics.json").read_text())["teacher_source"] == "trained"
    torch.load(entry, weights_only=True)  # rewritten whole
    caplog.clear()
    run_command("train", FAST, tmp_path / "third")
    assert json.loads((tmp_path / "third" / "metrics.json").read_text())["teacher_source"] == "cache"


def test_a_cache_that_cannot_be_written_costs_one_warning_and_the_teacher_stays_in_the_run(tmp_path, monkeypatch,
                                                                                         caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    monkeypatch.setenv("JACDISTILL_CACHE", str(blocker))
    with caplog.at_level("WARNING", logger="jacdistill"):
        run_command("train", FAST, tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot be written" in warnings[0] and "teacher.pt" in warnings[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["teacher_source"] == "trained"
    assert metrics["teacher_checkpoint"] == str(tmp_path / "run" / "teacher.pt")
    torch.load(tmp_path / "run" / "teacher.pt", weights_only=True)
    assert blocker.read_text() == "not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "run"]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "marker"
    crafted = tmp_path / "data_batch_1"
    crafted.write_bytes(pickle.dumps({"data": Marker(str(marker)), "labels": [0]}, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="it would call"):
        read_cifar_batch(crafted, "batch")
    assert not marker.exists()
    # the same object unpickled by pickle itself does run: the test file is a real attack
    pickle.loads(crafted.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches_of_the_published_format_are_read(tmp_path, protocol):
    batch = {"batch_label": "training batch 1 of 5", "labels": [3, 1], "filenames": ["a.png", "b.png"],
             "data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)}
    (tmp_path / "b").write_bytes(pickle.dumps(batch, protocol=protocol))
    read = read_cifar_batch(tmp_path / "b", "batch")
    assert read["labels"] == [3, 1] and np.array_equal(read["data"], batch["data"])
    (tmp_path / "objects").write_bytes(pickle.dumps({"data": np.array([1, "x"], dtype=object)}, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError):
        read_cifar_batch(tmp_path / "objects", "batch")


def test_a_crafted_cifar_folder_is_refused_whatever_verify_says(tmp_path):
    from helpers import dataset_cfg

    from jacdistill_cli.zoo.data import build_data

    root = write_crafted_cifar(tmp_path / "data", tmp_path / "marker")
    for verify in ("true", "false"):
        with pytest.raises(UsageError) as err:
            build_data(dataset_cfg("cifar10", f"dataset.root={root}", f"dataset.verify={verify}"))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "marker").exists()


def test_evaluate_reads_the_files_of_a_stored_dataset_only_from_the_directory_given(tmp_path, capsys):
    from helpers import write_cifar, write_student

    write_cifar(tmp_path / "data", 10, train_per_class=10, test_per_class=1)
    write_student(tmp_path / "student.pt", tmp_path / "elsewhere")  # records a directory never given
    result = run_command("evaluate", [f"checkpoint={tmp_path / 'student.pt'}", f"dataset_root={tmp_path / 'data'}",
                                      "sigmas=[0.1]"], tmp_path / "run")
    assert result["dataset"] == "cifar10" and result["samples"] == 10
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_command("evaluate", [f"checkpoint={tmp_path / 'student.pt'}"], tmp_path / "run2")
    assert exit_.value.code == 2
    assert f"add dataset_root={tmp_path / 'elsewhere'} if you trust it" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "evaluation.json").exists()


@pytest.mark.slow
def test_report_shows_a_nan_metric_as_nan_and_an_unreadable_run_as_such(tmp_path):
    from helpers import hydra_run

    from jacdistill_cli.analysis.report import write_report

    for name, alpha, accuracy in (("a", "0.1", "NaN"), ("b", "0.3", "0.5")):
        run = hydra_run(tmp_path / name)
        (run / ".hydra" / "overrides.yaml").write_text(f"- alpha={alpha}\n")
        (run / "metrics.json").write_text(f'{{"test_accuracy": {accuracy}}}\n')
    (hydra_run(tmp_path / "c") / ".hydra" / "overrides.yaml").write_text("- alpha=[\n  - : x\n")
    report, text, _ = write_report(tmp_path)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| 0.")}
    assert "| nan |" in rows["0.1"].replace("  ", " ") and "0.5000" in rows["0.3"]
    assert "c: unreadable (.hydra/overrides.yaml is not valid YAML" in text
