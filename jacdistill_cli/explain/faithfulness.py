"""Faithfulness of a network's own explanations: deletion and insertion curves (Petsiuk et al., RISE, 2018).

    faithfulness(model, split, pixels, device, settings, part=(rank, ranks), reduce=sums)
        -> {"deletion_area", "insertion_area", "random_deletion_area", "random_insertion_area",
            "deletion_curve", "insertion_curve", "random_deletion_curve", "random_insertion_curve",
            "fractions", "samples", "explain_seconds"}

For each of the first `samples` samples of a split, in pixel space (robustness/pixels.py: the network
normalises inside), with c the class the network predicts on the clean image and the pixels (spatial
positions, channels together) ordered by the network's own saliency (saliency.py; ties: the lower pixel
index first):

    deletion    the image with its first m pixels replaced by the baseline (`zero`: pixels 0, black;
                `mean`: the dataset's mean pixel; `blur`: the blurred image), m = 0 .. H W in `steps` steps
    insertion   the canvas (`blur`, as RISE: the image under a Gaussian blur of std `blur_sigma` pixels;
                or `zero`, `mean`) with the image's first m pixels put back

A curve is the mean over the samples of the probability of c at each step (m_j = floor(j H W / steps),
j = 0 .. steps; "fractions" are m_j / (H W)); its area is the trapezoid rule over the fractions. A faithful
saliency makes the deletion area low (the probability falls as soon as the pixels it names go) and the
insertion area high. The random areas are the same curves for `random_orders` random orders per sample,
averaged: what an explanation that knows nothing gets. Random draws (the orders, smoothgrad's noise) are
seeded per sample index: a sample's curves do not depend on the block it is in nor on the rank that
measures it. The samples are taken in blocks of `batch_size` in the split's order; under torch.distributed
rank r takes the blocks r, r + ranks, ... and `reduce` sums the per-rank sums (loop/distributed.reduce_sums),
so `trainer.devices=2` gives the numbers of one process (up to float rounding of the batched passes).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from jacdistill_cli.errors import UsageError
from jacdistill_cli.explain.saliency import pixel_saliency
from jacdistill_cli.explain.settings import ExplainSettings
from jacdistill_cli.robustness.attacks import per_sample_draws
from jacdistill_cli.robustness.measure import blocks
from jacdistill_cli.robustness.pixels import PixelModel, Pixels, attacked
from jacdistill_cli.zoo.data import batches

CURVES = ("deletion_curve", "insertion_curve", "random_deletion_curve", "random_insertion_curve")


def reference_images(clean: Tensor, kind: str, pixels: Pixels, blur_sigma: float) -> Tensor:
    """What a deleted pixel becomes (the baseline) or where insertion starts (the canvas), [b, C, H, W]:
    `zero` pixels 0, `mean` the dataset's mean pixel (the normalised input 0), `blur` the image under a
    Gaussian blur of std `blur_sigma` pixels (reflected at the border; the kernel 6 sigma + 1 wide, at most
    2 min(H, W) - 1, the widest reflection allows)."""
    if kind == "zero":
        return torch.zeros_like(clean)
    if kind == "mean":
        return pixels.to_pixels(torch.zeros_like(clean))
    width = min(2 * math.ceil(3 * blur_sigma) + 1, 2 * min(clean.shape[-2:]) - 1)
    return gaussian_blur(clean, [width, width], [blur_sigma, blur_sigma])


def step_counts(pixel_count: int, steps: int) -> list[int]:
    """Pixels deleted (inserted) after each step: floor(j n / steps), j = 0 .. steps."""
    return [j * pixel_count // steps for j in range(steps + 1)]


def pixel_orders(saliency: Tensor, random_orders: int, seed: int, indices: Tensor) -> Tensor:
    """[b, 1 + R, n]: row 0 the pixels by decreasing saliency [b, n] (ties: lower index first), rows 1..R
    random orders, sample i's drawn from a generator seeded by (seed, its index indices[i])."""
    order = (-saliency).sort(dim=1, stable=True).indices
    draws = per_sample_draws((random_orders, saliency.shape[1]), seed, "explain:random_order", indices, "uniform",
                             saliency.device)
    return torch.cat([order.unsqueeze(1), draws.argsort(dim=-1)], dim=1)


def positions_of(orders: Tensor) -> Tensor:
    """The inverse permutations: positions[..., p] is pixel p's place in orders[...] (same shape)."""
    places = torch.arange(orders.shape[-1], device=orders.device).expand_as(orders)
    return torch.empty_like(orders).scatter_(-1, orders, places)


