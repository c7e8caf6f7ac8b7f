"""Jacobian-ready layers, put in place once when a model is built (`make_jacobian_ready`).

A Jacobian term differentiates an input-gradient a second time, and with BatchNorm in train mode it
needs per-sample input-gradients from a batch-coupled forward pass. Plain layers give the right
numbers but waste work on it; these subclasses of nn.ReLU, nn.MaxPool2d, nn.BatchNorm1d/2d/3d,
nn.Conv2d and nn.MultiheadAttention keep their parameters, buffers and `state_dict` keys (checkpoints stay compatible) and
behave exactly like their parents unless the model's `JacobianGate` is open:

- inside `gate.forward_pass(...)` (the objective's forward pass of a step):
  ReLU and MaxPool2d run with backward passes that skip their second derivatives (zero wherever
  they exist, but computed and added as tensors of zeros by autograd); with `batchnorm=True`,
  train-mode BatchNorm runs PyTorch's fused kernels with a backward that has two modes (below);
  eval-mode BatchNorm runs as the per-channel affine map it is (an input-gradient of one
  multiplication); a Conv2d applied to the pass's `inputs` itself computes its input-gradient only
  where the Jacobian is taken (a patch embedding's, kernel = stride, by matrix products: a CPU's
  convolution kernels take several times longer for it); attention (nn.MultiheadAttention's
  self-attention without a mask, F.scaled_dot_product_attention called without one) runs
  `double_backward.attention`, whose double backward is written by hand.
- inside `gate.forward_pass(activations=False)` (the teacher's pass of a step, whose input-gradient is
  taken once): nn.MultiheadAttention's self-attention runs its projections around the fused kernel
  without F.multi_head_attention_forward's copies of q, k and v, and the convolution of the pass's
  input leaf is the input convolution (a patch embedding's input-gradient by matrix products).
- inside `gate.jacobians()` (the input-gradients of the step): BatchNorm's input-gradient is the one
  of the per-sample function that holds the batch statistics constant (still functions of the
  parameters), and the input convolution computes its input-gradient.
- in the backward pass of a loss wrapped by `gate.loss(total)`: the input convolution computes no
  input-gradient (nothing reads the gradient of the input batch).
- inside `gate.holding(statistics)`: BatchNorm normalises with the given statistics (a separate
  per-sample pass; see engine/batchnorm.py).
- attention, in a second-order pass (the student's gated pass, whose input-gradient stays in the
  graph, and the forward passes of strategy=func inside `gate.jacobians()`; `gate.second_order_pass()`
  for a pass outside them, such as a feature Jacobian): the fused
  attention kernels (flash, memory-efficient, the CPU flash kernel) have no double backward. Inside
  the gated pass attention runs `double_backward.attention` (above); in the others
  nn.MultiheadAttention takes its own explicit path (`need_weights=True`, the weights dropped when
  not asked for) and a module with timm's `fused_attn` switch its explicit one. Any call of
  F.scaled_dot_product_attention made in this thread while a second-order pass lasts goes to
  `double_backward.attention` (in the gated pass, without a mask) or to the math kernel
  (`MathAttention`, a TorchFunctionMode: the mode stack is per-thread, so a model running in another
  thread keeps the fused kernels). The teacher's pass, evaluation and a plain KD step never open a
  second-order pass and keep the fused kernels.

Everywhere else the input-gradient of a converted model is the true one. The gate belongs to the
model (two models, two gates: objectives in two threads do not meet), and no `forward` is ever
assigned: the choice is made inside each layer's own forward.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from types import MappingProxyType
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Variable
from torch.overrides import TorchFunctionMode

from jacdistill_cli.engine import double_backward


class JacobianGate:
    """The state one model's Jacobian-ready layers read: set by the objective, per model."""

    def __init__(self) -> None:
        self.active = False          # inside an objective's forward pass
        self.activations = False     # cheaper ReLU / MaxPool2d backward passes
        self.batchnorm = False       # train-mode BatchNorm gated (one pass for both terms)
        self.inputs: Tensor | None = None   # the leaf the Jacobian is taken with respect to
        self.closed = 0              # > 0: backward passes inside jacobians()
        self.loss_backward = 0       # > 0: the backward pass of a loss wrapped by loss()
        self.held: dict[nn.Module, Iterator[tuple[Tensor, Tensor]]] = {}
        self.second_order = False    # attention on kernels with a double backward

    def __deepcopy__(self, memo) -> "JacobianGate":
        return JacobianGate()   # a copied model gets a closed gate of its own

    @contextlib.contextmanager
    def forward_pass(self, inputs: Tensor | None = None, batchnorm: bool = False,
                     activations: bool = True, second_order: bool | None = None) -> Iterator[None]:
        """The objective's forward pass. `second_order` (default: `activations`, which only a pass whose
        input-gradient is differentiated again asks for): attention on kernels with a double backward."""
        saved = (self.active, self.activations, self.batchnorm, self.inputs)
        self.active, self.activations, self.batchnorm, self.inputs = True, activations, batchnorm, inputs
        try:
            with self.second_order_pass(activations if second_order is None else second_order):
                yield
        finally:
            self.active, self.activations, self.batchnorm, self.inputs = saved

    @contextlib.contextmanager
    def second_order_pass(self, enabled: bool = True) -> Iterator[None]:
        """Attention in this model, and every F.scaled_dot_product_attention called in this thread, on
        kernels with a double backward while the context lasts (a pass whose input-gradient is taken with
        create_graph=True). Other threads are not affected."""
        if not enabled or self.second_order:
            yield
            return
        self.second_order = True
        try:
            with MathAttention(self):
                yield
        finally:
            self.second_order = False

    @contextlib.contextmanager
    def jacobians(self) -> Iterator[None]:
        """The input-gradients of a step. A forward pass run inside (strategy=func's, under torch.func) is one
        whose input-gradient the term differentiates again: a second-order pass."""
        self.closed += 1
        try:
            with self.second_order_pass():
                yield
        finally:
            self.closed -= 1

    @contextlib.contextmanager
    def holding(self, statistics: dict[nn.Module, list[tuple[Tensor, Tensor]]]) -> Iterator[None]:
        # A module called k times per pass recorded k statistics; every pass inside uses them in order.
        saved = self.held
        self.held = {m: itertools.cycle(s) for m, s in statistics.items()}
        try:
            yield
        finally:
            self.held = saved

    def loss(self, total: Tensor) -> Tensor:
        """`total` itself, whose backward pass tells the input convolution to skip the input's gradient."""
        return _LossRoot.apply(total, self) if total.requires_grad else total


