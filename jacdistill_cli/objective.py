"""The distillation objective: student logits and a dict of named loss terms.

    total = (1 - alpha) * distill + alpha * jacobian + hard_weight * hard

The trainer logs whatever terms come back; it knows nothing about particular losses.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacdistill_cli.jacobian import batchnorm_statistics, has_training_batchnorm
from jacdistill_cli.methods import METHODS, Passes


def kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """temperature^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch.
    The T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015)."""
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def mse(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Squared error of the softened probabilities, summed over classes, mean over the batch."""
    diff = F.softmax(student / temperature, dim=1) - F.softmax(teacher / temperature, dim=1)
    return diff.pow(2).sum(dim=1).mean()


def ce(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Cross-entropy of the student to the teacher's argmax (temperature plays no part)."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


def no_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    return student.new_zeros(())


DISTILL_LOSSES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "kl": kl, "mse": mse, "ce": ce, "none": no_distillation,
}


class Objective:
    """Calling it on (student, teacher, inputs, labels) returns (student logits, terms).

    terms: "distill", "jacobian", "total", and "hard" when hard_weight > 0; scalar tensors,
    "total" with the graph for backward.
    """

    def __init__(self, loss: str, temperature: float, alpha: float, hard_weight: float,
                 jacobian: Any, generator: torch.Generator | None = None):
        self.distill = DISTILL_LOSSES[loss]
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.hard_weight = float(hard_weight)
        self.settings = jacobian
        self.method = METHODS[jacobian.name]
        self.generator = generator

    def __call__(self, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                 labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.method.name == "noise":
            inputs, labels = self.perturb(inputs, labels)
        needs_gradients = self.method.uses_gradients
        teacher_inputs = inputs.detach().requires_grad_(needs_gradients)
        with torch.set_grad_enabled(needs_gradients):
            teacher_logits = teacher(teacher_inputs)

        student_inputs = inputs.detach().requires_grad_(needs_gradients)
        logits = student(student_inputs)
        terms = {"distill": self.distill(logits, teacher_logits.detach(), self.temperature)}

        if needs_gradients:
            # The Jacobian needs a per-sample function; BatchNorm in train mode couples samples,
            # so the student is run once more with its batch statistics held (or as configured).
            if has_training_batchnorm(student) and self.settings.batchnorm != "coupled":
                jacobian_inputs = inputs.detach().requires_grad_(True)
                with batchnorm_statistics(student, self.settings.batchnorm):
                    jacobian_logits = student(jacobian_inputs)
            else:
                jacobian_inputs, jacobian_logits = student_inputs, logits
            passes = Passes(jacobian_logits, jacobian_inputs, teacher_logits, teacher_inputs, labels,
                            self.settings, create_graph=self.alpha > 0, generator=self.generator)
            terms["jacobian"] = self.method.term(passes).mean()
        elif self.method.name == "noise":
            # On perturbed inputs, E||S(x+e) - T(x+e)||^2 = ||S(x) - T(x)||^2 + sigma^2 ||J_S - J_T||_F^2 + O(sigma^4).
            terms["jacobian"] = (logits - teacher_logits.detach()).pow(2).sum(dim=1).mean()
        else:
            terms["jacobian"] = logits.new_zeros(())

        total = (1 - self.alpha) * terms["distill"] + self.alpha * terms["jacobian"]
        if self.hard_weight > 0:
            terms["hard"] = F.cross_entropy(logits, labels)
            total = total + self.hard_weight * terms["hard"]
        terms["total"] = total
        return logits, terms

    def perturb(self, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """`samples` Gaussian-perturbed copies of the batch: [samples * batch, *input]."""
        samples, sigma = int(self.settings.samples), float(self.settings.sigma)
        repeated = inputs.repeat(samples, *([1] * (inputs.dim() - 1)))
        noise = torch.randn(repeated.shape, generator=self.generator, device=inputs.device, dtype=inputs.dtype)
        return repeated + sigma * noise, labels.repeat(samples)


def cross_entropy_objective(model: nn.Module, teacher: None, inputs: Tensor,
                            labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain supervised training (of a teacher): the hard-label term only."""
    logits = model(inputs)
    hard = F.cross_entropy(logits, labels)
    return logits, {"hard": hard, "total": hard}


def build_objective(cfg: Any, generator: torch.Generator | None = None) -> Objective:
    return Objective(cfg.loss.name, cfg.temperature, cfg.alpha, cfg.hard_weight, cfg.jacobian, generator)
