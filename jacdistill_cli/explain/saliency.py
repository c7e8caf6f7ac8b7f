"""A network's own explanation of its prediction, in pixel space: one score per pixel (a spatial position,
its channels together), the higher the more the pixel is taken to support the class.

    gradient          |d logit_c / d pixel| summed over channels (Simonyan et al. 2014)
    gradient_x_input  (d logit_c / d pixel) * (pixel - baseline) summed over channels, signed: the
                      first-order estimate of how much logit_c falls when the pixel is replaced by the
                      deletion baseline (with baseline 0 the usual gradient x input); pixels that speak
                      against the class score below zero and are deleted last
    smoothgrad        |mean of d logit_c / d pixel over noisy copies| summed over channels (Smilkov et al.
                      2017); the noise is drawn per sample from a generator seeded by the sample's index

c is the class the network predicts on the clean image; the logit's gradient (not the probability's, which
vanishes where the network is sure) is the one an evaluation's saliency maps show.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jacdistill_cli.engine.jacobian import class_gradients
from jacdistill_cli.explain.settings import ExplainSettings
from jacdistill_cli.robustness.attacks import per_sample_draws
from jacdistill_cli.robustness.pixels import Pixels


def pixel_gradients(model: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
    """d logit_classes[i] / d images[i] of a network on pixels (a PixelModel): [b, C, H, W]."""
    with torch.enable_grad():
        leaf = images.detach().requires_grad_(True)
        return class_gradients(model(leaf), leaf, classes, create_graph=False).detach()


def smoothgrad_gradients(model: nn.Module, clean: Tensor, classes: Tensor, pixels: Pixels,
                         settings: ExplainSettings, indices: Tensor) -> Tensor:
    """The mean gradient over settings.smoothgrad.samples noisy copies of each image: [b, C, H, W]. The
    noise's std is smoothgrad.noise times the pixel range (no range: the image's own max - min)."""
    copies = settings.smoothgrad.samples
    if pixels.clipped:
        spread = torch.full((len(clean),), float(pixels.high - pixels.low), device=clean.device)
    else:
        flat = clean.flatten(1)
        spread = flat.amax(1) - flat.amin(1)
    draws = per_sample_draws((copies, *clean.shape[1:]), settings.seed, "explain:smoothgrad", indices, "normal",
                             clean.device)
    scale = (settings.smoothgrad.noise * spread).view(-1, *([1] * (draws.dim() - 1)))
    noisy = (clean.unsqueeze(1) + scale * draws).flatten(0, 1)
    gradients = pixel_gradients(model, noisy, classes.repeat_interleave(copies))
    return gradients.view(len(clean), copies, *clean.shape[1:]).mean(1)


def pixel_saliency(model: nn.Module, clean: Tensor, classes: Tensor, baseline: Tensor, pixels: Pixels,
                   settings: ExplainSettings, indices: Tensor) -> Tensor:
    """settings.saliency of a network on pixels (a PixelModel) for clean images [b, C, H, W] and their
    predicted classes [b]: one score per pixel, [b, H * W] (row-major). `baseline` [b, C, H, W]: the
    deletion baseline (gradient_x_input); `indices` [b]: the samples' indices in the split (smoothgrad's
    noise)."""
    if settings.saliency == "smoothgrad":
        return smoothgrad_gradients(model, clean, classes, pixels, settings, indices).abs().sum(1).flatten(1)
    gradients = pixel_gradients(model, clean, classes)
    if settings.saliency == "gradient_x_input":
        return (gradients * (clean - baseline)).sum(1).flatten(1)
    return gradients.abs().sum(1).flatten(1)
