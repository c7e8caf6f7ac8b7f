"""Explanation agreement: do the student and the teacher point at the same pixels?

From the input-gradients an evaluation already has (both networks' gradients of the teacher's top class,
[batch, C, H, W]), per sample:

    saliency map               |gradient| summed over channels, [batch, H, W]
    rank correlation           Spearman's rho of the two maps (Pearson's correlation of their ranks, tied
                               pixels taking the average of their ranks, as scipy.stats.spearmanr)
    top-10% overlap            intersection over union of the two maps' k = ceil(H * W / 10) highest pixels

`explanation_sums` gives a batch's sums of both as 0-dim tensors on the batch's device (no host read): an
evaluation adds them to its other sums and divides by the sample count once at the end.

Defined values where a formula is not:
- rank correlation: a constant map (every pixel tied, e.g. a zero gradient) has no ranking, and Pearson's
  correlation of a constant is 0 / 0 (scipy says NaN). Both maps constant: 1 (the two rankings are the same,
  every pixel tied in both, so a network compared with itself always gives 1); one map constant: 0 (one
  network ranks no pixel above another: nothing to agree with, as with uncorrelated maps).
- top-k overlap: ties are broken by the lower pixel index first (row-major over H, W), so each set has
  exactly k pixels, the union at least k, and the overlap is always defined (two constant maps both take
  the first k pixels: overlap 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

TOP_PERCENT = 10
METRICS = ("explanation_rank_correlation", "explanation_top10_iou")


def saliency_maps(gradients: Tensor) -> Tensor:
    """|gradient| summed over channels, in float32: [b, C, *spatial] -> [b, *spatial] ([b, d] flat
    inputs: [b, d], |gradient| itself)."""
    magnitude = gradients.detach().float().abs()
    return magnitude.sum(1) if magnitude.dim() >= 3 else magnitude


def _descending(maps: Tensor) -> tuple[Tensor, Tensor]:
    """(the negated values in ascending order [b, n], the pixel order [b, n]): pixels from the highest
    value to the lowest, tied pixels by lower index first (a stable sort of the negated values)."""
    return (-maps.flatten(1)).sort(dim=1, stable=True)


def _ranks(negated_sorted: Tensor, order: Tensor) -> Tensor:
    """Average ranks (1-based, ties averaged) of -maps, [b, n] in pixel order, from their sort: the values
    at sorted positions first..last of one tied group all take the rank (first + last) / 2 + 1 (a cumulative
    max and min find each group's ends: linear, no search)."""
    rows, n = negated_sorted.shape
    places = torch.arange(n, device=order.device).expand(rows, n)
    change = negated_sorted[:, 1:] != negated_sorted[:, :-1]    # a new group starts at j + 1
    edge = change.new_ones(rows, 1)
    first = torch.where(torch.cat([edge, change], 1), places, 0).cummax(1).values
    last = torch.where(torch.cat([change, edge], 1), places, n - 1).flip(1).cummin(1).values.flip(1)
    average = (first + last).float() / 2 + 1
    return torch.empty_like(average).scatter_(1, order, average)


def average_ranks(maps: Tensor) -> Tensor:
    """[b, *spatial] -> [b, n]: each pixel's rank within its map, 1 for the lowest value, ties taking
    their average rank (scipy.stats.rankdata's `average`)."""
    negated, order = _descending(maps)
    return maps.flatten(1).shape[1] + 1 - _ranks(negated, order)


def _correlation(ranks_a: Tensor, ranks_b: Tensor, constant_a: Tensor, constant_b: Tensor) -> Tensor:
    """Pearson's correlation of rank rows [b, n] -> [b], with the defined values of the module's
    docstring where a row is constant (`constant_a`, `constant_b`: [b] booleans). Average ranks always sum
    to n (n + 1) / 2, so they are centred on (n + 1) / 2 exactly (a computed mean would round)."""
    centre = (ranks_a.shape[1] + 1) / 2
    a, b = ranks_a - centre, ranks_b - centre
    rho = (a * b).sum(1) / (a.square().sum(1) * b.square().sum(1)).clamp_min(1e-30).sqrt()
    rho = rho.clamp(-1, 1).masked_fill(constant_a | constant_b, 0.0)
    return rho.masked_fill(constant_a & constant_b, 1.0)


def _constant(negated_sorted: Tensor) -> Tensor:
    """[b] booleans: the map's pixels are all equal (its lowest value is its highest)."""
    return negated_sorted[:, 0] == negated_sorted[:, -1]


def _top_masks(order: Tensor, k: int) -> Tensor:
    """[b, n] booleans: the first k pixels of each order."""
    mask = order.new_zeros(order.shape, dtype=bool)
    return mask.scatter_(1, order[:, :k], True)


def top_count(pixels: int, percent: int = TOP_PERCENT) -> int:
    """k = ceil(pixels * percent / 100), in integers (0.1 * 30 is 3.0000000000000004 in floats)."""
    return -(-pixels * percent // 100)


def _agreement(student_maps: Tensor, teacher_maps: Tensor, percent: int) -> tuple[Tensor, Tensor]:
    """(rank correlation [b], top-percent overlap [b]) of two batches of maps: one sort of both batches
    together serves both measures (the ranks of -map give the same correlation as those of map: both
    rankings are reversed)."""
    both = torch.cat([student_maps.flatten(1), teacher_maps.flatten(1)])
    rows = len(student_maps)
    negated_sorted, order = _descending(both)
    ranks, constant = _ranks(negated_sorted, order), _constant(negated_sorted)
    rho = _correlation(ranks[:rows], ranks[rows:], constant[:rows], constant[rows:])
    k = top_count(order.shape[1], percent)
    top = _top_masks(order, k)
    shared = (top[:rows] & top[rows:]).sum(1).float()
    return rho, shared / (2 * k - shared)


def rank_correlation(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """Spearman's rank correlation of two batches of maps [b, *spatial] -> [b] (see the module's docstring
    for constant maps: never NaN)."""
    return _agreement(maps_a, maps_b, TOP_PERCENT)[0]


def top_overlap(maps_a: Tensor, maps_b: Tensor, percent: int = TOP_PERCENT) -> Tensor:
    """Intersection over union of the two maps' ceil(n * percent / 100) highest pixels (ties: the lower
    pixel index first), [b, *spatial] -> [b] in [0, 1]."""
    return _agreement(maps_a, maps_b, percent)[1]


def explanation_sums(student_gradients: Tensor, teacher_gradients: Tensor) -> dict[str, Tensor]:
    """A batch's sums over its samples, 0-dim float32 tensors on the gradients' device:
    {"explanation_rank_correlation": sum of Spearman's rho of the two saliency maps,
     "explanation_top10_iou": sum of the overlap of their top 10% pixels}.
    Gradients: [b, C, H, W] (or [b, d]), the student's and the teacher's of the same class per sample."""
    rho, overlap = _agreement(saliency_maps(student_gradients), saliency_maps(teacher_gradients), TOP_PERCENT)
    return {METRICS[0]: rho.sum(), METRICS[1]: overlap.sum()}
