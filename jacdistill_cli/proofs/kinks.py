"""Which piece of a piecewise network an input lies on.

A network with ReLUs and max pooling is piecewise smooth: its one-sided derivative along xi at x describes
D(x + s xi) only for s up to the first kink on the segment, where a ReLU changes sign or a max-pooling window
changes its winner. `choices` records, torch function by torch function (a TorchFunctionMode: F.relu,
Tensor.clamp, the comparison operators, ...), the choices one forward pass makes: which side of its kinks each
input of a ReLU-like function lies on, the winner of each max pooling, and every boolean or index tensor a
function returns (the comparisons of a hand-written ReLU, argmax, top-k). Two inputs with equal records lie
on one piece, up to a kink crossed and crossed back between them, which is not looked for.

The forward pass runs with gradients enabled, so that fused inference paths (nn.TransformerEncoderLayer's
fast path) that hide their activations in one op are not taken.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


def _argument(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _above(threshold: Any = 0.0, position: int | None = None, name: str = "") -> Callable[[tuple, dict], list]:
    """Which entries of the input lie above a fixed threshold, or above the call's own (its argument)."""
    def chosen(args: tuple, kwargs: dict) -> list[Tensor]:
        bound = threshold if position is None else _argument(args, kwargs, position, name, threshold)
        return [args[0] > bound]
    return chosen


def _between(low: tuple[int, str, Any], high: tuple[int, str, Any]) -> Callable[[tuple, dict], list]:
    """clamp and its kind: which entries lie above the lower bound and which below the upper."""
    def chosen(args: tuple, kwargs: dict) -> list[Tensor]:
        x, record = args[0], []
        lower, upper = _argument(args, kwargs, *low), _argument(args, kwargs, *high)
        if lower is not None:
            record.append(x > lower)
        if upper is not None:
            record.append(x < upper)
        return record
    return chosen


def _sign(args: tuple, kwargs: dict) -> list[Tensor]:
    return [args[0] > 0, args[0] < 0]


def _extreme(larger: bool) -> Callable[[tuple, dict], list]:
    """max/min and maximum/minimum: which operand wins elementwise, or the whole tensor's winner."""
    def chosen(args: tuple, kwargs: dict) -> list[Tensor]:
        x, other = args[0], _argument(args, kwargs, 1, "other")
        if isinstance(other, Tensor):
            return [x > other if larger else x < other]
        if other is None and "dim" not in kwargs:
            return [x.flatten().argmax() if larger else x.flatten().argmin()]
        return []                                      # max(x, dim): its indices are an output
    return chosen


def _winners(with_indices: Callable) -> Callable[[tuple, dict], list]:
    """Max pooling: its winners, from the same pooling with indices."""
    def chosen(args: tuple, kwargs: dict) -> list[Tensor]:
        kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
        return [with_indices(*args[:6], **kwargs)[1]]     # a 7th positional argument is return_indices
    return chosen


NO_BOUND = (99, "", None)   # an argument no call has: no bound on that side
# By the torch function's name, which F.relu, torch.relu and Tensor.relu share.
PIECEWISE: dict[str, Callable[[tuple, dict], list]] = {
    **dict.fromkeys(["relu", "relu_", "leaky_relu", "leaky_relu_", "rrelu", "rrelu_"], _above()),
    **dict.fromkeys(["threshold", "threshold_"], _above(0.0, 1, "threshold")),
    **dict.fromkeys(["clamp", "clamp_", "clip", "clip_"], _between((1, "min", None), (2, "max", None))),
    **dict.fromkeys(["clamp_min", "clamp_min_"], _between((1, "min", None), NO_BOUND)),
    **dict.fromkeys(["clamp_max", "clamp_max_"], _between(NO_BOUND, (1, "max", None))),
    **dict.fromkeys(["hardtanh", "hardtanh_"], _between((1, "min_val", -1.0), (2, "max_val", 1.0))),
    "relu6": lambda args, kwargs: [args[0] > 0, args[0] < 6],
    **dict.fromkeys(["abs", "abs_", "__abs__", "absolute"], _sign),
    **dict.fromkeys(["max", "maximum", "fmax"], _extreme(True)),
    **dict.fromkeys(["min", "minimum", "fmin"], _extreme(False)),
    "max_pool1d": _winners(F.max_pool1d_with_indices), "max_pool2d": _winners(F.max_pool2d_with_indices),
    "max_pool3d": _winners(F.max_pool3d_with_indices),
    "adaptive_max_pool1d": _winners(F.adaptive_max_pool1d_with_indices),
    "adaptive_max_pool2d": _winners(F.adaptive_max_pool2d_with_indices),
    "adaptive_max_pool3d": _winners(F.adaptive_max_pool3d_with_indices),
}


class _Choices(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.record: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        chosen = PIECEWISE.get(getattr(func, "__name__", ""))
        if chosen is not None and args and isinstance(args[0], Tensor):
            # Before the call: an in-place op (relu_) overwrites its input.
            with torch.no_grad():
                self.record.extend(t.detach().clone() for t in chosen(args, kwargs))
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and not (t.is_floating_point() or t.is_complex()):
                self.record.append(t.detach().clone())   # comparisons, indices
        return out


def choices(model: nn.Module, inputs: Tensor) -> list[Tensor]:
    """The choices of `model`'s forward pass on `inputs`, in the order its torch functions ran."""
    mode = _Choices()
    with torch.enable_grad(), mode:
        model(inputs)
    return mode.record


def same_piece(first: list[Tensor], second: list[Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))
