"""Robust accuracy at the end of a train run: the student's and the teacher's on the test split
(robustness/measure.py), as metrics.json's entries, TensorBoard's scalars and one line of cost.

    robust_metrics(student, teacher, data, device, world, settings, epoch_seconds, teacher_file=None)
        -> {"robust_accuracy": {"clean": ..., "pgd_linf_0.1": ..., ...}, "teacher_robust_accuracy": {...},
            "robust_samples": n, "robust_seconds": s}        ({} when the settings hold no attack)

A cached teacher is the same in every run of a sweep that shares it: its robust accuracy is remembered next
to its cache entry (`<entry>.robust-<hash of the settings>.json`) and read back by the next run instead of
attacking it again.
    robust_scalars(metrics) -> ({"test/robust_accuracy/pgd_linf_0.1": ...}, {"teacher/robust_accuracy/...": ...})
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jacdistill_cli.loop.distributed import World, broadcast, reduce_sums
from jacdistill_cli.robustness.measure import Part, robust_accuracy
from jacdistill_cli.robustness.pixels import Pixels
from jacdistill_cli.robustness.settings import RobustnessSettings
from jacdistill_cli.storage import write_json

log = logging.getLogger("jacdistill")

# What robust_accuracy returns besides the accuracies: they are metrics.json's own entries.
COUNTS = ("samples", "robust_seconds")
STUDENT_TAG, TEACHER_TAG = "test/robust_accuracy/", "teacher/robust_accuracy/"
# The attacks' version a remembered result was measured with (its file's name, the cache key, is the same for
# every version): 2 since PGD's L2 random start draws its radius uniformly, as torchattacks does.
MEASURED_BY, ATTACKS_VERSION = "attacks_version", 2


def accuracies(result: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in result.items() if key not in COUNTS}


def robust_metrics(student: nn.Module, teacher: nn.Module | None, data: Any, device: torch.device, world: World,
                   settings: RobustnessSettings, epoch_seconds: float, teacher_file: Path | None = None
                   ) -> dict[str, Any]:
    """The student's robust accuracy on the test split (attacked in eval mode, float32, its gate closed;
    `transfer_pgd` made on the teacher) and the teacher's (without the transfer attack, whose source it is);
    under torch.distributed each rank attacks its blocks and the counts are summed. `epoch_seconds`: a
    training epoch's wall time, which the cost is logged against. `teacher_file`: the cached teacher's
    entry, next to which its robust accuracy is remembered for the next run of the same settings."""
    if not settings.enabled:
        return {}
    pixels = Pixels.of(data)
    common = dict(part=Part(world.rank, world.size, lambda values: reduce_sums(values, world, device)))
    student_result = robust_accuracy(student, data.test, pixels, device, settings, teacher=teacher, **common,
                                     role="student")
    teacher_result, remembered = {}, False
    if teacher is not None:
        path = None if teacher_file is None else remembered_path(teacher_file, settings, device)
        teacher_result = broadcast(read_remembered(path) if world.main else None, world)
        remembered = teacher_result is not None
        if not remembered:
            teacher_result = robust_accuracy(teacher, data.test, pixels, device, settings, teacher=None, **common,
                                             role="teacher")
            if world.main and path is not None:
                remember(path, teacher_result)
    seconds = student_result["robust_seconds"] + teacher_result.get("robust_seconds", 0.0)
    samples = student_result["samples"]
    log.info(cost_line(seconds, samples, epoch_seconds, "student" if teacher is None else
                       "student; the teacher's remembered" if remembered else "student and teacher"))
    metrics: dict[str, Any] = {"robust_accuracy": accuracies(student_result)}
    if teacher_result:
        metrics["teacher_robust_accuracy"] = accuracies(teacher_result)
    metrics.update(robust_samples=samples, robust_seconds=seconds)
    log.info("robust accuracy (student / teacher): " + "  ".join(
        f"{key} {value:.4f}" + (f" / {metrics['teacher_robust_accuracy'][key]:.4f}"
                                if key in metrics.get("teacher_robust_accuracy", {}) else "")
        for key, value in metrics["robust_accuracy"].items()))
    return metrics


def cost_line(seconds: float, samples: int, epoch_seconds: float, attacked: str) -> str:
    """`robustness: 5.1 s for 360 test samples (student and teacher), 12.7x a training epoch (0.40 s)`."""
    ratio = f"{seconds / epoch_seconds:.1f}x" if epoch_seconds > 0 else "(no epoch timed)"
    return (f"robustness: {seconds:.1f} s for {samples} test samples ({attacked}), {ratio} a training epoch "
            f"({epoch_seconds:.2f} s)")


def remembered_path(teacher_file: Path, settings: RobustnessSettings, device: torch.device) -> Path:
    """Where the robust accuracy of the teacher in `teacher_file` under `settings` is remembered: next to it,
    named by a hash of the settings, the device type and the file's size and modification time (a teacher
    trained anew into the same entry is measured anew)."""
    stat = Path(teacher_file).stat()
    key = json.dumps({"attacks": [a.identity() for a in settings.attacks], "samples": settings.samples,
                      "batch_size": settings.batch_size, "seed": settings.seed, "device": device.type,
                      "file": [stat.st_size, stat.st_mtime_ns]}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(teacher_file).with_name(f"{Path(teacher_file).name}.robust-{digest}.json")


def read_remembered(path: Path | None) -> dict[str, float] | None:
    """The remembered result at `path` (robust_seconds 0: nothing was attacked), or None."""
    try:
        found = json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get(MEASURED_BY) != ATTACKS_VERSION:
        return None   # remembered by an earlier version of the attacks (PGD's L2 start was weaker): measured anew
    log.info(f"robustness: the teacher's robust accuracy as measured before ({path})")
    return {**{k: v for k, v in found.items() if k != MEASURED_BY}, "robust_seconds": 0.0}


def remember(path: Path, result: dict[str, float]) -> None:
    """Keep the teacher's result for the next run; a cache that cannot be written only costs that."""
    try:
        write_json(path, {**{k: v for k, v in result.items() if k != "robust_seconds"}, MEASURED_BY: ATTACKS_VERSION})
    except OSError as err:
        log.info(f"robustness: the teacher's robust accuracy is not remembered ({err})")


def robust_scalars(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """TensorBoard's scalars of robust_metrics' entries: (the student's, test/robust_accuracy/<key>; the
    teacher's, teacher/robust_accuracy/<key>, its level line); <key> names attack, norm and epsilon."""
    return ({STUDENT_TAG + key: value for key, value in metrics.get("robust_accuracy", {}).items()},
            {TEACHER_TAG + key: value for key, value in metrics.get("teacher_robust_accuracy", {}).items()})