def class_probability(model: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
    """softmax(model(images))[i, classes[i]], [b]."""
    with torch.no_grad():
        return model(images).float().softmax(1).gather(1, classes.unsqueeze(1)).squeeze(1)


def curves(score: Callable[[Tensor], Tensor], start: Tensor, end: Tensor, positions: Tensor,
           counts: list[int]) -> Tensor:
    """[b, K, len(counts)]: score of the images that take `end`'s pixels where positions < m and `start`'s
    elsewhere, for each count m. start, end [b, C, H, W]; positions [b, K, H * W] (K orders per sample);
    score: images [b * K, C, H, W] -> [b * K]. The first and last points (nothing, everything taken) are
    the same for every order and scored once."""
    b, orders = positions.shape[:2]
    first, last = score(start), score(end)
    points = [first.unsqueeze(1).expand(b, orders)]
    shape = (b, orders, 1, *start.shape[2:])
    for count in counts[1:-1]:
        taken = (positions < count).view(shape)
        images = torch.where(taken, end.unsqueeze(1), start.unsqueeze(1)).flatten(0, 1)
        points.append(score(images).view(b, orders))
    points.append(last.unsqueeze(1).expand(b, orders))
    return torch.stack(points, dim=2)


def block_sums(model: nn.Module, clean: Tensor, indices: Tensor, pixels: Pixels, settings: ExplainSettings
               ) -> dict[str, Tensor]:
    """One block's sums over its samples of the four curves ([steps + 1] each, float64): the saliency's
    and the mean of the random orders'. model: the network on pixels (a PixelModel); clean [b, C, H, W]."""
    with torch.no_grad():
        classes = model(clean).argmax(1)
    baseline = reference_images(clean, settings.baseline, pixels, settings.blur_sigma)
    canvas = reference_images(clean, settings.canvas, pixels, settings.blur_sigma)
    saliency = pixel_saliency(model, clean, classes, baseline, pixels, settings, indices)
    positions = positions_of(pixel_orders(saliency, settings.random_orders, settings.seed, indices))
    counts = step_counts(saliency.shape[1], settings.steps)
    orders = positions.shape[1]
    score = lambda images: class_probability(model, images, classes.repeat_interleave(  # noqa: E731
        len(images) // len(classes)))
    sums = {}
    for name, start, end in (("deletion", clean, baseline), ("insertion", canvas, clean)):
        points = curves(score, start, end, positions, counts).double()
        sums[f"{name}_curve"] = points[:, 0].sum(0)
        sums[f"random_{name}_curve"] = points[:, 1:orders].mean(1).sum(0)
    return sums


def image_pixels(split, device: torch.device) -> int:
    """H * W of the split's images, or one line saying the inputs are no images [C, H, W]."""
    inputs = next(iter(batches(split, 1, False, None, device)))[0]
    if inputs.dim() != 4:
        raise UsageError(f"explain needs images [C, H, W]; this dataset's inputs are {list(inputs.shape[1:])}")
    return inputs.shape[-2] * inputs.shape[-1]


def faithfulness_sums(model: nn.Module, split, pixels: Pixels, device: torch.device, settings: ExplainSettings,
                      part: tuple[int, int] = (0, 1)) -> dict[str, Tensor]:
    """This part's sums (on `device`, float64, no host read): the four curves summed over its samples
    ([steps + 1] each) and "count" (0-dim), to be summed over the parts."""
    samples = len(split) if settings.samples is None else min(settings.samples, len(split))
    sums = {name: torch.zeros(settings.steps + 1, dtype=torch.float64, device=device) for name in CURVES}
    sums["count"] = torch.zeros((), dtype=torch.float64, device=device)
    target = PixelModel(model, pixels)
    with attacked(model):
        for _, inputs, _, indices in blocks(split, samples, settings.batch_size, device, part):
            for name, value in block_sums(target, pixels.to_pixels(inputs.float()), indices, pixels,
                                          settings).items():
                sums[name] += value
            sums["count"] += len(indices)
    return sums


def area(fractions: list[float], curve: list[float]) -> float:
    """The trapezoid rule: the area under curve[j] at fractions[j]."""
    return sum((curve[j] + curve[j + 1]) / 2 * (fractions[j + 1] - fractions[j]) for j in range(len(curve) - 1))


def faithfulness(model: nn.Module, split, pixels: Pixels, device: torch.device, settings: ExplainSettings,
                 part: tuple[int, int] = (0, 1), reduce: Callable[[list[float]], list[float]] | None = None
                 ) -> dict[str, float | int | list[float]]:
    """The network's curves and areas over the first settings.samples samples of `split` (all parts
    together), as plain floats: see the module's docstring for the keys ({} when settings are not enabled).
    `reduce` sums a list of floats over the parts (identity for one process)."""
    started = time.perf_counter()
    if not settings.enabled:
        return {}
    pixel_count = image_pixels(split, device)
    sums = faithfulness_sums(model, split, pixels, device, settings, part)
    flat = torch.cat([sums[name] for name in CURVES] + [sums["count"].view(1)]).tolist()
    flat = reduce(flat) if reduce is not None else flat
    count = max(flat[-1], 1.0)
    length = settings.steps + 1
    result: dict[str, float | int | list[float]] = {
        name: [value / count for value in flat[i * length:(i + 1) * length]] for i, name in enumerate(CURVES)}
    fractions = [m / pixel_count for m in step_counts(pixel_count, settings.steps)]
    for name in CURVES:
        result[name.replace("_curve", "_area")] = area(fractions, result[name])
    result["fractions"] = fractions
    result["samples"] = int(flat[-1])
    result["explain_seconds"] = time.perf_counter() - started
    return result
