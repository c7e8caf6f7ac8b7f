"""Checkpoints: a plain state_dict plus what is needed to rebuild and check the model.

    {"format": "jacdistill", "version": 1, "role": "teacher" | "student",
     "architecture": {"name": ..., settings...}, "num_classes": int, "input_shape": [..],
     "dataset": str, "dataset_config": {the resolved dataset node}, "normalization": {"mean": [..], "std": [..]},
     "metrics": {..}, "state_dict": {..}}

Loaded with `torch.load(weights_only=True)`: no arbitrary code is unpickled (numbers and arrays of numpy,
which files written elsewhere may hold, are allowed by name: see `numpy_globals`). The dataset settings let
`jacdistill evaluate` rebuild the same test split the model was measured on. A teacher may also come from a
published CIFAR-100 teacher file (see published.py): `load_teacher_checkpoint` reads both.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jacdistill_cli.config.registry import label
from jacdistill_cli.zoo.data import DataBundle
from jacdistill_cli.errors import UsageError
from jacdistill_cli.zoo.models import build_model, with_target

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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only, no permission): one line saying why."""


def write_failure(path: Path, err: Exception) -> str:
    """Why writing `path` failed, in a few words: the OS's reason, not torch's zip-writer internals."""
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno)
    try:
        if shutil.disk_usage(path.parent).free < 2**20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return "the write failed (is the disk full?)"


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write atomically, so a concurrent reader never sees half a file; on failure no temporary file
    is left behind and CheckpointWriteError says why in one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CheckpointWriteError(f"cannot write {path}: {write_failure(path, err)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def unpickling_reason(path: Path, err: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words."""
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if unsafe:
        return (f"it would need arbitrary code to unpickle ({unsafe.group(1)}); only tensors and plain containers "
                "are loaded (weights_only=True)")
    with open(path, "rb") as f:
        start = f.read(2)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol marker 0x80)
    if not zipfile.is_zipfile(path) and not start.startswith(b"\x80"):
        return "it is not a file written by torch.save"
    if "Weights only load failed" in str(err):
        return "it holds objects that weights_only=True does not load (only tensors and plain containers)"
    return f"torch.load fails on it ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"


def numpy_globals() -> list:
    """What unpickling numpy scalars and numeric arrays needs (a file's `accuracy` may be a numpy float):
    the scalar and array constructors and the dtypes of numbers, under numpy 2's module names and under
    numpy 1's (`numpy.core`), as files written with either name them. Nothing that runs other code."""
    import numpy as np

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        function = getattr(core, name)
        allowed += [function, (function, f"numpy.core.multiarray.{name}"),
                    (function, f"numpy._core.multiarray.{name}")]
    for kind in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                 np.float16, np.float32, np.float64):
        allowed.append(type(np.dtype(kind)))  # numpy.dtypes.Float64DType, ...
    return allowed


def read_torch_file(path: Path, key: str, what: str = "a jacdistill checkpoint") -> Any:
    """torch.load(weights_only=True) with numpy's numbers allowed; one line when the file is refused."""
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise UsageError(f"{key}={str(path)!r} is not {what}: {unpickling_reason(path, err)}") from None


def existing_path(path: str | Path, key: str) -> Path:
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UsageError(f"{key}={str(path)!r} is not allowed: no such file")
    return path


def load_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """Read a checkpoint; `key` names the setting that gave the path, for error messages."""
    path = existing_path(path, key)
    return checked_payload(read_torch_file(path, key), path, key)


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
    raw = read_torch_file(path, key, f"a jacdistill checkpoint or a {FORMAT_NAME}")
    if not is_published(raw):
        return checked_payload(raw, path, key)
    payload, line = from_published(raw, key, str(path), spec, tuple(data.input_shape), data.num_classes, data.name,
                                   group)
    log.info(line)
    return payload


def describe_architecture(spec: dict[str, Any]) -> str:
    """An architecture (`zoo.models.architecture`'s dict) on one line, as logs and messages show it:
    `resnet_cifar(depth=32, channels=[32, 64, 128, 256])`."""
    settings = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("name", "_target_"))
    return f"{label('model', spec)}({settings})"


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
    import yaml
    from importlib import resources

    best: tuple[int, str, list[str]] | None = None
    folder = resources.files("jacdistill_cli.conf") / group
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        option = yaml.safe_load(entry.read_text()) or {}
        if option.get("name") != spec.get("name"):
            continue
        differing = [f"{group}.{k}={_hydra_value(v)}" for k, v in spec.items()
                     if k not in ("name", "_target_") and option.get(k) != v]
        differing += [f"~{group}.{k}" for k in option
                      if k not in spec and k not in ("name", "_target_") and option[k] is not None]
        if best is None or len(differing) < best[0]:
            best = (len(differing), entry.name[:-len(".yaml")], differing)
    if best is None:
        return f"a {group} of model {spec.get('name')!r} with settings {describe_architecture(spec)}"
    return " ".join([f"{group}={best[1]}", *best[2]])


def _hydra_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


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
