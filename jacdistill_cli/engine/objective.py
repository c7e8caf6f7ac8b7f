"""The objective: the passes of one step, computed once for every term, and the weighted sum.

    total = sum(term.weight * term(step))      # e.g. (1 - alpha) * distill + alpha * jacobian
                                               #      + hard_weight * hard + features.weight * features

Calling it on (student, teacher, inputs, labels[, epoch=E]) returns (student logits, {term name: value, "total"});
`epoch` (1-based) reaches a term or loss that changes with it (DKD's warm-up), None where the caller does not say.
The trainer logs whatever terms come back; it knows nothing about particular losses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from jacdistill_cli.engine.batchnorm import (
    can_gate_batchnorm,
    has_training_batchnorm,
    per_sample_batchnorm,
    recorded_batchnorm_statistics,
    running_batchnorm_statistics,
)
from jacdistill_cli.engine.jacobian import resolve_strategy
from jacdistill_cli.engine.layers import gate_of, make_jacobian_ready
from jacdistill_cli.engine.methods import JacobianMethod, Matched, NoJacobian, Passes, teacher_along
from jacdistill_cli.engine.terms import (
    Distillation,
    FeatureJacobianTerm,
    FeatureTerm,
    HardLabels,
    JacobianMatching,
    Term,
)
from jacdistill_cli.errors import UsageError


@dataclass
class Step:
    """What the terms read: the step's passes. Fields a term did not ask for stay None."""

    student: nn.Module
    teacher: nn.Module
    inputs: Tensor                     # [batch, *input]
    labels: Tensor
    student_logits: Tensor
    teacher_logits: Tensor | None      # None when no term reads the teacher (its pass is skipped)
    epoch: int | None = None           # 1-based, the epoch the step belongs to; None where the caller does not say
    jacobian_distance: Tensor | None = None   # [batch], the method's per-sample term ("gradients")
    matched: Matched | None = None
    student_features: list[Tensor] = field(default_factory=list)   # "features"
    teacher_features: list[Tensor] = field(default_factory=list)
    statistics: Any = None            # "statistics": the student's recorded BatchNorm statistics
    perturbations: Tensor | None = None         # "perturbed": the directions xi [copies, batch, *input]
    perturbed_difference: Tensor | None = None  # S(x + sigma xi) - T(x + sigma xi) [copies, batch, classes]


@dataclass
class TeacherOutputs:
    """The teacher's side of a step for a batch: its logits [batch, classes] and, for a method with
    input-gradients, its gradients along the method's directions [K, batch, *input] (constants)."""

    logits: Tensor
    gradients: Tensor | None = None

    def take(self, index: Tensor) -> "TeacherOutputs":
        """The outputs of the samples at `index` (of a store holding every sample of a split)."""
        return TeacherOutputs(self.logits[index], None if self.gradients is None else self.gradients[:, index])


def running_statistics(student: nn.Module):
    try:
        return running_batchnorm_statistics(student)
    except ValueError as err:
        raise UsageError(f"jacobian.batchnorm='running' is not allowed for this student: {err}; "
                         "use jacobian.batchnorm=batch") from None


