"""Robust accuracy of a network over a split: each attack of the settings on its first `samples` samples.

    robust_accuracy(model, split, pixels, device, settings, teacher=None, part=Part(rank, ranks, reduce=sums))
        -> {"clean": ..., "pgd_linf_0.1": ..., "noise_0.1": ..., "samples": n, "robust_seconds": s}

A sample counts as robust to an attack when the network classifies both it and its adversarial example
correctly (an attack cannot make a misclassified sample count); `noise_*` is the plain accuracy on the
noisy samples. The samples are taken in blocks of `batch_size` in the split's order; under
torch.distributed rank r attacks the blocks r, r + ranks, ... and `reduce` sums the counts over the ranks
(loop/distributed.reduce_sums). Random draws are seeded per sample (per block for torchattacks' attacks),
so the result does not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from jacdistill_cli.robustness.attacks import Attack, Context, run_attack
from jacdistill_cli.robustness.pixels import PixelModel, Pixels, attacked
from jacdistill_cli.robustness.settings import RobustnessSettings
from jacdistill_cli.zoo.data import batches

log = logging.getLogger("jacdistill")


def blocks(split, samples: int, batch_size: int, device: torch.device, part: tuple[int, int]
           ) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """(block number, inputs [b, *input], labels [b], the samples' indices in the split [b]) of this
    part's blocks among the first `samples` samples."""
    rank, ranks = part
    start = 0
    for number, (inputs, labels) in enumerate(batches(split, batch_size, False, None, device)):
        if start >= samples:
            return
        keep = min(len(labels), samples - start)
        if number % ranks == rank:
            indices = torch.arange(start, start + keep)
            yield number, inputs[:keep], labels[:keep], indices
        start += len(labels)


def skipped(attacks: tuple[Attack, ...], pixels: Pixels, teacher: nn.Module | None) -> dict[str, str]:
    """{key: why} for the attacks that cannot run here."""
    reasons = {attack.key: attack.unavailable(pixels, teacher) for attack in attacks}
    return {key: why for key, why in reasons.items() if why is not None}


def robust_counts(model: nn.Module, split, pixels: Pixels, device: torch.device, settings: RobustnessSettings,
                  teacher: nn.Module | None = None, part: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """This part's counts: {"clean": correct, key: correct under the attack, ..., "count": samples}."""
    samples = len(split) if settings.samples is None else min(settings.samples, len(split))
    reasons = skipped(settings.attacks, pixels, teacher)
    attacks = [a for a in settings.attacks if a.key not in reasons]
    counts = {"clean": 0.0, **{a.key: 0.0 for a in attacks}, "count": 0.0}
    target = PixelModel(model, pixels)
    source = None if teacher is None else PixelModel(teacher, pixels)
    with attacked(model), (attacked(teacher) if teacher is not None else contextlib.nullcontext()):
        for number, inputs, labels, indices in blocks(split, samples, settings.batch_size, device, part):
            clean = pixels.to_pixels(inputs.float())
            with torch.no_grad():
                right = target(clean).argmax(1) == labels
            counts["clean"] += right.sum().item()
            counts["count"] += len(labels)
            context = Context(pixels, settings.seed, indices, source, number)
            for attack in attacks:
                adversarial = run_attack(attack, target, clean, labels, context)
                with torch.no_grad():
                    hit = target(adversarial).argmax(1) == labels
                counts[attack.key] += (hit if attack.plain_accuracy else hit & right).sum().item()
    return counts


@dataclass(frozen=True)
class Part:
    """This process's part of a measurement: rank `rank` of `ranks` takes the blocks rank, rank + ranks, ...;
    `reduce` sums a list of floats over the parts (None: one process, nothing to sum)."""

    rank: int = 0
    ranks: int = 1
    reduce: Callable[[list[float]], list[float]] | None = None


def robust_accuracy(model: nn.Module, split, pixels: Pixels, device: torch.device, settings: RobustnessSettings,
                    teacher: nn.Module | None = None, part: Part = Part(), role: str = "model") -> dict[str, float]:
    """{"clean", each attack's key: accuracy over the attacked samples, "samples": how many were attacked
    (over all parts), "robust_seconds": this part's wall time}. `teacher`: the network a `transfer_pgd`
    attack is made on (attacks that cannot run are left out and said in one line each; so is a dataset
    without a pixel range, whose attacks are not clipped). `part`: this process's blocks and how the counts
    are summed over the processes. `role` names the attacked network in those lines (the student, the teacher:
    the teacher is the source of a transfer attack, so its own row has none)."""
    started = time.perf_counter()
    if not settings.enabled:
        return {}
    if not pixels.clipped:
        log.info("robustness: the dataset has no pixel range; attacks and noise are not clipped")
    for key, why in skipped(settings.attacks, pixels, teacher).items():
        if role == "teacher" and teacher is None and key.startswith("transfer"):
            why = "the teacher is the network a transfer attack is made on"
        log.info(f"robustness: {key} is not measured for the {role}: {why}")
    counts = robust_counts(model, split, pixels, device, settings, teacher, (part.rank, part.ranks))
    names, values = list(counts), [counts[n] for n in counts]
    totals = dict(zip(names, part.reduce(values) if part.reduce is not None else values))
    count = totals.pop("count")
    result = {name: value / max(count, 1.0) for name, value in totals.items()}
    result["samples"] = int(count)
    result["robust_seconds"] = time.perf_counter() - started
    return result
