"""The Jacobian-matching methods: one function each, registered by the name of its config file.

A gradient method gets a `Passes` (student and teacher logits with the inputs they were computed
from) and returns the per-sample term [batch]. The student's side keeps `create_graph` so the
term trains the student; the teacher's side is computed without a second-order graph and is a
constant. `noise` needs no input-gradients at all: see `objective.Objective`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from jacdistill_cli.jacobian import class_gradients, full_jacobian, matching_distance, vector_jacobian_products


@dataclass
class Passes:
    student_logits: Tensor   # [batch, classes], computed from student_inputs
    student_inputs: Tensor   # [batch, *input], a leaf with requires_grad
    teacher_logits: Tensor   # [batch, classes], computed from teacher_inputs
    teacher_inputs: Tensor   # [batch, *input], a leaf with requires_grad
    labels: Tensor           # [batch]
    settings: Any            # the `jacobian` config node
    create_graph: bool       # False when the term is only logged (alpha = 0)
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class Method:
    name: str
    term: Callable[[Passes], Tensor] | None   # per-sample term [batch]; None for none/noise
    uses_gradients: bool


METHODS: dict[str, Method] = {}


def register_method(name: str, uses_gradients: bool = True):
    def add(term):
        METHODS[name] = Method(name, term, uses_gradients)
        return term

    return add


def _class_term(p: Passes, classes: Tensor) -> Tensor:
    student = class_gradients(p.student_logits, p.student_inputs, classes, p.create_graph)
    teacher = class_gradients(p.teacher_logits, p.teacher_inputs, classes, False)
    return matching_distance(student, teacher, p.settings.normalize, p.settings.squared)


@register_method("top1")
def top1(p: Passes) -> Tensor:
    """Gradient of the teacher's top-1 class logit, for both networks (Srinivas & Fleuret 2018)."""
    return _class_term(p, p.teacher_logits.detach().argmax(dim=1))


@register_method("target")
def target(p: Passes) -> Tensor:
    """Gradient of the true class logit, for both networks."""
    return _class_term(p, p.labels)


def exact_strategy(requested: str, device: torch.device) -> str:
    """`auto`: one backward pass per class on the CPU, where vectorised backward passes of
    convolutions become slow grouped convolutions; one vectorised pass on the GPU."""
    if requested != "auto":
        return requested
    return "batched" if device.type == "cuda" else "loop"


@register_method("exact")
def exact(p: Passes) -> Tensor:
    """The full per-sample Jacobian [classes, *input] of both networks."""
    strategy = exact_strategy(p.settings.strategy, p.student_logits.device)
    student = full_jacobian(p.student_logits, p.student_inputs, p.create_graph, strategy)
    teacher = full_jacobian(p.teacher_logits, p.teacher_inputs, False, strategy)
    return matching_distance(student, teacher, p.settings.normalize, p.settings.squared)


def projection_vectors(shape: tuple[int, ...], distribution: str, generator: torch.Generator | None,
                       device: torch.device, dtype: torch.dtype) -> Tensor:
    """Random vectors with E[v v^T] = I: Rademacher (+-1) or standard Gaussian, shape `shape`."""
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    signs = torch.randint(0, 2, shape, generator=generator, device=device)
    return (signs * 2 - 1).to(dtype)


@register_method("projected")
def projected(p: Passes) -> Tensor:
    """v^T J for `num_projections` random v per sample (Sobolev training), averaged over v."""
    batch, classes = p.student_logits.shape
    vectors = projection_vectors((p.settings.num_projections, batch, classes), p.settings.distribution,
                                 p.generator, p.student_logits.device, p.student_logits.dtype)
    student = vector_jacobian_products(p.student_logits, p.student_inputs, vectors, p.create_graph)
    teacher = vector_jacobian_products(p.teacher_logits, p.teacher_inputs, vectors, False)
    k = p.settings.num_projections
    distance = matching_distance(student.flatten(0, 1), teacher.flatten(0, 1), p.settings.normalize, p.settings.squared)
    return distance.view(k, batch).mean(dim=0)


METHODS["none"] = Method("none", None, uses_gradients=False)
# Distillation on perturbed inputs: the perturbation and the term live in the objective.
METHODS["noise"] = Method("noise", None, uses_gradients=False)
