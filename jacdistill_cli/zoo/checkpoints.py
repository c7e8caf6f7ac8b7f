"""Checkpoints: a plain state_dict plus what is needed to rebuild and check the model.

    {"format": "jacdistill", "version": 1, "role": "teacher" | "student",
     "architecture": {"name": ..., settings...}, "num_classes": int, "input_shape": [..],
     "dataset": str, "dataset_config": {the resolved dataset node}, "normalization": {"mean": [..], "std": [..]},
     "metrics": {..}, "state_dict": {..}}

Written and loaded through storage.py (atomically; `torch.load(weights_only=True)`: no arbitrary code
is unpickled, numbers and arrays of numpy are allowed by name). The dataset settings let
`jacdistill evaluate` rebuild the same test split the model was measured on. A teacher may also come from a
published CIFAR-100 teacher file (see published.py): `load_teacher_checkpoint` reads both.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from jacdistill_cli.errors import UsageError
from jacdistill_cli.storage import read_torch
from jacdistill_cli.zoo.data import DataBundle
from jacdistill_cli.zoo.models import build_model, describe_architecture, override_value, with_target

log = logging.getLogger("jacdistill")

FORMAT = "jacdistill"
VERSION = 1
REQUIRED = ("architecture", "num_classes", "input_shape", "state_dict")


def make_checkpoint(model: nn.Module, role: str, spec: dict[str, Any], data: DataBundle,
                    metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION, "role": role, "architecture": dict(spec),
        "num_classes": data.num_classes, "input_shape": list(data.input_shape), "dataset": data.name,
        "dataset_config": dict(data.config),
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "metrics": {k: float(v) for k, v in metrics.items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def existing_path(path: str | Path, key: str) -> Path:
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UsageError(f"{key}={str(path)!r} is not allowed: no such file")
    return path


def load_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """Read a checkpoint; `key` names the setting that gave the path, for error messages."""
    path = existing_path(path, key)
    return checked_payload(read_torch(path, key), path, key)


def checked_payload(payload: Any, path: Path, key: str) -> dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or any(k not in payload for k in REQUIRED):
        from jacdistill_cli.zoo.published import FORMAT_NAME, is_published

        if is_published(payload):
            raise UsageError(f"{key}={str(path)!r} is not a jacdistill checkpoint: it is a {FORMAT_NAME}, which holds "
                             "no architecture; give it to a run as teacher.checkpoint with the matching teacher= "
                             "option (e.g. teacher=resnet32x4)")
        raise UsageError(f"{key}={str(path)!r} is not a jacdistill checkpoint: it lacks the format marker, "
                         "architecture and state_dict that `jacdistill teacher` and `jacdistill train` write")
    return payload


def load_teacher_checkpoint(path: str | Path, key: str, spec: dict[str, Any], data: DataBundle,
                            group: str = "teacher") -> dict[str, Any]:
    """A teacher's checkpoint payload from a jacdistill checkpoint or a published CIFAR teacher file
    (`<arch>_vanilla/ckpt_epoch_240.pth`), whose architecture is the run's `group` option `spec` and
    whose keys are renamed to the zoo's. The second is logged in one line (architecture, epoch, accuracy)."""
    from jacdistill_cli.zoo.published import FORMAT_NAME, from_published, is_published

    path = existing_path(path, key)
    raw = read_torch(path, key, f"a jacdistill checkpoint or a {FORMAT_NAME}")
    if not is_published(raw):
        return checked_payload(raw, path, key)
    payload, line = from_published(raw, key, str(path), spec, tuple(data.input_shape), data.num_classes, data.name,
                                   group)
    log.info(line)
    return {"format": FORMAT, "version": VERSION, **payload}


