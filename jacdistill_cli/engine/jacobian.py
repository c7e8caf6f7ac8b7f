"""Per-sample input-gradients of a classifier, as small pure functions.

Most functions here take `logits` of shape [batch, classes] that were computed from `inputs`
(a leaf tensor with requires_grad=True, shape [batch, *input]) and return per-sample
input-gradients. `create_graph=True` keeps the result inside the autograd graph, so a loss built
from it trains the parameters (the student's side); `create_graph=False` returns a constant (the
frozen teacher's side). `retain_graph=True` alone is not enough: the result is then a constant
and a loss built from it trains nothing.

The result is per-sample only when no layer couples the samples of the batch: BatchNorm in train
mode does, and `per_sample_batchnorm` makes the forward pass per-sample again.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

# How `exact` (and `projected` with several projections) runs its backward passes.
EXACT_STRATEGIES = ("auto", "loop", "batched", "func")
BATCHNORM_MODES = ("batch", "running", "coupled")


def vector_jacobian_products(logits: Tensor, inputs: Tensor, vectors: Tensor, create_graph: bool,
                             strategy: str = "loop") -> Tensor:
    """v_k[b]^T J[b] for each of K vectors per sample.

    logits [batch, classes], inputs [batch, *input], vectors [K, batch, classes] -> [K, batch, *input].
    `loop` runs K backward passes; `batched` runs them as one vectorised backward pass
    (`is_grads_batched`). Both give the same numbers; which is faster depends on the device and
    the layers (see `resolve_strategy`).
    """
    if vectors.shape[0] == 1 or strategy == "loop":
        rows = [torch.autograd.grad(logits, inputs, grad_outputs=v, create_graph=create_graph, retain_graph=True)[0]
                for v in vectors]
        return torch.stack(rows)
    if strategy == "batched":
        (grads,) = torch.autograd.grad(logits, inputs, grad_outputs=vectors, is_grads_batched=True,
                                       create_graph=create_graph, retain_graph=True)
        return grads
    raise ValueError(f"vector_jacobian_products: strategy must be 'loop' or 'batched', got {strategy!r}")


def class_gradients(logits: Tensor, inputs: Tensor, classes: Tensor, create_graph: bool) -> Tensor:
    """d logits[b, classes[b]] / d inputs[b] for every sample b.

    logits [batch, classes], inputs [batch, *input], classes [batch] (long) -> [batch, *input].
    """
    return vector_jacobian_products(logits, inputs, one_hot_vectors(classes, logits), create_graph)[0]


def one_hot_vectors(classes: Tensor, logits: Tensor) -> Tensor:
    """classes [batch] (long) -> one-hot vectors [1, batch, classes] in the dtype of logits."""
    vectors = torch.zeros(1, *logits.shape, dtype=logits.dtype, device=logits.device)
    return vectors.scatter_(2, classes.view(1, -1, 1), 1.0)


def basis_vectors(logits: Tensor) -> Tensor:
    """The standard basis of the output space, for every sample: [classes, batch, classes]."""
    batch, classes = logits.shape
    eye = torch.eye(classes, dtype=logits.dtype, device=logits.device)
    return eye.unsqueeze(1).expand(classes, batch, classes)


def full_jacobian(logits: Tensor, inputs: Tensor, create_graph: bool, strategy: str = "loop") -> Tensor:
    """The whole per-sample Jacobian d logits[b, c] / d inputs[b].

    logits [batch, classes], inputs [batch, *input] -> [batch, classes, *input].
    """
    return vector_jacobian_products(logits, inputs, basis_vectors(logits), create_graph, strategy).movedim(0, 1)


def func_jacobian(forward: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    """Per-sample Jacobians by `torch.func.vmap(torch.func.jacrev(forward))`.

    inputs [batch, *input] -> [batch, classes, *input]. `forward` maps [n, *input] to [n, classes]
    and must treat samples independently (no train-mode BatchNorm computing its own statistics).
    Parameters are used as they are, so the result stays differentiable with respect to them by
    ordinary autograd.
    """

    def single(x: Tensor) -> Tensor:
        return forward(x.unsqueeze(0)).squeeze(0)

    return torch.func.vmap(torch.func.jacrev(single))(inputs)


def has_convolution(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def resolve_strategy(requested: str, model: nn.Module, device: torch.device) -> str:
    """The backward strategy for one network: `requested` unless it is `auto`.

    `auto` is a fixed rule, so that the same config gives the same numbers: on a GPU one
    vectorised backward pass (`batched`: one launch instead of one per class); on a CPU
    `batched` as well for networks without convolutions (batched matrix products are
    efficient), but `loop` for convolutional ones, whose vectorised backward passes run as slow
    grouped convolutions on a CPU. `jacdistill bench` measures the rule against the fixed strategies.
    """
    if requested != "auto":
        return requested
    if device.type == "cpu" and has_convolution(model):
        return "loop"
    return "batched"


def matching_distance(student: Tensor, teacher: Tensor, normalize: bool, squared: bool) -> Tensor:
    """Per-sample distance between student and teacher gradients, flattened after the batch dim.

    student, teacher [batch, ...] -> [batch]. With `normalize`, each sample's flattened gradient
    is divided by its l2 norm; a zero gradient has no direction and stays zero, with a zero
    gradient (finite, never NaN). `squared` gives the squared l2 distance; otherwise the plain l2
    distance, whose gradient at a zero distance is 0.
    """
    s = student.reshape(student.shape[0], -1)
    t = teacher.reshape(teacher.shape[0], -1)
    if normalize:
        s = unit_rows(s)
        t = unit_rows(t)
    squared_distance = (s - t).pow(2).sum(dim=1)
    if squared:
        return squared_distance
    return safe_sqrt(squared_distance)


def unit_rows(rows: Tensor) -> Tensor:
    """rows [n, d] divided by their l2 norms; zero rows stay zero and pass no gradient."""
    norms = rows.norm(dim=1, keepdim=True)   # its gradient at a zero row is 0, not NaN
    # 1/norm where the norm is positive, else 0; the division never sees a zero, so no NaN
    # gradient can leak from a discarded branch.
    inverse = (norms > 0).to(rows.dtype) / norms.clamp_min(torch.finfo(rows.dtype).tiny)
    return rows * inverse


def safe_sqrt(values: Tensor) -> Tensor:
    """sqrt with gradient 0 instead of infinity at 0."""
    positive = values > 0
    safe = torch.where(positive, values, torch.ones_like(values))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(values))


# ---------------------------------------------------------------------------------------------
# BatchNorm in train mode
# ---------------------------------------------------------------------------------------------

def training_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def has_training_batchnorm(model: nn.Module) -> bool:
    return bool(training_batchnorms(model))


def _channel_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


BatchStatistics = dict[nn.Module, list[tuple[Tensor, Tensor]]]


@contextlib.contextmanager
def recorded_batchnorm_statistics(model: nn.Module) -> Iterator[BatchStatistics]:
    """Record, for each train-mode BatchNorm, the mean and (biased) variance of the batch it
    normalises, in call order. They are the statistics BatchNorm uses, and they stay
    differentiable with respect to the parameters of the layers before it.

    Yields {module: [(mean [channels], variance [channels]), ...]}, filled by forward passes run
    inside the context. The module's own forward (and its running statistics) is unchanged.
    """
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


def _held_forward(module: nn.modules.batchnorm._BatchNorm, recorded: list[tuple[Tensor, Tensor]]):
    # A module called k times per forward pass recorded k statistics; every forward pass run
    # inside the context (the Jacobian pass, torch.func's trace) uses them in the same order.
    calls = itertools.cycle(recorded)

    def forward(x: Tensor) -> Tensor:
        mean, variance = next(calls)
        scale = torch.rsqrt(variance + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        shift = -mean * scale
        if module.bias is not None:
            shift = shift + module.bias
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x, scale.view(shape))

    return forward


def running_batchnorm_statistics(model: nn.Module) -> BatchStatistics:
    """A copy of the running mean and variance of each train-mode BatchNorm, taken now: for
    `per_sample_batchnorm(mode='running')` after a train-mode pass has updated them."""
    statistics: BatchStatistics = {}
    for m in training_batchnorms(model):
        if m.running_mean is None or m.running_var is None:
            raise ValueError(f"{type(m).__name__} keeps no running statistics (track_running_stats=False)")
        statistics[m] = [(m.running_mean.detach().clone(), m.running_var.detach().clone())]
    return statistics


@contextlib.contextmanager
def per_sample_batchnorm(model: nn.Module, mode: str, statistics: BatchStatistics | None = None) -> Iterator[None]:
    """Make the model's forward pass a per-sample function while BatchNorm is in train mode.

    `batch`: normalise with the batch statistics recorded by `recorded_batchnorm_statistics`
    during the train-mode forward pass of the same batch: the outputs equal the train-mode ones,
    but sample i's Jacobian does not depend on the other samples (the statistics are constants
    with respect to the inputs, and still functions of the parameters).
    `running`: normalise with running statistics, as in eval mode: the ones given (see
    `running_batchnorm_statistics`), else the current ones.
    `coupled`: leave BatchNorm as it is (the Jacobian then mixes the samples of the batch).
    Running statistics are never updated inside this context.
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
    for m in norms:
        m.forward = _held_forward(m, statistics[m])
    try:
        yield
    finally:
        for m in norms:
            del m.forward


