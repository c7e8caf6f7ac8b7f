"""Checkpoints: a plain state_dict plus what is needed to rebuild and check the model.

    {"format": "jacdistill", "version": 1, "role": "teacher" | "student",
     "architecture": {"name": ..., settings...}, "num_classes": int, "input_shape": [..],
     "dataset": str, "normalization": {"mean": [..], "std": [..]}, "metrics": {..},
     "state_dict": {..}}

Loaded with `torch.load(weights_only=True)`: no arbitrary code is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jacdistill_cli.data import DataBundle
from jacdistill_cli.errors import UsageError
from jacdistill_cli.models import build_model

FORMAT = "jacdistill"
VERSION = 1


def make_checkpoint(model: nn.Module, role: str, spec: dict[str, Any], data: DataBundle,
                    metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION, "role": role, "architecture": dict(spec),
        "num_classes": data.num_classes, "input_shape": list(data.input_shape), "dataset": data.name,
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "metrics": {k: float(v) for k, v in metrics.items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write atomically, so a concurrent reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """Read a checkpoint; `key` names the setting that gave the path, for error messages."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UsageError(f"{key}={str(path)!r} is not allowed: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it would need arbitrary code to unpickle (only plain tensors and containers are loaded)"
        raise UsageError(f"{key}={str(path)!r} is not a jacdistill checkpoint: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise UsageError(f"{key}={str(path)!r} is not a jacdistill checkpoint: it lacks the format marker "
                         "and state_dict that `jacdistill teacher` and `jacdistill train` write")
    return payload


def check_fits(payload: dict[str, Any], key: str, data: DataBundle, spec: dict[str, Any] | None = None) -> None:
    """Stop with one line when a checkpoint does not fit the run's data (and architecture, if given)."""
    if payload["num_classes"] != data.num_classes:
        raise UsageError(f"{key} does not fit this run: the checkpoint has {payload['num_classes']} classes, "
                         f"dataset {data.name!r} has {data.num_classes}")
    if tuple(payload["input_shape"]) != tuple(data.input_shape):
        raise UsageError(f"{key} does not fit this run: the checkpoint takes inputs of shape "
                         f"{tuple(payload['input_shape'])}, dataset {data.name!r} gives {tuple(data.input_shape)}")
    if spec is not None and dict(payload["architecture"]) != dict(spec):
        raise UsageError(f"{key} does not fit this run: the checkpoint's architecture is {payload['architecture']}, "
                         f"the run asks for {spec} (choose the matching config group option)")


def model_from_checkpoint(payload: dict[str, Any], key: str) -> nn.Module:
    model = build_model(payload["architecture"], tuple(payload["input_shape"]), payload["num_classes"], key)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise UsageError(f"{key}: the weights do not fit the architecture {payload['architecture']}: "
                         f"{str(err).splitlines()[0]}") from None
    return model
