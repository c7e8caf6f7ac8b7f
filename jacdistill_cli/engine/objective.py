"""The distillation objective: student logits and a dict of named loss terms.

    total = (1 - alpha) * distill + alpha * jacobian + hard_weight * hard

The trainer logs whatever terms come back; it knows nothing about particular losses.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacdistill_cli.errors import UsageError
from jacdistill_cli.engine.jacobian import (affine_batchnorm, can_gate_batchnorm, has_training_batchnorm, jacobian_forward,
                                     per_sample_batchnorm, recorded_batchnorm_statistics, resolve_strategy,
                                     running_batchnorm_statistics, statistics_closed)
from jacdistill_cli.engine.methods import METHODS, Matched, Passes, method_term


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


def running_statistics(student: nn.Module):
    try:
        return running_batchnorm_statistics(student)
    except ValueError as err:
        raise UsageError(f"jacobian.batchnorm='running' is not allowed for this student: {err}; "
                         "use jacobian.batchnorm=batch") from None


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
        self.batchnorm = jacobian.get("batchnorm", "batch")
        self.strategy = jacobian.get("strategy", "auto")
        self.generator = generator

    def __call__(self, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                 labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, terms, _ = self.evaluate(student, teacher, inputs, labels)
        return logits, terms

    def evaluate(self, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                 labels: Tensor) -> tuple[Tensor, dict[str, Tensor], Matched | None]:
        """As calling it, plus the gradients the Jacobian term matched (None for methods without)."""
        # Input-gradients need autograd even where the caller has turned it off (an evaluation).
        with torch.set_grad_enabled(self.method.uses_gradients or torch.is_grad_enabled()):
            return self._evaluate(student, teacher, inputs, labels)

    def _evaluate(self, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                  labels: Tensor) -> tuple[Tensor, dict[str, Tensor], Matched | None]:
        if self.method.perturbs_inputs:
            inputs, labels = self.perturb(inputs, labels)
        uses_gradients = self.method.uses_gradients
        teacher_inputs = inputs.detach().requires_grad_(uses_gradients)
        with torch.set_grad_enabled(uses_gradients), (affine_batchnorm(teacher) if uses_gradients
                                                      else contextlib.nullcontext()):
            teacher_logits = teacher(teacher_inputs)

        # BatchNorm in train mode couples the samples of a batch. `batch`: one forward pass whose
        # statistics are closed to the input-gradients (jacobian_forward). `running`, `func`, and
        # BatchNorm layers that cannot be gated: a second, per-sample forward pass for the
        # Jacobian, so the first one needs no input-gradient. `coupled`: BatchNorm as it is.
        mode = self.batchnorm if uses_gradients and has_training_batchnorm(student) else "coupled"
        student_strategy = self.resolve(student, inputs.device, mode) if uses_gradients else None
        separate = mode == "running" or (mode == "batch" and (student_strategy == "func"
                                                              or not can_gate_batchnorm(student)))
        student_inputs = inputs.detach().requires_grad_(uses_gradients and not separate)
        first_pass = self.first_pass(student, student_inputs, uses_gradients, mode, separate, student_strategy)
        with first_pass as statistics:
            logits = student(student_inputs)
        terms = {"distill": self.distill(logits, teacher_logits.detach(), self.temperature)}

        matched = None
        if uses_gradients:
            with per_sample_batchnorm(student, mode if separate else "coupled", statistics), statistics_closed():
                if separate:
                    jacobian_inputs = inputs.detach().requires_grad_(True)
                    with self.prepared(student, student_strategy, jacobian_inputs, gate_batchnorm=False):
                        jacobian_logits = student(jacobian_inputs)
                else:
                    jacobian_inputs, jacobian_logits = student_inputs, logits
                passes = Passes(jacobian_logits, jacobian_inputs, teacher_logits, teacher_inputs, labels,
                                self.settings, create_graph=self.alpha > 0, generator=self.generator,
                                student_strategy=student_strategy,
                                teacher_strategy=self.resolve(teacher, inputs.device, "batch"),
                                student_forward=student, teacher_forward=teacher)
                per_sample, matched = method_term(self.method, passes)
            terms["jacobian"] = per_sample.mean()
        elif self.method.perturbs_inputs:
            # On perturbed inputs, E||S(x+e) - T(x+e)||^2 = ||S(x) - T(x)||^2 + sigma^2 ||J_S - J_T||_F^2 + O(sigma^4).
            terms["jacobian"] = (logits - teacher_logits.detach()).pow(2).sum(dim=1).mean()
        else:
            terms["jacobian"] = logits.new_zeros(())

        total = (1 - self.alpha) * terms["distill"] + self.alpha * terms["jacobian"]
        if self.hard_weight > 0:
            terms["hard"] = F.cross_entropy(logits, labels)
            total = total + self.hard_weight * terms["hard"]
        terms["total"] = total
        return logits, terms, matched

    @contextlib.contextmanager
    def first_pass(self, student: nn.Module, inputs: Tensor, uses_gradients: bool, mode: str, separate: bool,
                   strategy: str | None) -> Iterator[Any]:
        """Context of the student's train-mode pass; yields the BatchNorm statistics a separate
        per-sample pass will use (None without one)."""
        if not uses_gradients:
            yield None
        elif separate and mode == "running":
            # Taken before this pass updates them, so that the term depends on the parameters
            # only through the network itself.
            yield running_statistics(student)
        elif separate:
            with recorded_batchnorm_statistics(student) as statistics:
                yield statistics
        else:
            with self.prepared(student, strategy, inputs, gate_batchnorm=mode == "batch"):
                yield None

    @staticmethod
    def prepared(student: nn.Module, strategy: str | None, inputs: Tensor, gate_batchnorm: bool):
        """jacobian_forward, except for `func`: torch.func cannot trace its autograd.Functions."""
        if strategy == "func":
            return contextlib.nullcontext()
        return jacobian_forward(student, gate_batchnorm, inputs)

    def resolve(self, model: nn.Module, device: torch.device, batchnorm: str) -> str:
        """The backward strategy for one network; `func` needs a per-sample forward pass."""
        strategy = resolve_strategy(self.strategy, model, device)
        if strategy == "func" and batchnorm == "coupled" and has_training_batchnorm(model):
            raise UsageError("jacobian.strategy='func' is not allowed with jacobian.batchnorm='coupled' and a "
                             "student with BatchNorm: torch.func sees one sample at a time; use "
                             "jacobian.batchnorm=batch or running, or another strategy")
        return strategy

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