class _LossRoot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, total: Tensor, gate: JacobianGate) -> Tensor:
        ctx.gate = gate
        return total.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate = ctx.gate
        gate.loss_backward += 1

        def leave() -> None:
            gate.loss_backward -= 1

        Variable._execution_engine.queue_callback(leave)   # when this backward pass ends
        return grad, None


def gate_of(model: nn.Module) -> JacobianGate | None:
    """The gate of a converted model (or of the model a wrapper such as DDP holds), else None."""
    for module in model.modules():
        gate = module.__dict__.get("jacobian_gate")
        if gate is not None:
            return gate
    return None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def math_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> Tensor:
    """F.scaled_dot_product_attention on PyTorch's math kernel (matmul, softmax, dropout: a double
    backward), as sdpa_kernel(SDPBackend.MATH) would pick it, without its process-wide flags.
    query [..., L, E], key [..., S, E], value [..., S, Ev] -> [..., L, Ev]."""
    return torch.ops.aten._scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p, is_causal,
                                                            scale=scale, enable_gqa=enable_gqa)[0]


def _unmasked(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> bool:
    """Whether a call of F.scaled_dot_product_attention is one `double_backward.attention` computes: no mask,
    not causal, the same leading dimensions for query, key and value."""
    return (attn_mask is None and not is_causal and not enable_gqa and query.dim() >= 3
            and query.shape[:-2] == key.shape[:-2] == value.shape[:-2])


class MathAttention(TorchFunctionMode):
    """While entered: F.scaled_dot_product_attention, called in this thread, runs `math_attention`, or, inside
    the objective's forward pass of `gate`'s model (`forward_pass` with activations), `double_backward.attention`
    when the call has no mask. (A mode is pushed on the current thread's stack only, so other threads keep the
    fused kernels.)"""

    def __init__(self, gate: "JacobianGate | None" = None) -> None:
        super().__init__()
        self.gate = gate

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            gate = self.gate
            if gate is not None and gate.active and gate.activations and _unmasked(*args, **kwargs):
                bound = dict(zip(("query", "key", "value", "attn_mask", "dropout_p"), args), **kwargs)
                return double_backward.attention(bound["query"], bound["key"], bound["value"],
                                                 bound.get("dropout_p", 0.0), bound.get("scale"))
            return math_attention(*args, **kwargs)
        return func(*args, **kwargs)


class _ReLU(torch.autograd.Function):
    """ReLU whose backward multiplies by a constant mask (autograd's own also differentiates the mask)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad.to(out.dtype), out.detach(), 0)


class _MaxPool2d(torch.autograd.Function):
    """2-d max pooling whose backward routes by constant indices (as `_ReLU`)."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool) -> Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(x, indices)
        ctx.settings = (kernel, stride, padding, dilation, ceil_mode)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad.to(x.dtype), x.detach(), *ctx.settings, indices)
        return grad_x, None, None, None, None, None


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
    """Train-mode BatchNorm (PyTorch's fused kernels). Its backward is nn.BatchNorm's, except inside
    the gate's `jacobians()`: there it returns the input-gradient of the per-sample function that
    holds the batch statistics constant, grad * weight / std, with std differentiable in the saved
    input (`_BatchNormScale`), so a loss built from it still sees the statistics as the functions of
    the parameters they are."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, module: nn.Module,
                momentum: float, gate: JacobianGate) -> Tensor:
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, module.running_mean, module.running_var,
                                                    True, momentum, module.eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.gate, ctx.scale = module.eps, gate, None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        grad = grad.to(x.dtype)
        if ctx.gate.closed:
            if ctx.scale is None or ctx.scale_graph != torch.is_grad_enabled():
                # Once per forward pass, shared by every input-gradient taken from it.
                scale = _BatchNormScale.apply(x, weight, mean, invstd)
                ctx.scale, ctx.scale_graph = scale.view([1, -1] + [1] * (x.dim() - 2)), torch.is_grad_enabled()
            return grad * ctx.scale, None, None, None, None, None
        needs = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, [needs[0], needs[1], needs[2]])
        return grad_x, grad_weight, grad_bias, None, None, None


class _InputConv2d(torch.autograd.Function):
    """A convolution of the network's input itself. Its backward computes the input-gradient inside
    the gate's `jacobians()` only, the parameters' gradients in a loss's backward pass only (for an
    image of few channels the input-gradient costs more than the forward pass), and both elsewhere.
    Under autocast it computes in the autocast dtype, as nn.Conv2d does; the backward casts the saved
    input and weight itself, so that an input-gradient taken with create_graph stays a function of
    the weight."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups,
                gate: JacobianGate) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dtype = autocast_dtype(x.device.type)
        ctx.settings = (list(stride), list(padding), list(dilation), groups)
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        ctx.gate = gate
        ctx.patch = patch_size(x, weight, *ctx.settings)
        if ctx.dtype is not None:
            x, weight = x.to(ctx.dtype), weight.to(ctx.dtype)
            bias = None if bias is None else bias.to(ctx.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.settings
        needs = ctx.needs_input_grad
        has_bias = needs[2] and ctx.bias_sizes is not None
        if ctx.gate.closed:
            mask = [needs[0], False, False]
        elif ctx.gate.loss_backward:
            mask = [False, needs[1], has_bias]
        else:
            mask = [needs[0], needs[1], has_bias]
        dtype = ctx.dtype or x.dtype
        if ctx.patch is not None:
            grad_x, grad_weight, grad_bias = patch_convolution_backward(grad.to(dtype), x.to(dtype), weight.to(dtype),
                                                                        ctx.patch, mask)
        else:
            grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad.to(dtype), x.to(dtype), weight.to(dtype), ctx.bias_sizes, stride, padding, dilation, False,
                [0, 0], groups, mask)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(grad_x, x), cast(grad_weight, weight), cast(grad_bias, weight), None, None, None, None, None


