"""The terms of the objective. Each is registered once in the objective's list, says what it needs
from the step, and returns a scalar; the objective computes each need once and adds the terms up:

    total = sum(term.weight * term(step))

Needs: `gradients` (the Jacobian method's input-gradients of both networks), `features` (the
captured features of the matched module pairs), `statistics` (the BatchNorm statistics of the
student's train-mode pass, for a separate per-sample pass). The student's logits and the labels are
always there, the teacher's logits unless no term reads them (`reads_teacher` false for every term:
cross-entropy alone, as in the `ce_only` recipe, skips the teacher's pass). `loss/<name>` is logged for
each term.

A user's own term subclasses `Term` (a name, a weight, its needs and `__call__(step)`), and is added
with `terms.<name>={_target_: ..., weight: ...}` (see docs/how-to/own-model.md).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from jacdistill_cli.engine.losses import no_distillation

if TYPE_CHECKING:
    from jacdistill_cli.engine.objective import Step

@dataclass
class Term:
    name: str
    weight: float
    needs: ClassVar[frozenset[str]] = frozenset()
    reads_teacher: ClassVar[bool] = True   # step.teacher_logits (None in a step where no term reads them)

    def __call__(self, step: "Step") -> Tensor:
        raise NotImplementedError


def step_arguments(loss: Callable) -> frozenset[str]:
    """Which of the step's `labels` and `epoch` the loss takes as keywords (see engine/losses.py)."""
    try:
        parameters = inspect.signature(loss).parameters
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(name for name in ("labels", "epoch") if name in parameters)


@dataclass
class Distillation(Term):
    """The distillation loss between the student's and the (constant) teacher's logits; a loss that takes
    `labels` or `epoch` receives the step's."""

    loss: Callable[[Tensor, Tensor], Tensor] = None

    def __post_init__(self) -> None:
        self.arguments = step_arguments(self.loss)
        bound = set(getattr(self.loss, "keywords", {}) or {}) & self.arguments
        if bound:
            raise ValueError(f"the loss's {', '.join(sorted(bound))} come from the step, not from its settings")

    @property
    def reads_teacher(self) -> bool:
        return getattr(self.loss, "func", self.loss) is not no_distillation   # loss=none: always 0

    def __call__(self, step: "Step") -> Tensor:
        if not self.reads_teacher:
            return step.student_logits.new_zeros(())
        extra = {name: getattr(step, name) for name in self.arguments}
        return self.loss(step.student_logits, step.teacher_logits.detach(), **extra)


@dataclass
class JacobianMatching(Term):
    """The Jacobian method's term: mean over the batch of the per-sample distance between input-
    gradients; for `noise`, (||D(x + sigma xi)||^2 - ||D(x)||^2) / sigma^2 with D = S - T, which
    approaches ||J_S - J_T||_F^2 (see methods.Noise); for `none`, 0."""

    method: Any = None

    @property
    def needs(self) -> frozenset[str]:
        if self.method.uses_gradients:
            return frozenset({"gradients"})
        # The perturbed copies are normalised with the clean batch's BatchNorm statistics.
        return frozenset({"perturbed", "statistics"}) if self.method.perturbs_inputs else frozenset()

    @property
    def reads_teacher(self) -> bool:
        return self.method.uses_gradients or self.method.perturbs_inputs   # jacobian=none: always 0

    def __call__(self, step: "Step") -> Tensor:
        if self.method.uses_gradients:
            return step.jacobian_distance.mean()
        if self.method.perturbs_inputs:
            clean = step.student_logits - step.teacher_logits.detach()
            perturbed = step.perturbed_difference
            dtype = torch.promote_types(clean.dtype, torch.float32)   # bf16/float16 logits: the sum in float32
            return self.method.term(clean.to(dtype), perturbed.to(dtype)).mean()
        return step.student_logits.new_zeros(())


@dataclass
class HardLabels(Term):
    """Cross-entropy on the true labels."""

    reads_teacher: ClassVar[bool] = False

    def __call__(self, step: "Step") -> Tensor:
        return F.cross_entropy(step.student_logits, step.labels)


@dataclass
class FeatureTerm(Term):
    """The feature term (attention or hint) of the matched pairs: engine/features.py."""

    matching: Any = None
    needs: ClassVar[frozenset[str]] = frozenset({"features"})

    def __call__(self, step: "Step") -> Tensor:
        return self.matching.term(step.student_features, step.teacher_features)


@dataclass
class FeatureJacobianTerm(Term):
    """The distance between the input-gradients of the matched features' attention summaries
    (`jacobian.of=features`), with the method's normalize/squared/batchnorm settings."""

    matching: Any = None
    method: Any = None

    @property
    def needs(self) -> frozenset[str]:
        # `batch` normalises with the statistics of the step's train-mode pass; `running` and `coupled` need none.
        return frozenset({"statistics"}) if self.method.batchnorm == "batch" else frozenset()

    def __call__(self, step: "Step") -> Tensor:
        from jacdistill_cli.engine.features import feature_jacobian_term

        return feature_jacobian_term(step.student, step.teacher, self.matching.pairs, step.inputs, self.method,
                                     create_graph=self.weight > 0, statistics=step.statistics).mean()
