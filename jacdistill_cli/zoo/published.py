"""The published CIFAR-100 teachers of the distillation benchmark (RepDistiller/CRD; mdistiller's
`cifar_teachers` are the same files): `<arch>_vanilla/ckpt_epoch_240.pth`, a dict

    {"epoch": int, "model": state_dict, "accuracy": top-1 test accuracy in percent, "optimizer": {...}}

Their state_dicts name the modules of the original code (`conv1`, `layer1.0.downsample.0`, `fc`,
`block1.layer.0.convShortcut`, ...). The zoo's resnet_cifar and wrn compute the same functions under
other names (`stem`, `stages.0.shortcut.0`, `classifier`, ...), and vgg_cifar under the same names, so
a published file is loaded by renaming its keys to the zoo's, strictly: every key must be there, with
its shape, and no other. Nothing in the file says which architecture it holds: the run's
`teacher=` option does (resnet32x4 for resnet32x4_vanilla/...).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from jacdistill_cli.errors import UsageError

# The families whose layout the published files use, and how the option names of conf/teacher and
# conf/student correspond to them.
FAMILIES = ("resnet_cifar", "wrn", "vgg_cifar")
FORMAT_NAME = "published CIFAR checkpoint (RepDistiller/CRD layout)"
# The normalisation the published teachers were trained with (RepDistiller's CIFAR-100 loader).
CIFAR100_MEAN = [0.5071, 0.4867, 0.4408]
CIFAR100_STD = [0.2675, 0.2565, 0.2761]


def is_published(payload: Any) -> bool:
    """A dict with `epoch`, `accuracy` and a `model` state_dict (`optimizer` is not needed), and not
    a jacdistill checkpoint."""
    return (isinstance(payload, dict) and "format" not in payload and {"epoch", "model", "accuracy"} <= set(payload)
            and isinstance(payload["model"], dict) and len(payload["model"]) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["model"].items()))


def published_name(spec: dict[str, Any]) -> str | None:
    """The benchmark's name of an architecture (resnet32x4, wrn_40_2, vgg13), or None when it has none."""
    name, depth = spec.get("name"), spec.get("depth")
    if name == "resnet_cifar":
        channels = list(spec.get("channels", [16, 16, 32, 64]))
        suffix = {(16, 16, 32, 64): "", (32, 64, 128, 256): "x4"}.get(tuple(channels))
        return None if suffix is None else f"resnet{depth}{suffix}"
    if name == "wrn" and not spec.get("dropout"):
        return f"wrn_{depth}_{spec.get('width')}"
    if name == "vgg_cifar" and spec.get("width", 1.0) == 1.0:
        return f"vgg{depth}"
    return None


def published_keys(model: nn.Module, family: str) -> dict[str, str]:
    """{zoo key: published key} for every entry of the model's state_dict, in the model's order."""
    keys = list(model.state_dict())
    if family == "vgg_cifar":
        return {key: key for key in keys}
    if family not in ("resnet_cifar", "wrn"):
        raise ValueError(family)
    per_stage = len(model.stages) // 3
    renamed = {}
    for key in keys:
        stage = re.match(r"stages\.(\d+)\.(.*)", key)
        if stage:
            index, rest = int(stage.group(1)), stage.group(2)
            group, block = index // per_stage + 1, index % per_stage
            if family == "resnet_cifar":
                new = f"layer{group}.{block}.{rest.replace('shortcut.', 'downsample.', 1)}"
            else:
                new = f"block{group}.layer.{block}." + re.sub(r"^project\.", "convShortcut.", rest)
        elif family == "resnet_cifar":
            new = re.sub(r"^stem\.0\.", "conv1.", re.sub(r"^stem\.1\.", "bn1.", key))
        else:
            new = re.sub(r"^stem\.", "conv1.", re.sub(r"^head\.0\.", "bn1.", key))
        renamed[key] = re.sub(r"^classifier\.", "fc.", new)
    return renamed


