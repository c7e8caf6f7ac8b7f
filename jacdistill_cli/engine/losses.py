"""Distillation losses: `loss(student_logits, teacher_logits, temperature) -> scalar`, mean over the batch.

A loss is chosen by the `_target_` of conf/loss/<name>.yaml; its other keys (`temperature`) are passed
as keywords. A user's own loss is any function of this form named by a `_target_` (see the README).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kl(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """temperature^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch.
    The T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015)."""
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def mse(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Squared error of the softened probabilities, summed over classes, mean over the batch."""
    diff = F.softmax(student / temperature, dim=1) - F.softmax(teacher / temperature, dim=1)
    return diff.pow(2).sum(dim=1).mean()


def ce(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Cross-entropy of the student to the teacher's argmax (temperature plays no part)."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


def no_distillation(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    return student.new_zeros(())