class Objective:
    """The weighted sum of `terms` (see engine/terms.py). `method` is the Jacobian method whose
    input-gradients a term may need; `matching` the feature matching whose features a term may need
    (its hooks capture them in the step's first pass of each model)."""

    def __init__(self, terms: list[Term], method: JacobianMethod | None = None, matching: Any = None,
                 generator: torch.Generator | None = None):
        names = [t.name for t in terms]
        if len(set(names)) != len(names) or "total" in names:
            raise ValueError(f"term names must be unique and not 'total': {names}")
        self.terms = list(terms)
        self.method = method if method is not None else NoJacobian()
        self.matching = matching
        self.generator = generator
        self.needs = needs(self.terms)
        self.reads_teacher = reads_teacher(self.terms)
        self.weights = {t.name: float(t.weight) for t in self.terms}
        # Input-gradients are taken when a term needs them, and kept in the graph when such a term is weighted.
        self.gradients = "gradients" in self.needs and self.method.uses_gradients
        self.create_graph = any(self.weights[t.name] > 0 for t in self.terms if "gradients" in t.needs)

    def __call__(self, student: nn.Module, teacher: nn.Module, inputs: Tensor, labels: Tensor,
                 gradient_scale: float = 1.0, teacher_outputs: TeacherOutputs | None = None,
                 epoch: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(student logits [batch, classes], {term name: scalar, "total": scalar}). `epoch`: 1-based, the
        epoch the step belongs to, for a term or loss that changes with it (DKD's warm-up); None (a caller
        that does not know it: evaluation, check, bench) means past any warm-up."""
        logits, terms, _ = self.evaluate(student, teacher, inputs, labels, gradient_scale, teacher_outputs, epoch)
        return logits, terms

    @property
    def teacher_reusable(self) -> bool:
        """Whether the teacher's side of a step depends on the sample alone, so that `teacher_outputs`
        computed once can stand in for it: no feature term (hooks on the teacher), a method whose teacher
        side is deterministic and small (none, top1, target)."""
        return teacher_reusable(self.terms, self.method, self.matching)

    def teacher_outputs(self, teacher: nn.Module, inputs: Tensor, labels: Tensor) -> TeacherOutputs:
        """The teacher's side of a step on this batch, computed as `step` computes it."""
        make_jacobian_ready(teacher)
        gradients = self.gradients
        with torch.set_grad_enabled(gradients):
            teacher_inputs = inputs.detach().requires_grad_(gradients)
            logits = self.teacher_logits(teacher, teacher_inputs, gradients)
            if not gradients:
                return TeacherOutputs(logits.detach())
            passes = Passes(logits, teacher_inputs, logits, teacher_inputs, labels, create_graph=False,
                            generator=self.generator, teacher_strategy=self.resolve(teacher, inputs.device, "batch"),
                            teacher_forward=teacher)
            vectors, _ = self.method.vectors(passes)
            return TeacherOutputs(logits.detach(), teacher_along(passes, vectors).detach())

    @staticmethod
    def teacher_logits(teacher: nn.Module, teacher_inputs: Tensor, gradients: bool) -> Tensor:
        """The teacher's pass of a step (and of `teacher_outputs`): inside its gate's forward pass when its
        input-gradients follow."""
        with torch.set_grad_enabled(gradients), (gate_of(teacher).forward_pass(activations=False) if gradients
                                                 else contextlib.nullcontext()):
            return teacher(teacher_inputs)

    def evaluate(self, student: nn.Module, teacher: nn.Module, inputs: Tensor, labels: Tensor,
                 gradient_scale: float = 1.0, teacher_outputs: TeacherOutputs | None = None,
                 epoch: int | None = None) -> tuple[Tensor, dict[str, Tensor], Matched | None]:
        """As calling it, plus the gradients the Jacobian term matched (None for methods without).
        `gradient_scale`: float16's loss scale, for the input-gradients (see methods.Passes.scale);
        `teacher_outputs`: the teacher's side computed earlier (see `teacher_reusable`)."""
        make_jacobian_ready(student)
        make_jacobian_ready(teacher)
        gradients = self.gradients
        # Input-gradients need autograd even where the caller has turned it off (an evaluation).
        with torch.set_grad_enabled(gradients or torch.is_grad_enabled()):
            step = self.step(student, teacher, inputs, labels, gradients, gradient_scale, teacher_outputs, epoch)
            values = {term.name: term(step) for term in self.terms}
            total = sum((self.weights[name] * value for name, value in values.items()),
                        step.student_logits.new_zeros(()))
            values["total"] = gate_of(student).loss(total)
        return step.student_logits, values, step.matched

    def step(self, student: nn.Module, teacher: nn.Module, inputs: Tensor, labels: Tensor,
             gradients: bool, gradient_scale: float = 1.0, teacher_outputs: TeacherOutputs | None = None,
             epoch: int | None = None) -> Step:
        student_gate = gate_of(student)
        teacher_inputs = inputs.detach().requires_grad_(gradients)
        # BatchNorm in train mode couples the samples of a batch. `batch`: one forward pass whose
        # statistics are closed to the input-gradients (gated BatchNorm). `running`, `func`, and
        # BatchNorm layers that are not converted: a second, per-sample forward pass for the
        # Jacobian, so the first one needs no input-gradient. `coupled`: BatchNorm as it is.
        mode = self.method.batchnorm if gradients and has_training_batchnorm(student) else "coupled"
        strategy = self.resolve(student, inputs.device, mode) if gradients else None
        separate = mode == "running" or (mode == "batch" and (strategy == "func" or not can_gate_batchnorm(student)))
        student_inputs = inputs.detach().requires_grad_(gradients and not separate)
        record = "statistics" in self.needs and has_training_batchnorm(student)
        with contextlib.ExitStack() as stack:
            capture = (stack.enter_context(self.matching.capture(student, teacher))
                       if "features" in self.needs else None)
            if teacher_outputs is not None:
                teacher_logits = teacher_outputs.logits
            elif not self.reads_teacher and not gradients:
                teacher_logits = None
            else:
                teacher_logits = self.teacher_logits(teacher, teacher_inputs, gradients)
            with self.first_pass(student, student_inputs, gradients, mode, separate, strategy, record) as statistics:
                logits = student(student_inputs)
        step = Step(student, teacher, inputs, labels, logits, teacher_logits, epoch=epoch, statistics=statistics)
        if capture is not None:
            from jacdistill_cli.engine.features import split_features

            step.student_features, step.teacher_features = split_features(capture, len(self.matching.pairs))
            capture.clear()
        if "perturbed" in self.needs and self.method.perturbs_inputs:
            self.perturbed_passes(step, statistics)
        if gradients:
            with per_sample_batchnorm(student, mode if separate else "coupled", statistics), student_gate.jacobians():
                if separate:
                    jacobian_inputs = inputs.detach().requires_grad_(True)
                    with self.prepared(student, strategy, jacobian_inputs, batchnorm=False):
                        jacobian_logits = student(jacobian_inputs)
                else:
                    jacobian_inputs, jacobian_logits = student_inputs, logits
                passes = Passes(jacobian_logits, jacobian_inputs, teacher_logits, teacher_inputs, labels,
                                create_graph=self.create_graph, generator=self.generator,
                                student_strategy=strategy,
                                teacher_strategy=self.resolve(teacher, inputs.device, "batch"),
                                student_forward=student, teacher_forward=teacher, scale=gradient_scale,
                                teacher_gradients=None if teacher_outputs is None else teacher_outputs.gradients)
                step.jacobian_distance, step.matched = self.method.term(passes)
        return step

    def perturbed_passes(self, step: Step, statistics: Any) -> None:
        """Both networks on the method's perturbed copies x + sigma xi of the batch, in one pass each: the
        student's normalised with the clean pass's BatchNorm statistics, the teacher's a constant."""
        xi = self.method.draws(step.inputs.detach(), self.generator)   # [copies, batch, *input]
        copies = (step.inputs.detach().unsqueeze(0) + self.method.sigma * xi).flatten(0, 1)
        with torch.no_grad():
            teacher_logits = step.teacher(copies)
        with per_sample_batchnorm(step.student, "batch" if statistics else "coupled", statistics):
            student_logits = step.student(copies)
        step.perturbations = xi
        step.perturbed_difference = (student_logits - teacher_logits).unflatten(0, xi.shape[:2])

    @contextlib.contextmanager
    def first_pass(self, student: nn.Module, inputs: Tensor, gradients: bool, mode: str, separate: bool,
                   strategy: str | None, record: bool) -> Iterator[Any]:
        """Context of the student's train-mode pass; yields the BatchNorm statistics a separate
        per-sample pass will use (None without one)."""
        if not gradients:
            if record:
                with recorded_batchnorm_statistics(student) as statistics:
                    yield statistics
            else:
                yield None
        elif separate and mode == "running":
            # Taken before this pass updates them, so that the term depends on the parameters
            # only through the network itself.
            yield running_statistics(student)
        elif separate:
            with recorded_batchnorm_statistics(student) as statistics:
                yield statistics
        else:
            with self.prepared(student, strategy, inputs, batchnorm=mode == "batch"):
                yield None

    @staticmethod
    def prepared(student: nn.Module, strategy: str | None, inputs: Tensor, batchnorm: bool):
        """The gate's forward pass, except for `func`: torch.func cannot trace its autograd.Functions."""
        if strategy == "func":
            return contextlib.nullcontext()
        return gate_of(student).forward_pass(inputs=inputs, batchnorm=batchnorm)

    def resolve(self, model: nn.Module, device: torch.device, batchnorm: str) -> str:
        """The backward strategy for one network; `func` needs a per-sample forward pass."""
        strategy = resolve_strategy(self.method.strategy, model, device)
        if strategy == "func" and batchnorm == "coupled" and has_training_batchnorm(model):
            raise UsageError("jacobian.strategy='func' is not allowed with jacobian.batchnorm='coupled' and a "
                             "student with BatchNorm: torch.func sees one sample at a time; use "
                             "jacobian.batchnorm=batch or running, or another strategy")
        return strategy


def needs(terms: Iterable[Term]) -> frozenset[str]:
    """What the terms need from a step, together."""
    return frozenset().union(*(t.needs for t in terms))


def reads_teacher(terms: Iterable[Term]) -> bool:
    """Whether any term reads the teacher's logits (none does: the teacher's pass is skipped)."""
    return any(t.reads_teacher for t in terms)


def teacher_reusable(terms: Iterable[Term], method: JacobianMethod, matching: Any) -> bool:
    """Whether the teacher's side of a step depends on the sample alone, so that `teacher_outputs` computed
    once can stand in for it: no feature term (hooks on the teacher), a method whose teacher side is
    deterministic and small (none, top1, target)."""
    return matching is None and "statistics" not in needs(terms) and method.reusable_teacher


def distillation_terms(loss: Callable[[Tensor, Tensor], Tensor], alpha: float, hard_weight: float,
                       method: JacobianMethod, matching: Any = None, extra_terms: Iterable[Term] = ()) -> list[Term]:
    """The terms of `jacdistill train`'s objective (see `distillation_objective`)."""
    terms: list[Term] = [Distillation("distill", 1 - alpha, loss=loss)]
    if matching is not None and method.of == "features":
        terms.append(FeatureJacobianTerm("jacobian", alpha, matching=matching, method=method))
    else:
        terms.append(JacobianMatching("jacobian", alpha, method=method))
    if hard_weight > 0:
        terms.append(HardLabels("hard", hard_weight))
    if matching is not None:
        terms.append(FeatureTerm("features", matching.weight, matching=matching))
    return [*terms, *extra_terms]


def distillation_objective(loss: Callable[[Tensor, Tensor], Tensor], alpha: float, hard_weight: float,
                           method: JacobianMethod, matching: Any = None, generator: torch.Generator | None = None,
                           extra_terms: Iterable[Term] = ()) -> Objective:
    """The objective of `jacdistill train`:

        (1 - alpha) * distill + alpha * jacobian [+ hard_weight * hard] [+ features.weight * features] [+ extra]

    `jacobian` is the method's term, or with `method.of == "features"` the feature Jacobian of
    `matching`'s pairs; `hard` is registered when hard_weight > 0, `features` with a matching."""
    return Objective(distillation_terms(loss, alpha, hard_weight, method, matching, extra_terms), method, matching,
                     generator)


def objective_from_settings(settings: Any, teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...],
                            device: torch.device | str = "cpu",
                            generator: torch.Generator | None = None) -> tuple[Objective, Any]:
    """(the objective, its feature matching or None) of typed settings (spec/run.py `ObjectiveSpec`); the
    matching's parameters (hint regressors) are optimised with the student."""
    matching = None
    if settings.features.name != "none":
        matching = settings.features.matching(teacher, student, input_shape, device)
    objective = distillation_objective(settings.loss, settings.alpha, settings.hard_weight, settings.method, matching,
                                       generator, settings.terms)
    return objective, matching


def cross_entropy_objective(model: nn.Module, teacher: None, inputs: Tensor, labels: Tensor,
                            gradient_scale: float = 1.0, epoch: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain supervised training (of a teacher): the hard-label term only (`epoch` is accepted and unused)."""
    import torch.nn.functional as F

    logits = model(inputs)
    hard = F.cross_entropy(logits, labels)
    return logits, {"hard": hard, "total": hard}
