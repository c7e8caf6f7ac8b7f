"""The published CIFAR-100 teachers (RepDistiller/CRD layout): files of that layout load as
teacher.checkpoint and compute what the original code computes; the zoo's networks have exactly the
published keys and shapes; a file that does not fit is refused in one line.

The facts the repository carries (tests/data/published: the keys file, resnet20's file and its reference
logits) are always there. The larger files come from the folder published-cifar-teachers of the shared/
directory beside the repository: the tests that need them skip when it is absent, and fail instead where
CI=true (CI has the folder)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_command
from omegaconf import OmegaConf

from jacdistill_cli.config.registry import shipped_node
from jacdistill_cli.errors import UsageError
from jacdistill_cli.zoo.checkpoints import load_teacher_checkpoint, model_from_checkpoint
from jacdistill_cli.zoo.models import build_model
from jacdistill_cli.zoo.published import published_keys, published_name, to_published

REPO = Path(__file__).resolve().parents[1]
CARRIED = Path(__file__).resolve().parent / "data" / "published"   # in the repository
FACTS = REPO.parent / "shared" / "published-cifar-teachers"        # beside it, in CI
CARRIED_FILES = ("state_dict_keys.json", "resnet20_vanilla_ckpt_epoch_240.pth", "resnet20_reference_io.pt")
WITH_FILES = ("resnet8x4", "resnet20", "wrn_16_2", "vgg8")


@pytest.fixture(scope="module")
def shared_facts() -> Path:
    """The folder of published-teacher files beside the repository: a skip naming it where it is absent,
    a failure where CI=true."""
    if (FACTS / "state_dict_keys.json").is_file():
        return FACTS
    reason = f"the published-teacher files beside the repository are absent: no {FACTS}"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason} (CI=true: CI must have them)", pytrace=False)
    pytest.skip(reason)


def facts_for(arch: str, request: pytest.FixtureRequest) -> Path:
    """The folder holding `arch`'s published file: the repository's own, else the one beside it."""
    if (CARRIED / f"{arch}_vanilla_ckpt_epoch_240.pth").is_file():
        return CARRIED
    return request.getfixturevalue("shared_facts")


def test_the_carried_files_are_the_published_folders(shared_facts):
    for name in CARRIED_FILES:
        carried, published = (CARRIED / name).read_bytes(), (shared_facts / name).read_bytes()
        assert hashlib.sha256(carried).hexdigest() == hashlib.sha256(published).hexdigest(), name


def option(group: str, name: str) -> dict:
    return OmegaConf.to_container(shipped_node(group, name))


class FakeCifar:
    """What the loader needs of a dataset: CIFAR-100's name, shape and class count."""
    name, input_shape, num_classes = "cifar100", (3, 32, 32), 100


@pytest.mark.parametrize("arch", WITH_FILES)
def test_a_published_file_loads_and_gives_the_reference_logits(arch, request, caplog):
    facts = facts_for(arch, request)
    spec = option("teacher", arch)
    with caplog.at_level(logging.INFO, logger="jacdistill"):
        payload = load_teacher_checkpoint(facts / f"{arch}_vanilla_ckpt_epoch_240.pth", "teacher.checkpoint", spec,
                                          FakeCifar())
    # float64 from the file's float32 weights, as the reference was computed
    model = model_from_checkpoint(payload, "teacher.checkpoint").to(torch.float64).eval()
    reference = torch.load(facts / f"{arch}_reference_io.pt", weights_only=True)
    with torch.no_grad():
        logits = model(reference["input"])
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-10)
    lines = [r.getMessage() for r in caplog.records if "published CIFAR checkpoint" in r.getMessage()]
    assert len(lines) == 1 and f"of {arch} (" in lines[0] and "epoch 240" in lines[0], lines


@pytest.mark.parametrize("arch", ["resnet8x4", "resnet20", "resnet32", "resnet56", "resnet110", "resnet32x4",
                                  "wrn_16_2", "wrn_40_2", "vgg8", "vgg13"])
def test_the_zoo_network_has_the_published_keys_and_shapes(arch):
    published = json.loads((CARRIED / "state_dict_keys.json").read_text())[arch]
    for group in ("teacher", "student"):  # every architecture of the table is an option of both
        spec = option(group, arch)
        assert published_name(spec) == arch
        with torch.device("meta"):
            model = build_model(spec, (3, 32, 32), 100)
        renamed = {key: list(value.shape) for key, value in to_published(model, spec["name"]).items()}
        assert list(renamed.items()) == list(published.items())  # the same keys, shapes and order


def test_a_file_of_another_architecture_is_refused_in_one_line_naming_the_key_and_the_option_it_fits():
    facts = CARRIED
    with pytest.raises(UsageError) as refused:
        load_teacher_checkpoint(facts / "resnet20_vanilla_ckpt_epoch_240.pth", "teacher.checkpoint",
                                option("teacher", "resnet32"), FakeCifar())
    message = str(refused.value)
    assert "\n" not in message
    assert "missing key 'layer1.3.conv1.weight'" in message  # resnet32 has 5 blocks a stage, resnet20 three
    assert message.endswith("it fits teacher=resnet20")
    # A key the zoo's network does not have: a published resnet20 given as a wrn_16_2.
    with pytest.raises(UsageError, match=r"missing key 'block1.layer.0.bn1.weight'.*; it fits teacher=resnet20$"):
        load_teacher_checkpoint(facts / "resnet20_vanilla_ckpt_epoch_240.pth", "teacher.checkpoint",
                                option("teacher", "wrn_16_2"), FakeCifar())


def write_published(path: Path, spec: dict, accuracy, drop: str | None = None, extra: dict | None = None) -> dict:
    """A file in the published layout for `spec`, as the original code saves it (random weights)."""
    torch.manual_seed(0)
    model = build_model(spec, (3, 32, 32), 100)
    state = to_published(model, spec["name"])
    if drop:
        del state[drop]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.save({"epoch": 240, "model": state, "accuracy": accuracy, "optimizer": optimizer.state_dict(),
                **(extra or {})}, path)
    return {published: zoo for zoo, published in published_keys(model, spec["name"]).items()}


SMALL_RESNET = {"name": "resnet_cifar", "depth": 8, "channels": [4, 4, 8, 8]}


def test_numpy_accuracy_loads_weights_only_and_a_missing_key_is_named(tmp_path, caplog):
    """Files written elsewhere may hold numpy scalars: allowed by name, and nothing else is."""
    good = tmp_path / "good.pth"
    to_zoo = write_published(good, SMALL_RESNET, np.float64(71.25))
    with caplog.at_level(logging.INFO, logger="jacdistill"):
        payload = load_teacher_checkpoint(good, "teacher.checkpoint", SMALL_RESNET, FakeCifar())
    assert payload["metrics"] == {"recorded_accuracy": pytest.approx(0.7125)}
    assert set(payload["state_dict"]) == set(to_zoo.values())
    assert any("recorded test accuracy 71.25%" in r.getMessage() for r in caplog.records)

    partial = tmp_path / "partial.pth"
    write_published(partial, SMALL_RESNET, 70.0, drop="layer2.0.downsample.1.running_var")
    with pytest.raises(UsageError, match=r"^teacher.checkpoint='.*partial.pth' is not allowed: .*: missing key "
                                         r"'layer2.0.downsample.1.running_var' \(1 missing, 0 unexpected"):
        load_teacher_checkpoint(partial, "teacher.checkpoint", SMALL_RESNET, FakeCifar())

    unsafe = tmp_path / "unsafe.pth"
    write_published(unsafe, SMALL_RESNET, 70.0, extra={"args": argparse.Namespace(lr=0.05)})
    with pytest.raises(UsageError, match=r"would need arbitrary code to unpickle \(argparse.Namespace\)"):
        load_teacher_checkpoint(unsafe, "teacher.checkpoint", SMALL_RESNET, FakeCifar())


# CIFAR-100's class count on small images (the networks adapt to any size), for speed.
FAKE_CIFAR100 = ["dataset=fake", "dataset.num_classes=100", "dataset.shape=[3,16,16]", "dataset.train_size=100",
                 "dataset.val_size=100", "dataset.test_size=100", "trainer.epochs=1", "trainer.batch_size=100",
                 "trainer.device=cpu", "student=resnet8x4", "student.channels=[4,4,8,8]", "recipe=kd"]


@pytest.mark.slow
def test_a_run_distils_from_a_published_teacher(tmp_path, caplog):
    """A published resnet20 teacher on fake data of 100 classes, through `train` in this process."""
    checkpoint = CARRIED / "resnet20_vanilla_ckpt_epoch_240.pth"
    with caplog.at_level(logging.INFO, logger="jacdistill"):
        run_command("train", [*FAKE_CIFAR100, "teacher=resnet20", f"teacher.checkpoint={checkpoint}"], tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["teacher_source"] == "checkpoint"
    assert metrics["teacher_checkpoint"] == str(checkpoint.resolve())
    assert sum("published CIFAR checkpoint (RepDistiller/CRD layout) of resnet20" in r.getMessage()
               for r in caplog.records) == 1


@pytest.mark.slow
def test_a_misfit_published_teacher_stops_the_console_script_in_one_line(cli, tmp_path):
    """The published resnet20 given as resnet32: one line, exit status 2, before any training."""
    checkpoint = f"teacher.checkpoint={CARRIED / 'resnet20_vanilla_ckpt_epoch_240.pth'}"
    bad = cli("train", *FAKE_CIFAR100, "teacher=resnet32", checkpoint, f"hydra.run.dir={tmp_path / 'bad'}",
              cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("jacdistill train: error: teacher.checkpoint=")
    assert "missing key 'layer1.3.conv1.weight'" in bad.stderr and "it fits teacher=resnet20" in bad.stderr
    assert not (tmp_path / "bad" / "metrics.json").exists()