def to_published(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The model's state_dict under the published names (what the original code would save)."""
    names = published_keys(model, family)
    return {names[k]: v for k, v in model.state_dict().items()}


def mismatch(model: nn.Module, family: str, state: dict[str, torch.Tensor]) -> str | None:
    """Why `state` (published names) does not fit `model`, in a few words, or None when it fits:
    the first missing key, else the first unexpected one, else the first shape that differs."""
    names = published_keys(model, family)
    expected = {names[k]: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected of {len(state)} keys"
    if missing:
        return f"missing key {missing[0]!r} ({counts})"
    if unexpected:
        return f"unexpected key {unexpected[0]!r} ({counts})"
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            return f"key {key!r} has shape {list(state[key].shape)}, the model's has {list(shape)}"
    return None


def fitting_options(state: dict[str, torch.Tensor], group: str, input_shape: tuple[int, ...],
                    num_classes: int) -> list[str]:
    """The shipped options of config group `group` whose network the published state_dict fits."""
    from omegaconf import OmegaConf

    from jacdistill_cli.config.registry import shipped_node, shipped_options
    from jacdistill_cli.zoo.models import build_model

    fits = []
    for option in sorted(shipped_options(group)):
        spec = OmegaConf.to_container(shipped_node(group, option))
        if spec.get("name") not in FAMILIES:
            continue
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = build_model(spec, input_shape, num_classes, group)
        if mismatch(model, spec["name"], state) is None:
            fits.append(f"{group}={option}")
    return fits


def classes_in(state: dict[str, torch.Tensor]) -> int | None:
    """The class count of a published state_dict: rows of its last linear layer (`fc` or `classifier`)."""
    for key in ("fc.weight", "classifier.weight"):
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def from_published(raw: dict[str, Any], key: str, path: str, spec: dict[str, Any], input_shape: tuple[int, ...],
                   num_classes: int, dataset: str, group: str = "teacher") -> tuple[dict[str, Any], str]:
    """A jacdistill checkpoint payload less its format marker (checkpoints.load_teacher_checkpoint adds it:
    architecture from the run's `group` option, state_dict renamed to the zoo's keys) from a published
    file, and one line saying what was loaded.
    Raises UsageError, naming the first missing or unexpected key, when the file does not fit."""
    from jacdistill_cli.zoo.models import build_model, describe_architecture

    state = raw["model"]
    family = spec.get("name")
    where = f"{key}={path!r}"
    if family not in FAMILIES:
        hint = fitting_options(state, group, input_shape, classes_in(state) or num_classes)
        raise UsageError(f"{where} is not allowed: it is a {FORMAT_NAME}, which holds a resnet_cifar, wrn or "
                         f"vgg_cifar network, not {group} {describe_architecture(spec)}"
                         + (f"; it fits {' or '.join(hint)}" if hint else ""))
    file_classes = classes_in(state)
    if file_classes is not None and file_classes != num_classes:
        raise UsageError(f"{key} does not fit this run: the checkpoint has {file_classes} classes, "
                         f"dataset {dataset!r} has {num_classes}")
    with torch.device("meta"):
        model = build_model(spec, input_shape, num_classes, group)
    problem = mismatch(model, family, state)
    if problem is not None:
        hint = fitting_options(state, group, input_shape, num_classes)
        raise UsageError(f"{where} is not allowed: it is a {FORMAT_NAME} whose weights do not fit "
                         f"{group} {describe_architecture(spec)}: {problem}"
                         + (f"; it fits {' or '.join(hint)}" if hint else ""))
    to_zoo = {published: zoo for zoo, published in published_keys(model, family).items()}
    try:
        accuracy = float(raw["accuracy"])
    except (TypeError, ValueError, RuntimeError):
        accuracy = float("nan")
    published = published_name(spec)
    payload = {
        "role": group, "architecture": dict(spec),
        "num_classes": num_classes, "input_shape": list(input_shape),
        # The published teachers are CIFAR-100's; a file of another class count says nothing of its data.
        "dataset": "cifar100" if num_classes == 100 else dataset,
        "normalization": {"mean": CIFAR100_MEAN, "std": CIFAR100_STD} if num_classes == 100 else {},
        "metrics": {"recorded_accuracy": accuracy / 100},
        "state_dict": {to_zoo[k]: v for k, v in state.items()},
    }
    line = (f"{key}: {FORMAT_NAME} of {published or family} ({describe_architecture(spec)}), epoch {raw['epoch']}, "
            f"recorded test accuracy {accuracy:.2f}%: {len(state)} tensors renamed to the zoo's keys and loaded "
            f"strictly from {path}")
    return payload, line