def patch_size(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> int | None:
    """k where the convolution cuts x [B, C, H, W] into whole, non-overlapping k x k patches (a ViT's patch
    embedding: kernel = stride = k, no padding, no dilation, one group), else None."""
    k = weight.shape[-1]
    if (weight.dim() != 4 or weight.shape[-2] != k or list(stride) != [k, k] or any(padding)
            or list(dilation) != [1, 1] or groups != 1):
        return None
    return k if x.dim() == 4 and x.shape[-2] % k == 0 and x.shape[-1] % k == 0 else None


def image_patches(x: Tensor, k: int) -> Tensor:
    """x [B, C, H, W] -> its k x k patches as rows [B * H/k * W/k, C * k * k], in the weight's (C, k, k) order."""
    batch, channels, height, width = x.shape
    return x.reshape(batch, channels, height // k, k, width // k, k).permute(0, 2, 4, 1, 3, 5).reshape(
        -1, channels * k * k)


def patch_convolution_backward(grad: Tensor, x: Tensor, weight: Tensor, k: int,
                               mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """convolution_backward of a patch embedding (`patch_size`) as matrix products, in differentiable operations:
    a CPU's convolution kernels take several times longer for its input-gradient. grad [B, O, H/k, W/k] ->
    (grad_x [B, C, H, W], grad_weight [O, C, k, k], grad_bias [O]), each None where `mask` says."""
    batch, channels, height, width = x.shape
    rows = grad.permute(0, 2, 3, 1).reshape(-1, weight.shape[0])          # [B H/k W/k, O]
    grad_x = grad_weight = grad_bias = None
    if mask[0]:
        patches = rows @ weight.reshape(weight.shape[0], -1)               # [B H/k W/k, C k k]
        grad_x = patches.view(batch, height // k, width // k, channels, k, k).permute(0, 3, 1, 4, 2, 5).reshape(
            x.shape)
    if mask[1]:
        grad_weight = (rows.t() @ image_patches(x, k)).view(weight.shape)
    if mask[2]:
        grad_bias = rows.sum(0)
    return grad_x, grad_weight, grad_bias


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


class _Gated:
    """Holds the model's gate (a plain attribute: no parameter, buffer or state_dict key)."""

    jacobian_gate: JacobianGate


class JacobianReLU(nn.ReLU, _Gated):
    def forward(self, x: Tensor) -> Tensor:
        gate = self.jacobian_gate
        if gate.active and gate.activations:
            return _ReLU.apply(x)
        return super().forward(x)


class JacobianMaxPool2d(nn.MaxPool2d, _Gated):
    def forward(self, x: Tensor):
        gate = self.jacobian_gate
        if gate.active and gate.activations and not self.return_indices:
            stride = self.stride if self.stride is not None else self.kernel_size
            return _MaxPool2d.apply(x, _pair(self.kernel_size), _pair(stride), _pair(self.padding),
                                    _pair(self.dilation), bool(self.ceil_mode))
        return super().forward(x)


def affine(module: nn.modules.batchnorm._BatchNorm, x: Tensor, mean: Tensor, variance: Tensor) -> Tensor:
    """BatchNorm with given statistics, as the per-channel affine map it then is."""
    scale = torch.rsqrt(variance + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    shape = [1, -1] + [1] * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


class _JacobianBatchNorm(_Gated):
    def forward(self, x: Tensor) -> Tensor:
        out = self.gated_norm(x)
        return super().forward(x) if out is None else out

    def gated_norm(self, x: Tensor) -> Tensor | None:
        """BatchNorm's own output where the gate changes how it is computed, else None (the layer as it is)."""
        gate = self.jacobian_gate
        held = gate.held.get(self)
        if held is not None:                 # a separate per-sample pass: given statistics, no update
            mean, variance = next(held)
            return affine(self, x, mean, variance)
        if gate.active:
            if self.training and gate.batchnorm:
                self._check_input_dim(x)
                momentum = 0.0 if self.momentum is None else self.momentum
                if self.track_running_stats and self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                    if self.momentum is None:   # a cumulative moving average, as nn.BatchNorm does
                        momentum = 1.0 / float(self.num_batches_tracked)
                return _GatedBatchNorm.apply(x, self.weight, self.bias, self, momentum, gate)
            if not self.training and self.running_mean is not None and self.running_var is not None:
                return affine(self, x, self.running_mean, self.running_var)
        return None


class _JacobianNormAct(_JacobianBatchNorm):
    """timm's BatchNormAct2d (BatchNorm, then its `drop` and `act` modules in one forward)."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.gated_norm(x)
        if out is None:
            return super(_JacobianBatchNorm, self).forward(x)   # the layer's own forward
        return self.act(self.drop(out))


class JacobianBatchNorm1d(_JacobianBatchNorm, nn.BatchNorm1d):
    pass


class JacobianBatchNorm2d(_JacobianBatchNorm, nn.BatchNorm2d):
    pass


class JacobianBatchNorm3d(_JacobianBatchNorm, nn.BatchNorm3d):
    pass


class JacobianConv2d(nn.Conv2d, _Gated):
    def forward(self, x: Tensor) -> Tensor:
        gate = self.jacobian_gate
        # The pass's input: the student's `inputs`; in the teacher's pass (no inputs named), its input leaf.
        taken = x is gate.inputs or (gate.inputs is None and x.is_leaf and x.requires_grad)
        if gate.active and taken and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return _InputConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                      self.groups, gate)
        return super().forward(x)


def smooth_pass(gate: JacobianGate) -> bool:
    """Inside the objective's forward pass of a model whose input-gradient is differentiated again (the student's):
    attention runs `double_backward.attention`."""
    return gate.active and gate.activations


class JacobianMultiheadAttention(nn.MultiheadAttention, _Gated):
    """nn.MultiheadAttention. Inside the objective's forward pass, self-attention with packed projections and no
    mask, called with `need_weights=False` (as nn.TransformerEncoderLayer and torchvision's ViT call it), runs
    between its projections `double_backward.attention` (the student's pass) or the fused kernel (the teacher's),
    without F.multi_head_attention_forward's transposes and copies of q, k and v; in any other second-order
    pass `need_weights=False` runs its explicit path, whose double backward exists."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        gate = self.jacobian_gate
        plain = not need_weights and key_padding_mask is None and attn_mask is None and not is_causal
        if plain and gate.active and self.packed_self_attention(query, key, value):
            return self.smooth_self_attention(query), None
        if gate.second_order and not need_weights and not is_causal:
            out, _ = super().forward(query, key, value, key_padding_mask, True, attn_mask, average_attn_weights)
            return out, None
        return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                               is_causal)

    def packed_self_attention(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        return (query is key and key is value and query.dim() == 3 and not query.is_nested
                and self._qkv_same_embed_dim and self.in_proj_weight is not None and self.bias_k is None
                and self.bias_v is None and not self.add_zero_attn)

    def smooth_self_attention(self, x: Tensor) -> Tensor:
        """The layer's output (need_weights=False) for self-attention of x ([batch, length, embed] if batch_first,
        else [length, batch, embed]): `double_backward.attention` in the student's pass, else the fused kernel."""
        tokens = x if self.batch_first else x.transpose(0, 1)          # [B, L, E]
        batch, length, width = tokens.shape
        heads = self.num_heads
        qkv = F.linear(tokens, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.dropout if self.training else 0.0
        if smooth_pass(self.jacobian_gate):
            out = double_backward.attention(q, k, v, dropout)                        # [B, H, L, E / H]
        else:   # the teacher's pass of a step: its input-gradient is not differentiated again
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = F.linear(out.transpose(1, 2).reshape(batch, length, width), self.out_proj.weight, self.out_proj.bias)
        return out if self.batch_first else out.transpose(0, 1)


class _FusedAttentionSwitch(_Gated):
    """A module with timm's `fused_attn` switch (F.scaled_dot_product_attention if true, its own
    matmul-softmax attention if false): the switch reads false in a second-order pass other than the
    objective's forward pass (where `MathAttention` gives the call to `double_backward.attention`)."""

    @property
    def fused_attn(self) -> bool:
        gate = self.jacobian_gate
        # Inside the objective's forward pass F.scaled_dot_product_attention runs double_backward.attention.
        return bool(self.__dict__["_fused_attn"]) and (not gate.second_order or smooth_pass(gate))

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        self.__dict__["_fused_attn"] = value


@functools.cache
def _jacobian_class(ready: type, cls: type) -> type:
    """One Jacobian-ready class per (mixin, converted class) pair: `ready`'s forward before `cls`'s."""
    return type(f"Jacobian{cls.__name__}", (ready, cls),
                {"__module__": __name__, "__qualname__": f"Jacobian{cls.__name__}"})

# Exact types only: a subclass may have a forward of its own (see `subclass_conversion`).
CONVERSIONS: Mapping[type, type] = MappingProxyType({
    nn.ReLU: JacobianReLU, nn.MaxPool2d: JacobianMaxPool2d, nn.Conv2d: JacobianConv2d,
    nn.BatchNorm1d: JacobianBatchNorm1d, nn.BatchNorm2d: JacobianBatchNorm2d, nn.BatchNorm3d: JacobianBatchNorm3d,
    nn.MultiheadAttention: JacobianMultiheadAttention,
})
GATED_BATCHNORMS = (_JacobianBatchNorm,)
# Subclasses of nn.BatchNorm2d whose forward is known: BatchNorm, then `drop` and `act` (by name: timm is optional).
NORM_ACT = ("timm.layers.norm_act.BatchNormAct2d",)


def _own_forward(cls: type, base: type) -> bool:
    return cls.forward is not base.forward


def subclass_conversion(module: nn.Module) -> type | None:
    """The Jacobian-ready class of a subclass of a converted type, or None to leave it as it is.

    A subclass that keeps its parent's forward converts as its parent (its class kept in the MRO);
    timm's BatchNormAct2d converts with its drop and activation. Subclasses of ReLU, MaxPool2d and
    Conv2d with a forward of their own (timm's Conv2dSame) are left: their input-gradients are the
    true ones, only not the cheaper ones. A BatchNorm subclass with a forward of its own is left,
    and a per-sample Jacobian through it in train mode is refused (engine/batchnorm.py)."""
    cls = type(module)
    base = next((b for b in cls.__mro__[1:] if b in CONVERSIONS), None)
    if base is None or isinstance(module, _Gated) or isinstance(module, nn.SyncBatchNorm):
        return None
    if f"{cls.__module__}.{cls.__qualname__}" in NORM_ACT:
        return _jacobian_class(_JacobianNormAct, cls)
    if _own_forward(cls, base):
        return None
    return _jacobian_class(CONVERSIONS[base], cls)


def unconverted_batchnorm(module: nn.Module) -> bool:
    """A train-mode-coupled BatchNorm whose forward does more than BatchNorm, left as it is: its
    per-sample Jacobian cannot be formed from the statistics it normalises with."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, (_Gated, nn.SyncBatchNorm)):
        return False
    return _own_forward(type(module), nn.modules.batchnorm._BatchNorm)


def _conversion(module: nn.Module) -> type | None:
    cls = CONVERSIONS.get(type(module))
    if cls is not None:
        return cls
    if isinstance(module.__dict__.get("fused_attn"), bool) and not isinstance(module, _Gated):
        return _jacobian_class(_FusedAttentionSwitch, type(module))
    return subclass_conversion(module)


def make_jacobian_ready(model: nn.Module) -> nn.Module:
    """Replace, in place, every nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.BatchNorm1d/2d/3d and
    nn.MultiheadAttention of `model` (and subclasses that keep their parent's forward, timm's
    BatchNormAct2d, modules with timm's `fused_attn` switch) by its Jacobian-ready class (the same
    parameter and buffer objects, hooks and state_dict keys), all sharing one new gate, also held by
    `model.jacobian_gate`. Returns `model`; a converted model is left as it is (in the manner of
    torch.func.replace_all_batch_norm_modules_)."""
    if gate_of(model) is not None:
        return model
    gate = JacobianGate()
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            cls = _conversion(child) if child is not None else None
            if cls is None:
                continue
            converted = cls.__new__(cls)
            converted.__dict__.update(child.__dict__)
            if issubclass(cls, _FusedAttentionSwitch):
                converted.__dict__["_fused_attn"] = converted.__dict__.pop("fused_attn")
            converted.jacobian_gate = gate
            parent._modules[name] = converted
    model.jacobian_gate = gate
    return model
