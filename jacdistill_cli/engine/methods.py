"""The Jacobian-matching methods, registered by the name of their config file (conf/jacobian/).

Every gradient method is one choice of output directions: for each sample b it picks K vectors
v[k, b] in the output space and compares the student's and the teacher's input-gradients along
them, g[k, b] = v[k, b]^T J[b] (J[b] = d logits[b] / d inputs[b], classes x input):

    top1       v = e_{argmax teacher(x_b)}      K = 1
    target     v = e_{y_b}                      K = 1
    exact      v = e_1 .. e_C                   K = C, the K rows form one vector: the whole Jacobian
    projected  v random, E[v v^T] = I           K = num_projections, K separate estimates averaged

The student's gradients keep `create_graph` so the term trains the student; the teacher's are
computed without a second-order graph and are constants. `noise` needs no input-gradients at
all: it perturbs the inputs of every term (see `objective.Objective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from jacdistill_cli.engine.jacobian import (basis_vectors, func_jacobian, matching_distance, one_hot_vectors,
                                     vector_jacobian_products)


@dataclass
class Passes:
    """What a method needs: both networks' logits with the inputs they were computed from."""

    student_logits: Tensor   # [batch, classes], from student_inputs by a per-sample forward pass
    student_inputs: Tensor   # [batch, *input], a leaf with requires_grad
    teacher_logits: Tensor   # [batch, classes], from teacher_inputs
    teacher_inputs: Tensor   # [batch, *input], a leaf with requires_grad
    labels: Tensor           # [batch]
    settings: Any            # the `jacobian` config node
    create_graph: bool       # False when the term is only logged (alpha = 0)
    generator: torch.Generator | None = None
    student_strategy: str = "loop"   # loop | batched | func, resolved from `auto` per network
    teacher_strategy: str = "loop"
    student_forward: Callable[[Tensor], Tensor] | None = None   # the per-sample function, for `func`
    teacher_forward: Callable[[Tensor], Tensor] | None = None


@dataclass
class Matched:
    """The gradients a method compares, and the directions they were taken along."""

    student: Tensor   # [K, batch, *input], differentiable when create_graph
    teacher: Tensor   # [K, batch, *input], constant
    vectors: Tensor   # [K, batch, classes]: student[k, b] = vectors[k, b] @ J_student[b]
    joint: bool       # the K gradients of a sample form one vector (exact), else K estimates averaged


@dataclass(frozen=True)
class Method:
    name: str
    gradients: Callable[[Passes], Matched] | None   # None: the method compares no input-gradients
    perturbs_inputs: bool = False                   # every term sees Gaussian-perturbed inputs (noise)

    @property
    def uses_gradients(self) -> bool:
        return self.gradients is not None


METHODS: dict[str, Method] = {}


def register_method(name: str, perturbs_inputs: bool = False):
    def add(gradients):
        METHODS[name] = Method(name, gradients, perturbs_inputs)
        return gradients

    return add


def matching_term(matched: Matched, normalize: bool, squared: bool) -> Tensor:
    """The per-sample term [batch] from the matched gradients (see `jacobian.matching_distance`)."""
    k, batch = matched.student.shape[:2]
    if matched.joint:
        return matching_distance(matched.student.movedim(0, 1), matched.teacher.movedim(0, 1), normalize, squared)
    distance = matching_distance(matched.student.flatten(0, 1), matched.teacher.flatten(0, 1), normalize, squared)
    return distance.view(k, batch).mean(dim=0)


def method_term(method: Method, passes: Passes) -> tuple[Tensor, Matched]:
    """(per-sample term [batch], the matched gradients) of a gradient method."""
    matched = method.gradients(passes)
    return matching_term(matched, passes.settings.normalize, passes.settings.squared), matched


def _along(logits: Tensor, inputs: Tensor, vectors: Tensor, create_graph: bool, strategy: str,
           forward: Callable[[Tensor], Tensor] | None) -> Tensor:
    """vectors [K, batch, classes] -> gradients [K, batch, *input] of one network."""
    if strategy == "func":
        if forward is None:
            raise ValueError("strategy 'func' needs the network's forward function")
        jacobian = func_jacobian(forward, inputs)   # [batch, classes, *input]
        grads = torch.einsum("kbc,bc...->kb...", vectors, jacobian)
        return grads if create_graph else grads.detach()
    return vector_jacobian_products(logits, inputs, vectors, create_graph, strategy)


def matched_along(p: Passes, vectors: Tensor, joint: bool) -> Matched:
    """Both networks' gradients along the same vectors [K, batch, classes]."""
    student = _along(p.student_logits, p.student_inputs, vectors, p.create_graph, p.student_strategy,
                     p.student_forward)
    teacher = _along(p.teacher_logits, p.teacher_inputs, vectors, False, p.teacher_strategy, p.teacher_forward)
    return Matched(student, teacher, vectors, joint)


@register_method("top1")
def top1(p: Passes) -> Matched:
    """Gradient of the teacher's top-1 class logit, for both networks (Srinivas & Fleuret 2018)."""
    return matched_along(p, one_hot_vectors(p.teacher_logits.detach().argmax(dim=1), p.teacher_logits), joint=True)


@register_method("target")
def target(p: Passes) -> Matched:
    """Gradient of the true class logit, for both networks."""
    return matched_along(p, one_hot_vectors(p.labels, p.teacher_logits), joint=True)


@register_method("exact")
def exact(p: Passes) -> Matched:
    """The full per-sample Jacobian [classes, *input] of both networks."""
    return matched_along(p, basis_vectors(p.teacher_logits), joint=True)


def projection_vectors(shape: tuple[int, ...], distribution: str, generator: torch.Generator | None,
                       device: torch.device, dtype: torch.dtype) -> Tensor:
    """Random vectors with E[v v^T] = I: Rademacher (+-1) or standard Gaussian, shape `shape`."""
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    signs = torch.randint(0, 2, shape, generator=generator, device=device)
    return (signs * 2 - 1).to(dtype)


@register_method("projected")
def projected(p: Passes) -> Matched:
    """v^T J for `num_projections` random v per sample (Sobolev training); the term averages the
    K distances, so unnormalized and squared it is an unbiased estimate of ||J_S - J_T||_F^2."""
    batch, classes = p.teacher_logits.shape
    vectors = projection_vectors((int(p.settings.num_projections), batch, classes), p.settings.distribution,
                                 p.generator, p.teacher_logits.device, p.teacher_logits.dtype)
    return matched_along(p, vectors, joint=False)


METHODS["none"] = Method("none", None)
# Distillation on perturbed inputs: the perturbation and the term live in the objective.
METHODS["noise"] = Method("noise", None, perturbs_inputs=True)