def check_fits(payload: dict[str, Any], key: str, data: DataBundle, spec: dict[str, Any] | None = None,
               group: str = "teacher") -> None:
    """Stop with one line when a checkpoint does not fit the run's data (and architecture, if given).
    `group` is the config group whose option would match the checkpoint, for the hint."""
    if payload["num_classes"] != data.num_classes:
        raise UsageError(f"{key} does not fit this run: the checkpoint has {payload['num_classes']} classes, "
                         f"dataset {data.name!r} has {data.num_classes}")
    if tuple(payload["input_shape"]) != tuple(data.input_shape):
        raise UsageError(f"{key} does not fit this run: the checkpoint takes inputs of shape "
                         f"{tuple(payload['input_shape'])}, dataset {data.name!r} gives {tuple(data.input_shape)}")
    if spec is not None and not same_architecture(with_target(dict(payload["architecture"])),
                                                  with_target(dict(spec))):
        raise UsageError(f"{key} does not fit this run: the checkpoint is a "
                         f"{describe_architecture(payload['architecture'])}, the run asks for a "
                         f"{describe_architecture(spec)}; run with "
                         f"{matching_overrides(payload['architecture'], group)}")
    normalization = payload.get("normalization", {})
    if payload.get("dataset") != data.name or (
            normalization and (_rounded(normalization.get("mean")) != _rounded(data.mean)
                               or _rounded(normalization.get("std")) != _rounded(data.std))):
        log.warning(f"{key} was trained on dataset {payload.get('dataset')!r} with normalisation {normalization}; "
                    f"this run uses {data.name!r} with mean {data.mean}, std {data.std}")


def same_architecture(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal settings, where a setting one side lacks counts as null (a setting added later with a
    null default, such as torchvision's `weights`, leaves older checkpoints fitting)."""
    return all(a.get(k) == b.get(k) for k in set(a) | set(b))


def _rounded(values) -> list[float]:
    return [round(float(v), 4) for v in (values or [])]


def matching_overrides(spec: dict[str, Any], group: str) -> str:
    """The command-line overrides that select `spec` in config group `group` (teacher/student): the
    shipped option with the same model and the fewest differing settings, plus those settings."""
    from omegaconf import OmegaConf

    from jacdistill_cli.config.registry import shipped_node, shipped_options

    best: tuple[int, str, list[str]] | None = None
    for name in sorted(shipped_options(group)):
        option = OmegaConf.to_container(shipped_node(group, name))
        if option.get("name") != spec.get("name"):
            continue
        differing = [f"{'' if k in option else '++'}{group}.{k}={override_value(v)}" for k, v in spec.items()
                     if k not in ("name", "_target_") and option.get(k) != v]   # ++: a key the file lacks (output)
        differing += [f"~{group}.{k}" for k in option
                      if k not in spec and k not in ("name", "_target_") and option[k] is not None]
        if best is None or len(differing) < best[0]:
            best = (len(differing), name, differing)
    if best is None:
        return f"a {group} of model {spec.get('name')!r} with settings {describe_architecture(spec)}"
    return " ".join([f"{group}={best[1]}", *best[2]])


def trusted_targets(value: Any, key: str = "trust") -> tuple[str, ...]:
    """The `trust` setting checked: a list of the `_target_`s of the user's own models that a checkpoint may
    name (`trust=[mymodels.tiny]`), as `model_from_checkpoint` takes them."""
    from omegaconf import ListConfig, OmegaConf

    items = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    if value is None:
        return ()
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v for v in items):
        from jacdistill_cli.errors import setting_error

        raise setting_error(key, value, "it must be a list of the _target_s of your own models that a checkpoint "
                            "may name, e.g. [mymodels.tiny]")
    return tuple(items)


def model_from_checkpoint(payload: dict[str, Any], key: str, trusted: tuple[str, ...] = ()) -> nn.Module:
    """The checkpoint's model with its weights. Its architecture's `_target_` must be jacdistill's own
    or one of `trusted` (the targets the user's configuration names). The state_dict replaces any
    initial weights: a network started from published `weights` is rebuilt without them, so that
    reading its checkpoint needs neither their file nor a download."""
    spec = {k: v for k, v in payload["architecture"].items() if k != "weights"}
    model = build_model(spec, tuple(payload["input_shape"]), payload["num_classes"], key, trusted=tuple(trusted))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise UsageError(f"{key}: the weights do not fit the architecture {payload['architecture']}: "
                         f"{str(err).splitlines()[0]}") from None
    return model