# One forward pass for both: train-mode BatchNorm whose statistics are constants for input-gradients.

_statistics_closed = 0   # > 0 inside `statistics_closed()`; global, as a backward pass may run on another thread


class _BatchNormScale(torch.autograd.Function):
    """weight / sqrt(var(x) + eps) per channel, from the mean and 1/std that BatchNorm's forward
    saved (no pass over x), differentiable in x and weight: d(1/std)/dx = -(x - mean) / (n std^3)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, mean, invstd)
        return invstd * weight if weight is not None else invstd.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        grad_invstd = grad * weight if weight is not None else grad
        count = x.numel() // x.shape[1]
        coefficient = (-grad_invstd * invstd.pow(3) / count).view(shape)
        grad_x = (x - mean.view(shape)) * coefficient if ctx.needs_input_grad[0] else None
        grad_weight = grad * invstd if weight is not None and ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None, None


class _GatedBatchNorm(torch.autograd.Function):
    """Train-mode BatchNorm (PyTorch's fused kernels) whose backward has two modes.

    Ordinarily its backward is nn.BatchNorm's: the statistics are functions of the batch.
    Inside `statistics_closed()` it returns the input-gradient of the per-sample function that
    holds the batch statistics constant, grad * weight / std, with std differentiable in the
    saved input (`_BatchNormScale`): the input-gradients are per-sample, and a loss built from
    them still sees the statistics as the functions of the parameters they are.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, module: nn.Module,
                momentum: float) -> Tensor:
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, module.running_mean, module.running_var,
                                                    True, momentum, module.eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = module.eps
        ctx.scale = None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        if _statistics_closed:
            if ctx.scale is None or ctx.scale_graph != torch.is_grad_enabled():
                # Once per forward pass, shared by every input-gradient taken from it.
                scale = _BatchNormScale.apply(x, weight, mean, invstd)
                ctx.scale, ctx.scale_graph = scale.view([1, -1] + [1] * (x.dim() - 2)), torch.is_grad_enabled()
            return grad * ctx.scale, None, None, None, None
        needs = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, [needs[0], needs[1], needs[2]])
        return grad_x, grad_weight, grad_bias, None, None


