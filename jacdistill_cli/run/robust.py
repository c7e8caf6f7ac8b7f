"""Robust accuracy at the end of a train run: the student's and the teacher's on the test split
(robustness/measure.py), as metrics.json's entries, TensorBoard's scalars and one line of cost.

    robust_metrics(student, teacher, data, device, world, settings, epoch_seconds)
        -> {"robust_accuracy": {"clean": ..., "pgd_linf_0.1": ..., ...}, "teacher_robust_accuracy": {...},
            "robust_samples": n, "robust_seconds": s}        ({} when the settings hold no attack)
    robust_scalars(metrics) -> ({"test/robust_accuracy/pgd_linf_0.1": ...}, {"teacher/robust_accuracy/...": ...})
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from jacdistill_cli.robustness.measure import robust_accuracy
from jacdistill_cli.robustness.pixels import Pixels
from jacdistill_cli.robustness.settings import RobustnessSettings
from jacdistill_cli.run.distributed import World, reduce_sums

log = logging.getLogger("jacdistill")

# What robust_accuracy returns besides the accuracies: they are metrics.json's own entries.
COUNTS = ("samples", "robust_seconds")
STUDENT_TAG, TEACHER_TAG = "test/robust_accuracy/", "teacher/robust_accuracy/"


def accuracies(result: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in result.items() if key not in COUNTS}


def robust_metrics(student: nn.Module, teacher: nn.Module | None, data: Any, device: torch.device, world: World,
                   settings: RobustnessSettings, epoch_seconds: float) -> dict[str, Any]:
    """The student's robust accuracy on the test split (attacked in eval mode, float32, its gate closed;
    `transfer_pgd` made on the teacher) and the teacher's (without the transfer attack, whose source it is);
    under torch.distributed each rank attacks its blocks and the counts are summed. `epoch_seconds`: a
    training epoch's wall time, which the cost is logged against."""
    if not settings.enabled:
        return {}
    pixels = Pixels.of(data)
    common = dict(part=(world.rank, world.size), reduce=lambda values: reduce_sums(values, world, device))
    student_result = robust_accuracy(student, data.test, pixels, device, settings, teacher=teacher, **common)
    teacher_result = ({} if teacher is None else
                      robust_accuracy(teacher, data.test, pixels, device, settings, teacher=None, **common))
    seconds = student_result["robust_seconds"] + teacher_result.get("robust_seconds", 0.0)
    samples = student_result["samples"]
    log.info(cost_line(seconds, samples, epoch_seconds, teacher is not None))
    metrics: dict[str, Any] = {"robust_accuracy": accuracies(student_result)}
    if teacher_result:
        metrics["teacher_robust_accuracy"] = accuracies(teacher_result)
    metrics.update(robust_samples=samples, robust_seconds=seconds)
    log.info("robust accuracy (student / teacher): " + "  ".join(
        f"{key} {value:.4f}" + (f" / {metrics['teacher_robust_accuracy'][key]:.4f}"
                                if key in metrics.get("teacher_robust_accuracy", {}) else "")
        for key, value in metrics["robust_accuracy"].items()))
    return metrics


def cost_line(seconds: float, samples: int, epoch_seconds: float, with_teacher: bool) -> str:
    """`robustness: 5.1 s for 360 test samples (student and teacher), 12.7x a training epoch (0.40 s)`."""
    ratio = f"{seconds / epoch_seconds:.1f}x" if epoch_seconds > 0 else "(no epoch timed)"
    networks = "student and teacher" if with_teacher else "student"
    return (f"robustness: {seconds:.1f} s for {samples} test samples ({networks}), {ratio} a training epoch "
            f"({epoch_seconds:.2f} s)")


def robust_scalars(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """TensorBoard's scalars of robust_metrics' entries: (the student's, test/robust_accuracy/<key>; the
    teacher's, teacher/robust_accuracy/<key>, its level line); <key> names attack, norm and epsilon."""
    return ({STUDENT_TAG + key: value for key, value in metrics.get("robust_accuracy", {}).items()},
            {TEACHER_TAG + key: value for key, value in metrics.get("teacher_robust_accuracy", {}).items()})
