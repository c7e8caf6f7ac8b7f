"""One finite-difference checker for every proof: autograd's derivative of a term against central
differences in float64, along random directions in the parameters."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

FD_STEP = 1e-6
FD_TRIES = 3                   # a step that crosses a ReLU kink is redrawn
# What central differences in float64 resolve, per unit of max(1, |term|): rounding of the term's two values
# gives about eps * |term| / FD_STEP = 2.2e-10 |term|; a margin of 4.5. A derivative that is small against the
# term (a LayerNorm bias deep in a transformer: 7e-6 against a term of 2) disagrees by that much, relatively
# far above any relative tolerance, without anything being wrong.
FD_ROUNDING = 1e-9
# The smallest derivative the checks count as one, per unit of max(1, |term|): ten times FD_ROUNDING. Below it, a
# parameter is "without effect" on a term, a derivative and its central difference both "zero", two central
# differences along one direction "equal", and a network's input-gradients "vanish" (proofs/vanishing.py).
DERIVATIVE_RESOLUTION = 1e-8


def resolution(scale: float) -> float:
    """The smallest derivative the checks resolve on a term (or output) of magnitude `scale`."""
    return DERIVATIVE_RESOLUTION * max(1.0, scale)


def analytic_gradients(term: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    """d term / d params, zeros where the graph does not reach a parameter (or does not exist)."""
    if not term.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(term, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def central_difference(value: Callable[[], float], params: list[nn.Parameter], directions: list[Tensor],
                       step: float) -> float:
    """(value(params + step d) - value(params - step d)) / (2 step); the parameters are restored."""
    originals = [p.detach().clone() for p in params]

    def at(scale: float) -> float:
        with torch.no_grad():
            for p, original, d in zip(params, originals, directions):
                p.copy_(original + scale * d)
        return value()

    try:
        return (at(step) - at(-step)) / (2 * step)
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)


def random_directions(params: list[nn.Parameter], generator: torch.Generator) -> list[Tensor]:
    """One Gaussian direction over all of `params`, of unit total norm."""
    directions = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum(d.pow(2).sum() for d in directions))
    return [d / norm for d in directions]


def directional_check(value: Callable[[], float], params: list[nn.Parameter], gradients: list[Tensor],
                      generator: torch.Generator, scale: float) -> tuple[float, float, float]:
    """(analytic, numeric, relative error) of the derivative along a random direction.

    The term of a ReLU network jumps where an activation pattern changes; a step that crosses
    such a kink shows as central differences that disagree between two step sizes, and the
    direction is redrawn.
    """
    atol = resolution(scale)
    for _ in range(FD_TRIES):
        directions = random_directions(params, generator)
        analytic = float(sum((g * d).sum() for g, d in zip(gradients, directions)))
        numeric = central_difference(value, params, directions, FD_STEP)
        half = central_difference(value, params, directions, FD_STEP / 2)
        if abs(numeric - half) <= 1e-4 * max(abs(numeric), abs(half)) + atol:
            break
    error = abs(analytic - numeric) / (max(abs(analytic), abs(numeric)) + atol)
    return analytic, numeric, error


def beyond_rounding(analytic: float, numeric: float, scale: float) -> bool:
    """Whether autograd's and central differences' derivatives differ by more than float64 resolves."""
    return abs(analytic - numeric) > FD_ROUNDING * max(1.0, scale)
