"""Pixel space: where epsilon is measured. A split holds normalised inputs (x - mean) / std; an attack
works on pixels p = x * std + mean in [0, 1] (digits: grey levels 0..16 divided by 16; MNIST, CIFAR and
image folders: 0..255 divided by 255) and calls the network through `PixelModel`, which normalises
inside, so that an epsilon-ball in pixels is exactly the ball the metric names."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from jacdistill_cli.engine.layers import gate_of


@dataclass(frozen=True)
class Pixels:
    """The dataset's normalisation (per channel) and the range of its pixels; `low`/`high` None: the
    dataset has no pixel range (`fake`), attacks are not clipped and pixels are the normalised inputs
    mapped back by mean and std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    low: float | None = 0.0
    high: float | None = 1.0

    @classmethod
    def of(cls, bundle) -> "Pixels":
        """From a zoo.data.DataBundle: its mean, std and `pixel_range` ((0, 1), or None for `fake`)."""
        channels = bundle.input_shape[0]
        mean = list(bundle.mean) or [0.0]
        std = list(bundle.std) or [1.0]
        mean, std = (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)
        bounds = getattr(bundle, "pixel_range", (0.0, 1.0))
        low, high = (None, None) if bounds is None else (float(bounds[0]), float(bounds[1]))
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std), low, high)

    @property
    def clipped(self) -> bool:
        return self.low is not None

    def _view(self, values: Sequence[float], like: Tensor) -> Tensor:
        shape = [1, len(values)] + [1] * (like.dim() - 2)
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)

    def to_pixels(self, inputs: Tensor) -> Tensor:
        """normalised inputs [b, C, ...] -> pixels [b, C, ...] (clamped into the range: undoes rounding)."""
        pixels = inputs * self._view(self.std, inputs) + self._view(self.mean, inputs)
        return self.clip(pixels)

    def to_inputs(self, pixels: Tensor) -> Tensor:
        """pixels [b, C, ...] -> normalised inputs [b, C, ...]."""
        return (pixels - self._view(self.mean, pixels)) / self._view(self.std, pixels)

    def clip(self, pixels: Tensor) -> Tensor:
        return pixels if self.low is None else pixels.clamp(self.low, self.high)


class PixelModel(nn.Module):
    """model(normalise(pixels)): the network as a function of pixels [b, C, ...] -> logits [b, classes]."""

    def __init__(self, model: nn.Module, pixels: Pixels):
        super().__init__()
        self.model = model
        self.pixels = pixels
        self.training = False

    def train(self, mode: bool = True) -> "PixelModel":
        """The wrapper's own flag only: the network's mode belongs to `attacked` (torchattacks puts a model it
        found in train mode back into train mode after its attack, which would switch BatchNorm to batch
        statistics for the rest of the evaluation)."""
        self.training = mode
        return self

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(self.pixels.to_inputs(pixels))


@contextlib.contextmanager
def attacked(model: nn.Module) -> Iterator[nn.Module]:
    """The network as an attack sees it: eval mode, float32, its Jacobian gate closed (an input-gradient
    outside the gate is the true one); restored afterwards. Refuses a model whose gate is open (inside an
    objective's pass, where its layers take shortcuts an attack must not see)."""
    gate = gate_of(model)
    if gate is not None and (gate.active or gate.loss_backward or gate.held):
        raise RuntimeError("a network is attacked with its Jacobian gate open (inside an objective's pass)")
    was_training = model.training
    dtypes = {p.dtype for p in model.parameters()} | {b.dtype for b in model.buffers() if b.is_floating_point()}
    if dtypes - {torch.float32}:
        raise ValueError(f"attacks run in float32; the network holds {sorted(map(str, dtypes))}")
    model.eval()
    try:
        with torch.autocast(device_type="cuda", enabled=False), torch.autocast(device_type="cpu", enabled=False):
            yield model
    finally:
        model.train(was_training)
