"""The distillation state: one module owns the student, the frozen teacher, the objective and the
objective's own parameters (hint regressors).

Its `parameters()` and `state_dict()` hold the student's and the objective's parameters, never the
teacher's: the optimiser and the checkpoint see this one thing. Under torch.distributed the student
alone is wrapped in DistributedDataParallel (never with `static_graph`: with input-gradients it
skips the all-reduce of gradients reached through them), the frozen teacher is not; the objective's
parameters are broadcast once and their gradients averaged after each backward pass.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from jacdistill_cli.engine.objective import TeacherOutputs, distillation_terms, reads_teacher, teacher_reusable
from jacdistill_cli.errors import UsageError
from jacdistill_cli.loop.distributed import SINGLE, World, average_gradients, broadcast_parameters
from jacdistill_cli.loop.precision import Precision
from jacdistill_cli.spec.run import ObjectiveSpec
from jacdistill_cli.zoo.data import DataBundle, in_memory


def reuse_decision(objective: ObjectiveSpec, setting: Any, data: DataBundle, precision: Precision
                   ) -> tuple[bool, list[str]]:
    """teacher.reuse_outputs (auto, True, False): whether the teacher's outputs are computed once per training
    sample and reused every epoch, and the reasons they cannot be (true is refused in one line when there is
    one). Reuse needs the teacher's side of a step to be a function of the sample alone and small, the training
    split held in memory without augmentation, and float32."""
    terms = distillation_terms(objective.loss, objective.alpha, objective.hard_weight, objective.method, None,
                               objective.terms)
    if not reads_teacher(terms):
        return False, []   # no term reads the teacher: no step runs it, nothing to keep
    reasons = []
    features = objective.features.name
    if features != "none" or not teacher_reusable(terms, objective.method, None):
        reasons.append(f"the teacher's side of jacobian={objective.method.name} with features={features} is not a "
                       "function of the sample alone (or is too large to keep)")
    if getattr(data.train, "augment", None) is not None:
        reasons.append("the training split is augmented (dataset.augment=true)")
    if not in_memory(data.train):
        reasons.append("the training split is not held in memory (dataset.max_memory_mb)")
    if precision.name != "32":
        reasons.append(f"trainer.precision={precision.name}")
    if setting is True and reasons:
        raise UsageError(f"teacher.reuse_outputs=true is not allowed: {reasons[0]}; use teacher.reuse_outputs=auto "
                         "or false")
    return setting is True or (setting == "auto" and not reasons), reasons


class Distiller(nn.Module):
    """`objective(student, teacher, inputs, labels, **options) -> (logits, {term: value, "total"})` of
    engine/objective.py (or `cross_entropy_objective` with `teacher=None`, for training a teacher).
    `matching`: the objective's feature matching (an nn.Module holding the hint regressors), or None."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, objective: Callable[..., Any],
                 matching: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.matching = matching
        # Plain attributes, not submodules: the teacher is in no parameters() or state_dict() of this one.
        self.__dict__["teacher"] = teacher
        self.__dict__["objective"] = objective
        self.__dict__["trained"] = student   # what the steps run: the student, or DDP around it
        self.__dict__["world"] = SINGLE
        self.__dict__["reused"] = None

    def distribute(self, world: World, device: torch.device, sync_batchnorm: bool = False) -> "Distiller":
        """Under torch.distributed: DDP around the student (its BatchNorm made SyncBatchNorm when asked),
        the objective's parameters made the same on every rank."""
        self.__dict__["world"] = world
        if not world.distributed:
            return self
        if sync_batchnorm:
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        self.__dict__["trained"] = nn.parallel.DistributedDataParallel(
            self.student, device_ids=[device.index] if device.type == "cuda" else None)
        broadcast_parameters(list(self.objective_parameters()), world)
        return self

    def reuse(self, outputs: TeacherOutputs | None) -> None:
        """The teacher's outputs for every training sample, computed once, standing in for its passes."""
        self.__dict__["reused"] = outputs

    @property
    def reads_indices(self) -> bool:
        """Whether a step needs the batch's sample indices (to take reused teacher outputs)."""
        return self.reused is not None

    def generators(self) -> dict[str, torch.Generator]:
        """The random generators the objective draws from (projections, noise), by name, for last.pt."""
        generator = getattr(self.objective, "generator", None)
        return {} if generator is None else {"objective": generator}

    def objective_parameters(self) -> list[nn.Parameter]:
        return [] if self.matching is None else list(self.matching.parameters())

    def forward(self, inputs: Tensor, labels: Tensor, indices: Tensor | None = None,
                **options: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """One step's objective: (the student's logits, {term: value, "total"})."""
        if self.reused is not None and indices is not None:
            options["teacher_outputs"] = self.reused.take(indices)
        return self.objective(self.trained, self.teacher, inputs, labels, **options)

    def after_backward(self) -> None:
        """DDP averages the student's gradients; the objective's own are averaged here."""
        average_gradients(self.objective_parameters(), self.world)

    def train(self, mode: bool = True) -> "Distiller":
        """The student (and the regressors) train; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def checkpoint_entries(self) -> dict[str, Any]:
        """What a student checkpoint holds besides the student's own weights: the hint regressors."""
        return {} if self.matching is None else {"features": self.matching.checkpoint_entry()}

    def load_checkpoint_entries(self, payload: dict[str, Any]) -> None:
        if self.matching is not None:
            self.matching.load_state_dict(payload["features"]["state_dict"])
