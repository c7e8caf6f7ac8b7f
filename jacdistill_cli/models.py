"""Models by name. A builder takes (input_shape, num_classes, **architecture settings).

The architecture settings of a model are its config node minus the keys that say how a
teacher is obtained (`checkpoint`, `epochs`, ...): see `architecture`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn

from jacdistill_cli.errors import UsageError

MODELS: dict[str, Callable[..., nn.Module]] = {}

# Keys of a teacher/student node that are not architecture settings.
NOT_ARCHITECTURE = {"checkpoint", "epochs", "batch_size", "lr", "weight_decay"}


def register_model(name: str):
    def add(builder):
        MODELS[name] = builder
        return builder

    return add


def architecture(node: DictConfig) -> dict[str, Any]:
    """The architecture of a teacher/student node as a plain dict: {"name": ..., settings...}."""
    spec = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in spec.items() if k not in NOT_ARCHITECTURE}


def build_model(spec: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, role: str = "model") -> nn.Module:
    """role names the config group (teacher/student) in error messages."""
    settings = dict(spec)
    name = settings.pop("name", None)
    if name not in MODELS:
        raise UsageError(f"{role}.name={name!r} is not allowed: it must be one of {', '.join(sorted(MODELS))}")
    builder = MODELS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes")]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise UsageError(f"{role}.{unknown[0]} is not a setting of model {name!r}; its settings are: {', '.join(accepted)}")
    return builder(input_shape=tuple(input_shape), num_classes=num_classes, **settings)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int] = (64,), batchnorm: bool = False,
        dropout: float = 0.0) -> nn.Module:
    """Flatten, then Linear-(BatchNorm)-ReLU blocks of the given widths, then a linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if batchnorm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int, channels: list[int] = (32, 64), hidden: int = 128,
        batchnorm: bool = True) -> nn.Module:
    """3x3 conv-(BatchNorm)-ReLU blocks, each max-pooled by 2 while the map is at least 4 wide,
    then global average pooling and a one-hidden-layer head. Fits any [C, H, W] input."""
    in_channels, height = input_shape[0], input_shape[1]
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        if height >= 4:
            layers.append(nn.MaxPool2d(2))
            height //= 2
        in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if hidden:
        layers += [nn.Linear(in_channels, hidden), nn.ReLU()]
        in_channels = hidden
    layers.append(nn.Linear(in_channels, num_classes))
    return nn.Sequential(*layers)
