"""Checkpoints: what they hold, the round trip, and one line for every file that does not fit or is
no checkpoint, in process and through the console script."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from jacdistill_cli.errors import UsageError
from jacdistill_cli.storage import write_torch
from jacdistill_cli.zoo.checkpoints import (
    check_fits,
    load_checkpoint,
    make_checkpoint,
    matching_overrides,
    model_from_checkpoint,
)
from jacdistill_cli.zoo.data import build_data
from jacdistill_cli.zoo.models import build_model

CNN = {"name": "cnn", "channels": [4, 8], "hidden": 8, "batchnorm": True}


class Custom:
    """Unpickling this needs this module's code: weights_only=True must refuse it."""


def dataset(*overrides: str):
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        return build_data(compose(config_name="train", overrides=list(overrides)).dataset)


@pytest.fixture(scope="module")
def digits():
    return dataset()


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits) -> dict[str, Path]:
    """A real teacher checkpoint (untrained cnn on digits) and four files that are no checkpoint."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    payload = make_checkpoint(build_model(CNN, digits.input_shape, 10), "teacher", CNN, digits, {"test_accuracy": 0.5})
    write_torch(folder / "cnn.pt", payload)
    (folder / "notes.txt").write_text("not a checkpoint\n")
    torch.save({**payload, "extra": Custom()}, folder / "custom.pt")
    torch.save({"weights": torch.zeros(3)}, folder / "plain.pt")
    return {name: folder / name for name in ("cnn.pt", "notes.txt", "custom.pt", "plain.pt")}


def test_a_checkpoint_holds_what_rebuilds_and_checks_the_model(files, digits):
    payload = load_checkpoint(files["cnn.pt"], "teacher.checkpoint")
    assert payload["architecture"] == CNN and payload["num_classes"] == 10 and payload["input_shape"] == [1, 8, 8]
    assert payload["normalization"] == {"mean": digits.mean, "std": digits.std}
    assert payload["metrics"] == {"test_accuracy": 0.5} and payload["dataset"] == "digits"
    assert payload["dataset_config"]["name"] == "digits" and payload["dataset_config"]["split_seed"] == 0
    torch.manual_seed(0)
    original = build_model(CNN, (1, 8, 8), 10).eval()
    rebuilt = model_from_checkpoint(payload, "teacher.checkpoint").eval()
    inputs = digits.test.inputs[:16]
    assert torch.equal(original(inputs), rebuilt(inputs))
    assert not list(files["cnn.pt"].parent.glob(".*.tmp"))


def test_check_fits_names_each_mismatch(files, digits):
    payload = load_checkpoint(files["cnn.pt"], "teacher.checkpoint")
    check_fits(payload, "teacher.checkpoint", digits, CNN)
    fewer = dataset("dataset=fake", "dataset.shape=[1,8,8]", "dataset.num_classes=5", "dataset.train_size=10",
                    "dataset.val_size=5", "dataset.test_size=5")
    with pytest.raises(UsageError, match=r"the checkpoint has 10 classes, dataset 'fake' has 5"):
        check_fits(payload, "teacher.checkpoint", fewer)
    colour = dataset("dataset=fake", "dataset.train_size=10", "dataset.val_size=10", "dataset.test_size=10")
    with pytest.raises(UsageError, match=r"takes inputs of shape \(1, 8, 8\), dataset 'fake' gives \(3, 32, 32\)"):
        check_fits(payload, "teacher.checkpoint", colour)
    with pytest.raises(UsageError, match=r"the checkpoint is a cnn\(channels=\[4, 8\].*the run asks for a "
                                         r"mlp\(.*run with teacher=cnn teacher.channels=\[4,8\] teacher.hidden=8$"):
        check_fits(payload, "teacher.checkpoint", digits, {"name": "mlp", "hidden": [64], "batchnorm": False})


@pytest.mark.parametrize("name,reason", [
    ("notes.txt", "it is not a file written by torch.save"),
    ("custom.pt", "it would need arbitrary code to unpickle (test_checkpoints.Custom)"),
    ("plain.pt", "it lacks the format marker"),
])
def test_files_that_are_no_checkpoint_are_refused_in_one_line(files, name, reason):
    with pytest.raises(UsageError) as err:
        load_checkpoint(files[name], "teacher.checkpoint")
    assert str(err.value).startswith(f"teacher.checkpoint={str(files[name])!r} is not a jacdistill checkpoint: ")
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_matching_overrides_name_the_shipped_option_and_the_settings_that_differ():
    assert matching_overrides({"name": "resnet_cifar", "depth": 32, "channels": [32, 64, 128, 256]},
                              "teacher") == "teacher=resnet32x4"
    assert matching_overrides({"name": "wrn", "depth": 28, "width": 10, "dropout": 0.0},
                              "student") == "student=wrn_16_2 student.depth=28 student.width=10"


@pytest.mark.slow
def test_mismatches_and_bad_files_through_the_console_script(cli, files, tmp_path):
    """Each gives its one line on stderr and exit status 2."""
    cnn = files["cnn.pt"]
    runs = {
        "classes": (["train", "teacher=cnn", "teacher.channels=[4,8]", "teacher.hidden=8", f"teacher.checkpoint={cnn}",
                     "dataset=fake", "dataset.shape=[1,8,8]", "dataset.num_classes=5"],
                    "the checkpoint has 10 classes, dataset 'fake' has 5"),
        "shape": (["train", f"teacher.checkpoint={cnn}", "dataset=fake"],
                  "the checkpoint takes inputs of shape (1, 8, 8), dataset 'fake' gives (3, 32, 32)"),
        "architecture": (["train", "teacher=mlp", f"teacher.checkpoint={cnn}"],
                         "run with teacher=cnn teacher.channels=[4,8] teacher.hidden=8"),
        "arbitrary code": (["train", f"teacher.checkpoint={files['custom.pt']}"],
                           "it would need arbitrary code to unpickle (test_checkpoints.Custom)"),
        "not torch": (["evaluate", f"checkpoint={files['notes.txt']}"], "it is not a file written by torch.save"),
        "no marker": (["evaluate", f"checkpoint={files['plain.pt']}"], "it lacks the format marker"),
    }

    def run(item):
        name, (args, _) = item
        return name, cli(*args, f"hydra.run.dir={tmp_path / name.replace(' ', '_')}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, runs.items()))
    for name, (args, expected) in runs.items():
        result = results[name]
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (name, result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"jacdistill {args[0]}: error: "), (name, result.stderr)
        assert expected in lines[0], (name, lines[0])
