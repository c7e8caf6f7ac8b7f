"""BatchNorm in train mode couples the samples of a batch; these make a pass per-sample again.

The student's one-pass route (gated BatchNorm, engine/layers.py) covers nn.BatchNorm1d/2d/3d. A
separate per-sample pass is used for `jacobian.batchnorm=running`, for `strategy=func`, for the
feature Jacobian, and for BatchNorm layers that are not converted (SyncBatchNorm, subclasses with a
forward of their own): `per_sample_batchnorm` normalises with given statistics there, and no
running statistics are updated inside it.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
from torch import Tensor, nn

from jacdistill_cli.engine.layers import GATED_BATCHNORMS, affine, gate_of, unconverted_batchnorm
from jacdistill_cli.errors import UsageError

BATCHNORM_MODES = ("batch", "running", "coupled")

BatchStatistics = dict[nn.Module, list[tuple[Tensor, Tensor]]]


def training_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def has_training_batchnorm(model: nn.Module) -> bool:
    return bool(training_batchnorms(model))


def can_gate_batchnorm(model: nn.Module) -> bool:
    """Whether every train-mode BatchNorm of the model is a converted one (one pass serves both terms)."""
    return gate_of(model) is not None and all(isinstance(m, GATED_BATCHNORMS) for m in training_batchnorms(model))


def _channel_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


@contextlib.contextmanager
def recorded_batchnorm_statistics(model: nn.Module) -> Iterator[BatchStatistics]:
    """Record, for each train-mode BatchNorm, the mean and (biased) variance of the batch it
    normalises, in call order: the statistics BatchNorm uses, differentiable with respect to the
    parameters of the layers before it. Yields {module: [(mean, variance), ...]}, filled by forward
    passes run inside the context (forward pre-hooks; the module's own forward is unchanged)."""
    statistics: BatchStatistics = {}

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0]
        variance, mean = torch.var_mean(x, dim=_channel_dims(x), unbiased=False)
        statistics.setdefault(module, []).append((mean, variance))

    handles = [m.register_forward_pre_hook(record) for m in training_batchnorms(model)]
    try:
        yield statistics
    finally:
        for handle in handles:
            handle.remove()


def running_batchnorm_statistics(model: nn.Module) -> BatchStatistics:
    """A copy of the running mean and variance of each train-mode BatchNorm, taken now."""
    statistics: BatchStatistics = {}
    for m in training_batchnorms(model):
        if m.running_mean is None or m.running_var is None:
            raise ValueError(f"{type(m).__name__} keeps no running statistics (track_running_stats=False)")
        statistics[m] = [(m.running_mean.detach().clone(), m.running_var.detach().clone())]
    return statistics


@contextlib.contextmanager
def batchnorm_buffers_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics as they were before the context: a train-mode pass inside it
    updates copies. (The buffers are swapped, not restored in place: an earlier pass may keep them
    for its backward, and an in-place write would invalidate that graph.)"""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    originals = [dict(m.named_buffers(recurse=False)) for m in norms]
    for m, buffers in zip(norms, originals):
        for name, buffer in buffers.items():
            setattr(m, name, buffer.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, originals):
            for name, buffer in buffers.items():
                setattr(m, name, buffer)


@contextlib.contextmanager
def _held_by_hooks(norms: list[nn.Module], statistics: BatchStatistics) -> Iterator[None]:
    """For BatchNorm layers that are not converted: a forward hook replaces the output by the one
    normalised with the given statistics; the layer's own pass updates copies of its buffers."""
    calls = {m: itertools.cycle(statistics[m]) for m in norms}
    handles = []
    for m in norms:
        handles.append(m.register_forward_hook(
            lambda module, args, output: affine(module, args[0], *next(calls[module]))))
    try:
        with contextlib.ExitStack() as stack:
            for m in norms:
                stack.enter_context(batchnorm_buffers_kept(m))
            yield
    finally:
        for handle in handles:
            handle.remove()


def refuse_unconverted(model: nn.Module, norms: list[nn.Module] | None, mode: str) -> None:
    """One line naming the first of `norms` (None: every BatchNorm of the model, for a check before training)
    that is a BatchNorm subclass whose forward does more than BatchNorm (its output cannot be rebuilt from
    given statistics, so its per-sample Jacobian in train mode would be wrong), and what to do. Nothing to
    refuse for `coupled`."""
    if mode == "coupled":
        return
    if norms is None:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    odd = [m for m in norms if unconverted_batchnorm(m)]
    if not odd:
        return
    name = next(n for n, m in model.named_modules() if m is odd[0])
    parent = next(b for b in type(odd[0]).__mro__ if b.__module__.startswith("torch.nn."))
    raise UsageError(f"module {name!r} ({type(odd[0]).__module__}.{type(odd[0]).__qualname__}) is a subclass of "
                     f"nn.{parent.__name__} with a forward of its own: its per-sample Jacobian in "
                     f"train mode (jacobian.batchnorm={mode}) cannot be formed from BatchNorm's statistics; use "
                     "jacobian.batchnorm=coupled (the batch as one function), put that module in eval mode "
                     "(running statistics), or build the model with nn.BatchNorm layers")


@contextlib.contextmanager
def per_sample_batchnorm(model: nn.Module, mode: str, statistics: BatchStatistics | None = None) -> Iterator[None]:
    """Make the model's forward pass a per-sample function while BatchNorm is in train mode.

    `batch`: normalise with the batch statistics recorded by `recorded_batchnorm_statistics`
    during the train-mode pass of the same batch (outputs equal the train-mode ones; sample i's
    Jacobian does not depend on the other samples). `running`: normalise with the running
    statistics given (see `running_batchnorm_statistics`), else the current ones (eval mode).
    `coupled`: BatchNorm as it is. Running statistics are never updated inside this context.
    """
    norms = training_batchnorms(model)
    if mode == "coupled" or not norms:
        yield
        return
    if mode not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm mode must be one of {', '.join(BATCHNORM_MODES)}, got {mode!r}")
    if mode == "running" and statistics is None:
        for m in norms:
            m.eval()
        try:
            yield
        finally:
            for m in norms:
                m.train()
        return
    missing = [m for m in norms if m not in (statistics or {})]
    if missing:
        raise ValueError("per_sample_batchnorm(mode='batch') needs the statistics recorded by a train-mode "
                         f"forward pass of the same batch; none for {type(missing[0]).__name__}")
    gate = gate_of(model)
    converted = [m for m in norms if gate is not None and isinstance(m, GATED_BATCHNORMS)]
    others = [m for m in norms if m not in converted]
    refuse_unconverted(model, others, mode)
    with contextlib.ExitStack() as stack:
        if converted:
            stack.enter_context(gate.holding({m: statistics[m] for m in converted}))
        if others:
            stack.enter_context(_held_by_hooks(others, statistics))
        yield
