"""Attention whose input-gradient has a cheap double backward: what the student's forward pass of a Jacobian step
runs (engine/layers.py), for nn.MultiheadAttention and calls of F.scaled_dot_product_attention without a mask.

A Jacobian term differentiates an input-gradient once more. The fused attention kernels have no double backward;
PyTorch's math kernel has one, a chain of batched matrix products, softmax backwards and elementwise passes over
the [L, S] weights, each differentiated by autograd on its own. Here attention is one autograd.Function whose
backward is, when a graph is recorded (an input-gradient the term differentiates again), a second Function
(`_AttentionBackward`) whose own backward is written by hand: the weights' terms combined so that fewer [L, S]
tensors are formed and passed over, one softmax backward for both orders, and in-place updates where no graph is
recorded. Its first backward without a graph (a loss's backward pass) runs the math kernel's own formulas.

The numbers are the math kernel's up to rounding (float64: 1e-15): the closed forms are in `_AttentionBackward`'s
docstring. A third derivative, never taken by a step, stays correct: with a graph recorded, every hand-written
backward is made of differentiable operations on tensors in the graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _minus_rows(product: Tensor, rows: Tensor) -> Tensor:
    """product - rows ([N, L, S] - [N, L, 1]), in place where no graph is recorded (product is a fresh result)."""
    return product.sub_(rows) if not torch.is_grad_enabled() else product - rows


def _plus_product(base: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """base + left @ right (batched), in place where no graph is recorded (base is a fresh result)."""
    return base.baddbmm_(left, right) if not torch.is_grad_enabled() else torch.baddbmm(base, left, right)


def _times(product: Tensor, factor: Tensor | float) -> Tensor:
    """product * factor, in place where no graph is recorded (product is a fresh result)."""
    return product.mul_(factor) if not torch.is_grad_enabled() else product * factor


class _Attention(torch.autograd.Function):
    """o = softmax(c q k^T) v for q [N, L, d], k [N, S, d], v [N, S, e]. The weights y = softmax(c q k^T) are a
    second output, read by nothing but the second-order node: the gradient it passes for them reaches this node's
    backward, so that one softmax backward serves the loss's gradient and the second-order term."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        y = torch._softmax(torch.baddbmm(q.new_empty(()), q, k.transpose(1, 2), beta=0, alpha=scale), -1, False)
        o = torch.bmm(y, v)
        ctx.save_for_backward(q, k, v, y, o)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, y

    @staticmethod
    def backward(ctx, grad: Tensor | None, grad_weights: Tensor | None):
        q, k, v, y, o = ctx.saved_tensors
        scale = ctx.scale
        if grad is None and grad_weights is None:
            return None, None, None, None
        if torch.is_grad_enabled() and grad_weights is None:
            grad_q, grad_k, grad_v = _AttentionBackward.apply(grad, q, k, v, y, o, scale)
            return grad_q, grad_k, grad_v, None
        # The softmax's backward of everything that reached the weights (the second order's part included).
        grad_y = grad_weights
        if grad is not None:
            grad_y = torch.bmm(grad, v.transpose(1, 2)) if grad_y is None else torch.baddbmm(
                grad_y, grad, v.transpose(1, 2))
        grad_s = torch._softmax_backward_data(grad_y, y, -1, y.dtype)
        grad_q = _times(torch.bmm(grad_s, k), scale)
        grad_k = _times(torch.bmm(grad_s.transpose(1, 2), q), scale)
        grad_v = torch.bmm(y.transpose(1, 2), grad) if grad is not None else None
        return grad_q, grad_k, grad_v, None


class _AttentionBackward(torch.autograd.Function):
    """Attention's input-gradients for g = dL/do, with A = g v^T and r = rowsum(A y) = rowsum(g o):

        gs = y (A - r) = y P,   gq = c gs k,   gk = c gs^T q,   gv = y^T g.

    For (uq, uk, uv) = dL/d(gq, gk, gv), with U = dL/dgs = c (uq k^T + q uk^T) and U' = U - rowsum(U y):

        dL/dA = y U'  ->  dL/dg = (y U') v + y uv,   dL/dv = (y U')^T g
        dL/dq = c gs uk,   dL/dk = c gs^T uq
        dL/dy = g uv^T + U' P  (up to a constant per row, which the softmax's backward removes; y reaches
                                nothing else)."""

    @staticmethod
    def forward(ctx, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, y: Tensor, o: Tensor, scale: float):
        pressure, scores_grad = _attention_pressure(grad, v, y, o)
        grad_q = torch.bmm(scores_grad, k).mul_(scale)
        grad_k = torch.bmm(scores_grad.transpose(1, 2), q).mul_(scale)
        grad_v = torch.bmm(y.transpose(1, 2), grad)
        ctx.save_for_backward(grad, q, k, v, y, o, pressure, scores_grad)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return grad_q, grad_k, grad_v

    @staticmethod
    def backward(ctx, uq: Tensor | None, uk: Tensor | None, uv: Tensor | None):
        grad, q, k, v, y, o, pressure, scores_grad = ctx.saved_tensors
        scale = ctx.scale
        if torch.is_grad_enabled():   # a third derivative: P and gs as the functions they are
            pressure, scores_grad = _attention_pressure(grad, v, y, o)
        zero = lambda like, t: torch.zeros_like(like) if t is None else t  # noqa: E731
        uq, uk, uv = zero(q, uq), zero(k, uk), zero(v, uv)
        left, right = _times(torch.cat([uq, q], -1), scale), torch.cat([k, uk], -1)   # U = left right^T
        product = torch.bmm(left, right.transpose(1, 2))
        centred = _minus_rows(product, (product * y).sum(-1, keepdim=True))            # U' = U - rowsum(U y)
        grad_a = centred * y
        grad_grad = torch.baddbmm(torch.bmm(grad_a, v), y, uv)
        grad_v = torch.bmm(grad_a.transpose(1, 2), grad)
        grad_q = _times(torch.bmm(scores_grad, uk), scale)
        grad_k = _times(torch.bmm(scores_grad.transpose(1, 2), uq), scale)
        grad_y = _plus_product(_times(centred, pressure), grad, uv.transpose(1, 2))
        return grad_grad, grad_q, grad_k, grad_v, grad_y, None, None


def _attention_pressure(grad: Tensor, v: Tensor, y: Tensor, o: Tensor) -> tuple[Tensor, Tensor]:
    """(P = g v^T - rowsum(g o), gs = y P): the scores' gradient of attention, and the factor it is of y."""
    pressure = _minus_rows(torch.bmm(grad, v.transpose(1, 2)), (grad * o).sum(-1, keepdim=True))
    return pressure, pressure * y


def attention(query: Tensor, key: Tensor, value: Tensor, dropout_p: float = 0.0, scale: float | None = None) -> Tensor:
    """softmax(q k^T scale) v, F.scaled_dot_product_attention without a mask (scale: 1/sqrt(E) when None), with a
    cheap double backward: query [..., L, E], key [..., S, E], value [..., S, Ev] of the same leading dims ->
    [..., L, Ev]. With dropout of the weights, or under autocast (its dtypes), the math kernel's composition."""
    batch, length, width = query.shape[:-2], query.shape[-2], query.shape[-1]
    scale = 1.0 / math.sqrt(width) if scale is None else scale
    q = query.reshape(-1, length, width)
    k = key.reshape(-1, key.shape[-2], width)
    v = value.reshape(-1, value.shape[-2], value.shape[-1])
    if dropout_p == 0.0 and not torch.is_autocast_enabled(query.device.type):
        return _Attention.apply(q, k, v, scale)[0].view(*batch, length, value.shape[-1])
    # Dropout of the weights, or autocast's dtypes: the math kernel's composition, differentiated by autograd.
    weights = torch.softmax(torch.bmm(q * scale, k.transpose(1, 2)), -1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, training=True)
    return torch.bmm(weights, v).view(*batch, length, value.shape[-1])