# The BatchNorm layers `jacobian_forward` can gate; others (SyncBatchNorm, ...) take the separate
# per-sample pass of `per_sample_batchnorm`.
GATED_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def can_gate_batchnorm(model: nn.Module) -> bool:
    return all(type(m) in GATED_BATCHNORMS for m in training_batchnorms(model))


@contextlib.contextmanager
def statistics_closed() -> Iterator[None]:
    """Input-gradients taken inside see gated BatchNorm statistics as constants."""
    global _statistics_closed
    _statistics_closed += 1
    try:
        yield
    finally:
        _statistics_closed -= 1


def _gated_forward(module: nn.modules.batchnorm._BatchNorm):
    def forward(x: Tensor) -> Tensor:
        module._check_input_dim(x)
        momentum = 0.0 if module.momentum is None else module.momentum
        if module.track_running_stats and module.num_batches_tracked is not None:
            module.num_batches_tracked.add_(1)
            if module.momentum is None:   # a cumulative moving average, as nn.BatchNorm does
                momentum = 1.0 / float(module.num_batches_tracked)
        return _GatedBatchNorm.apply(x, module.weight, module.bias, module, momentum)

    return forward


class _ReLU(torch.autograd.Function):
    """ReLU whose backward multiplies by a constant mask. Autograd's own backward also
    differentiates the mask by the activation, a derivative that is zero everywhere it exists,
    so differentiating an input-gradient twice would fill and add tensors of zeros."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out.detach(), 0)


class _MaxPool2d(torch.autograd.Function):
    """2-d max pooling whose backward routes by constant indices (as `_ReLU`, no derivative of
    the routing by the input, which is zero where it exists)."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool) -> Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(x, indices)
        ctx.settings = (kernel, stride, padding, dilation, ceil_mode)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x.detach(), *ctx.settings, indices)
        return grad_x, None, None, None, None, None


