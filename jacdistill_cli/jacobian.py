"""Per-sample input-gradients of a classifier, as small pure functions.

Every function here takes `logits` of shape [batch, classes] that were computed from `inputs`
(a leaf tensor with requires_grad=True, shape [batch, *input]) and returns per-sample
input-gradients. `create_graph=True` keeps the result inside the autograd graph, so a loss built
from it trains the parameters (the student's side); `create_graph=False` returns a constant (the
frozen teacher's side). The result is per-sample only when no layer couples the samples of the
batch: see `batchnorm_statistics` for BatchNorm in train mode.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXACT_STRATEGIES = ("auto", "loop", "batched", "func")


def class_gradients(logits: Tensor, inputs: Tensor, classes: Tensor, create_graph: bool) -> Tensor:
    """d logits[b, classes[b]] / d inputs[b] for every sample b.

    logits [batch, classes], inputs [batch, *input], classes [batch] (long) -> [batch, *input].
    """
    selected = logits.gather(1, classes.view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(selected, inputs, create_graph=create_graph, retain_graph=True)
    return grads


def vector_jacobian_products(logits: Tensor, inputs: Tensor, vectors: Tensor, create_graph: bool) -> Tensor:
    """v_k[b]^T J[b] for each of K vectors per sample, in one batched backward pass.

    logits [batch, classes], inputs [batch, *input], vectors [K, batch, classes] -> [K, batch, *input].
    """
    (grads,) = torch.autograd.grad(
        logits, inputs, grad_outputs=vectors, is_grads_batched=True,
        create_graph=create_graph, retain_graph=True,
    )
    return grads


def full_jacobian(logits: Tensor, inputs: Tensor, create_graph: bool, strategy: str = "batched") -> Tensor:
    """The whole per-sample Jacobian d logits[b, c] / d inputs[b].

    logits [batch, classes], inputs [batch, *input] -> [batch, classes, *input].
    `loop` runs one backward pass per class; `batched` runs them all as one vectorised backward
    (`is_grads_batched`). Both give the same numbers.
    """
    num_classes = logits.shape[1]
    if strategy == "loop":
        rows = [
            torch.autograd.grad(logits[:, c].sum(), inputs, create_graph=create_graph, retain_graph=True)[0]
            for c in range(num_classes)
        ]
        return torch.stack(rows, dim=1)
    if strategy == "batched":
        eye = torch.eye(num_classes, dtype=logits.dtype, device=logits.device)
        basis = eye.unsqueeze(1).expand(num_classes, logits.shape[0], num_classes)
        return vector_jacobian_products(logits, inputs, basis, create_graph).movedim(0, 1)
    raise ValueError(f"full_jacobian: strategy must be 'loop' or 'batched', got {strategy!r}")


def func_jacobian(model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """Logits and per-sample Jacobians from `torch.func.vmap(jacrev(model))`, in one traced pass.

    inputs [batch, *input] -> (logits [batch, classes], jacobian [batch, classes, *input]).
    The parameters are used as they are, so the result stays differentiable with respect to them
    by ordinary autograd. BatchNorm must not be in train mode (vmap sees one sample at a time).
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def single(x: Tensor) -> tuple[Tensor, Tensor]:
        out = torch.func.functional_call(model, (params, buffers), (x.unsqueeze(0),)).squeeze(0)
        return out, out

    jac, logits = torch.func.vmap(torch.func.jacrev(single, has_aux=True))(inputs)
    return logits, jac


def matching_distance(student: Tensor, teacher: Tensor, normalize: bool, squared: bool) -> Tensor:
    """Per-sample distance between student and teacher gradients, flattened after the batch dim.

    student, teacher [batch, ...] -> [batch]. With `normalize`, each sample's flattened gradient is
    divided by its l2 norm (a zero norm gives a zero vector, never NaN). `squared` gives the
    squared l2 distance; otherwise the plain l2 distance, whose gradient at a zero distance is 0.
    """
    s = student.reshape(student.shape[0], -1)
    t = teacher.reshape(teacher.shape[0], -1)
    if normalize:
        s = F.normalize(s, dim=1)
        t = F.normalize(t, dim=1)
    squared_distance = (s - t).pow(2).sum(dim=1)
    if squared:
        return squared_distance
    # sqrt has an infinite derivative at 0; where the distance is 0 its gradient is 0 instead.
    positive = squared_distance > 0
    safe = torch.where(positive, squared_distance, torch.ones_like(squared_distance))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(squared_distance))


def has_training_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


@contextlib.contextmanager
def batchnorm_statistics(model: nn.Module, mode: str) -> Iterator[None]:
    """Make the model's forward pass a per-sample function while BatchNorm is in train mode.

    `batch`: normalise with the current batch's mean and variance held as constants, so outputs
    equal the train-mode forward pass but sample i's Jacobian does not depend on the others.
    `running`: normalise with the running statistics (as in eval mode).
    `coupled`: leave BatchNorm as it is (the Jacobian then mixes samples of the batch).
    Running statistics are never updated inside this context.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if mode == "coupled" or not norms:
        yield
        return
    if mode == "running":
        for m in norms:
            m.eval()
        try:
            yield
        finally:
            for m in norms:
                m.train()
        return
    if mode != "batch":
        raise ValueError(f"batchnorm mode must be batch, running or coupled, got {mode!r}")

    def held_forward(module: nn.modules.batchnorm._BatchNorm):
        def forward(x: Tensor) -> Tensor:
            dims = [0] + list(range(2, x.dim()))
            with torch.no_grad():
                mean = x.mean(dim=dims)
                var = x.var(dim=dims, unbiased=False)
            return F.batch_norm(x, mean, var, module.weight, module.bias, False, 0.0, module.eps)
        return forward

    for m in norms:
        m.forward = held_forward(m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward
