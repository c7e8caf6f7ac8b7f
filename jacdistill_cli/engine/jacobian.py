"""Per-sample input-gradients of a classifier, as small pure functions.

Most functions here take `logits` of shape [batch, classes] that were computed from `inputs`
(a leaf tensor with requires_grad=True, shape [batch, *input]) and return per-sample
input-gradients. `create_graph=True` keeps the result inside the autograd graph, so a loss built
from it trains the parameters (the student's side); `create_graph=False` returns a constant (the
frozen teacher's side). `retain_graph=True` alone is not enough: the result is then a constant
and a loss built from it trains nothing.

The result is per-sample only when no layer couples the samples of the batch: BatchNorm in train
mode does; engine/layers.py and engine/batchnorm.py make it per-sample again.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

# How `exact` (and `projected` with several projections) runs its backward passes.
EXACT_STRATEGIES = ("auto", "loop", "batched", "func")


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