class _InputConv2d(torch.autograd.Function):
    """A convolution of the network's input itself. Its input-gradient is computed only inside
    `statistics_closed()`, where the Jacobian is taken; the loss's backward pass, later, needs only
    the weight's gradient (nothing asks for the input's), and for an image of few channels that
    input-gradient costs more than the forward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.settings = (list(stride), list(padding), list(dilation), groups)
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.settings
        needs = ctx.needs_input_grad
        if _statistics_closed:
            mask = [needs[0], False, False]
        else:
            mask = [False, needs[1], needs[2] and ctx.bias_sizes is not None]
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, weight, ctx.bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _input_conv_forward(module: nn.Conv2d, inputs: Tensor):
    original = module.forward

    def forward(x: Tensor) -> Tensor:
        if x is not inputs:
            return original(x)
        return _InputConv2d.apply(x, module.weight, module.bias, module.stride, module.padding, module.dilation,
                                  module.groups)

    return forward


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _relu_forward(module: nn.ReLU):
    return lambda x: _ReLU.apply(x)


def _max_pool_forward(module: nn.MaxPool2d):
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    settings = (kernel, stride, _pair(module.padding), _pair(module.dilation), bool(module.ceil_mode))
    return lambda x: _MaxPool2d.apply(x, *settings)


@contextlib.contextmanager
def jacobian_forward(model: nn.Module, gate_batchnorm: bool, inputs: Tensor | None = None) -> Iterator[None]:
    """A forward pass of the student prepared for input-gradients that are differentiated again.

    nn.ReLU and nn.MaxPool2d modules compute the same values and gradients with backward passes
    that are cheaper to differentiate (see `_ReLU`). An nn.Conv2d applied to `inputs` itself (the
    leaf the Jacobian is taken with respect to) computes its input-gradient only where the
    Jacobian is taken (`_InputConv2d`). With `gate_batchnorm`, train-mode
    BatchNorm layers become `_GatedBatchNorm`: a forward pass inside gives the train-mode outputs
    and updates the running statistics as usual; its input-gradients taken inside
    `statistics_closed()` are the per-sample ones of `per_sample_batchnorm(mode='batch')`, and
    every other backward pass is the ordinary one. One forward pass then serves the
    distillation term and the Jacobian term.
    """
    swapped = []
    for m in model.modules():
        if type(m) is nn.ReLU:
            m.forward = _relu_forward(m)
        elif type(m) is nn.MaxPool2d and not m.return_indices:
            m.forward = _max_pool_forward(m)
        elif gate_batchnorm and type(m) in GATED_BATCHNORMS and m.training:
            m.forward = _gated_forward(m)
        elif (inputs is not None and type(m) is nn.Conv2d and m.padding_mode == "zeros"
              and not isinstance(m.padding, str)):
            m.forward = _input_conv_forward(m, inputs)
        else:
            continue
        swapped.append(m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


def _affine_forward(module: nn.modules.batchnorm._BatchNorm):
    def forward(x: Tensor) -> Tensor:
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x, scale.view(shape))

    return forward


@contextlib.contextmanager
def affine_batchnorm(model: nn.Module) -> Iterator[None]:
    """Eval-mode BatchNorm layers computed as the per-channel affine maps they are: the same
    values, and an input-gradient of one multiplication, where nn.BatchNorm's backward runs its
    general kernel (for the frozen teacher's input-gradients)."""
    swapped = [m for m in model.modules() if type(m) in GATED_BATCHNORMS and not m.training
               and m.running_mean is not None and m.running_var is not None]
    for m in swapped:
        m.forward = _affine_forward(m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward

