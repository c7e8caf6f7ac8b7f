"""Evaluation over a split: accuracy, and against a teacher agreement, input-gradient cosine and explanation
agreement. Sums are kept on the device, batch by batch, and read once at the end (one reduction under
torch.distributed)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacdistill_cli.engine.jacobian import class_gradients
from jacdistill_cli.engine.objective import TeacherOutputs
from jacdistill_cli.explain.agreement import METRICS as EXPLANATION_METRICS
from jacdistill_cli.explain.agreement import explanation_sums
from jacdistill_cli.loop.distributed import SINGLE, World, shard, sum_over_ranks
from jacdistill_cli.zoo.data import batches

# What an evaluation against a teacher measures, in the order metrics.json and TensorBoard list them.
METRICS = ("accuracy", "agreement", "jacobian_cosine", *EXPLANATION_METRICS)


def batch_sums(student: nn.Module, teacher: nn.Module | None, inputs: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """One batch's sums of each metric, as tensors on its device."""
    if teacher is None:
        with torch.no_grad():
            return {"accuracy": (student(inputs).argmax(1) == labels).sum()}
    student_inputs = inputs.detach().requires_grad_(True)
    teacher_inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        student_logits = student(student_inputs)
        teacher_logits = teacher(teacher_inputs)
        top = teacher_logits.argmax(1)
        student_grads = class_gradients(student_logits, student_inputs, top, create_graph=False)
        teacher_grads = class_gradients(teacher_logits, teacher_inputs, top, create_graph=False)
    predicted = student_logits.detach().argmax(1)
    cosine = F.cosine_similarity(student_grads.flatten(1), teacher_grads.flatten(1), dim=1, eps=1e-12)
    return {"accuracy": (predicted == labels).sum(), "agreement": (predicted == top).sum(),
            "jacobian_cosine": cosine.sum(), **explanation_sums(student_grads, teacher_grads)}


def evaluate(student: nn.Module, teacher: nn.Module | None, split, batch_size: int, device: torch.device,
             world: World = SINGLE) -> dict[str, float]:
    """accuracy; with a teacher also agreement (same argmax), jacobian_cosine (mean cosine of the two
    networks' input-gradients of the teacher's top class) and the explanation agreement of the same
    input-gradients (explain/agreement.py), means over the whole split (under torch.distributed each rank
    takes its shard of each batch, and the sums are reduced)."""
    was_training = student.training
    student.eval()
    names = METRICS if teacher is not None else ("accuracy",)
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    count = 0
    for inputs, labels in batches(split, batch_size, False, None, device):
        inputs, labels = shard(inputs, labels, world=world)
        if not len(labels):
            continue
        sums = batch_sums(student, teacher, inputs, labels)
        totals += torch.stack([sums[name].to(torch.float64) for name in names])
        count += len(labels)
    student.train(was_training)
    row = sum_over_ranks(torch.cat([totals, totals.new_full((1,), count)]), world)
    *values, count = row.tolist()
    return {name: value / max(count, 1) for name, value in zip(names, values)}


def reused_teacher_outputs(objective: Any, teacher: nn.Module, split: Any, batch_size: int,
                           device: torch.device) -> TeacherOutputs:
    """The teacher's side of a step (`Objective.teacher_outputs`) for every sample of a split held in
    memory, in the split's order, computed batch by batch as a step computes it."""
    parts = [objective.teacher_outputs(teacher, inputs, labels)
             for inputs, labels in batches(split, batch_size, False, None, device)]
    gradients = None if parts[0].gradients is None else torch.cat([p.gradients for p in parts], dim=1)
    return TeacherOutputs(torch.cat([p.logits for p in parts]), gradients)
