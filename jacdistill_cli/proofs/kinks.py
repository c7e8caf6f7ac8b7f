"""Which piece of a piecewise network an input lies on.

A network with ReLUs and max pooling is piecewise smooth: its one-sided derivative along xi at x describes
D(x + s xi) only for s up to the first kink on the segment, where a ReLU changes sign or a max-pooling window
changes its winner. `choices` records, op by op, the choices one forward pass makes: the sign of each
ReLU-like op's input, the winner of each max pooling, and every boolean or index tensor an op computes (the
comparisons of a hand-written ReLU, argmax, top-k). Two inputs with equal records lie on one piece, up to a
kink crossed and crossed back between them, which is not looked for.

The forward pass runs with gradients enabled, so that fused inference paths (nn.TransformerEncoderLayer's
fast path) that hide their activations in one op are not taken.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _positive(args: tuple, kwargs: dict) -> list[Tensor]:
    return [args[0] > 0]


def _threshold(args: tuple, kwargs: dict) -> list[Tensor]:
    return [args[0] > args[1]]


def _bounds(low: int | None, high: int | None) -> Callable[[tuple, dict], list[Tensor]]:
    """clamp(x, min, max) and its kind: which entries lie above the lower bound and below the upper."""
    def chosen(args: tuple, kwargs: dict) -> list[Tensor]:
        x, record = args[0], []
        for position, name, above in ((low, "min", True), (high, "max", False)):
            if position is None:
                continue
            bound = args[position] if len(args) > position else kwargs.get(name)
            if bound is not None:
                record.append(x > bound if above else x < bound)
        return record
    return chosen


def _larger(args: tuple, kwargs: dict) -> list[Tensor]:
    return [args[0] > args[1]]


def _sign(args: tuple, kwargs: dict) -> list[Tensor]:
    return [args[0] > 0, args[0] < 0]


def _winners(with_indices: Any) -> Callable[[tuple, dict], list[Tensor]]:
    """Max pooling without indices: its winners, from the same pooling with indices."""
    def chosen(args: tuple, kwargs: dict) -> list[Tensor]:
        return [with_indices(*args, **kwargs)[1]]
    return chosen


PIECEWISE: dict[Any, Callable[[tuple, dict], list[Tensor]]] = {
    aten.relu: _positive, aten.relu_: _positive, aten.leaky_relu: _positive, aten.leaky_relu_: _positive,
    aten.threshold: _threshold, aten.threshold_: _threshold,
    aten.clamp: _bounds(1, 2), aten.clamp_: _bounds(1, 2), aten.hardtanh: _bounds(1, 2), aten.hardtanh_: _bounds(1, 2),
    aten.clamp_min: _bounds(1, None), aten.clamp_min_: _bounds(1, None),
    aten.clamp_max: _bounds(None, 1), aten.clamp_max_: _bounds(None, 1),
    aten.maximum: _larger, aten.minimum: lambda args, kwargs: [args[0] < args[1]],
    aten.abs: _sign, aten.abs_: _sign,
    aten.max_pool2d: _winners(aten.max_pool2d_with_indices), aten.max_pool3d: _winners(aten.max_pool3d_with_indices),
}


class _Choices(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.record: list[Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        chosen = PIECEWISE.get(func.overloadpacket)
        if chosen is not None:
            # Before the call: an in-place op (relu_) overwrites its input.
            self.record.extend(t.detach().clone() for t in chosen(args, kwargs))
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and not (t.is_floating_point() or t.is_complex()):
                self.record.append(t.detach().clone())   # comparisons, indices
        return out


def choices(model: nn.Module, inputs: Tensor) -> list[Tensor]:
    """The choices of `model`'s forward pass on `inputs`, in the order its ops ran."""
    mode = _Choices()
    with torch.enable_grad(), mode:
        model(inputs)
    return mode.record


def same_piece(first: list[Tensor], second: list[Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))
