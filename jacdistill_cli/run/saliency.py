"""Saliency maps for TensorBoard: the teacher's and the student's input-gradients, side by side.

Both maps are gradients of the logit of the teacher's top class (what `top1` Jacobian matching makes
the student imitate), for a fixed set of validation images, so the maps of successive epochs compare.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacdistill_cli.engine.jacobian import class_gradients

TILE = 48  # pixels per image side in the grid: 8x8 digits are scaled up to be seen


def fixed_inputs(split, device: torch.device | None = None, count: int = 8) -> Tensor:
    """The first `count` inputs of a split (in-memory or a torch Dataset), [count, *input] on `device`
    (default: where they are): the same images every epoch."""
    count = min(count, len(split))
    if hasattr(split, "inputs"):
        inputs = split.inputs[:count].detach()
    else:
        inputs = torch.stack([torch.as_tensor(split[i][0]) for i in range(count)])
    return inputs if device is None else inputs.to(device)


def input_gradients(model: nn.Module, inputs: Tensor, classes: Tensor) -> Tensor:
    """Gradient of logit `classes[i]` w.r.t. input i, in eval mode: [n, *input] for inputs [n, *input]."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            leaf = inputs.detach().requires_grad_(True)
            grads = class_gradients(model(leaf), leaf, classes, create_graph=False)
    finally:
        model.train(was_training)
    return grads.detach()


def _normalise(images: Tensor) -> Tensor:
    """Scale each image of [n, c, h, w] to [0, 1] on its own (a constant image becomes 0)."""
    flat = images.flatten(1)
    low = flat.min(1, keepdim=True).values
    high = flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(images)


def _rgb(images: Tensor) -> Tensor:
    """[n, 1 or 3, h, w] -> [n, 3, h, w]; other channel counts are shown as their mean (grey)."""
    if images.shape[1] == 3:
        return images
    if images.shape[1] != 1:
        images = images.mean(1, keepdim=True)
    return images.expand(-1, 3, -1, -1)


def saliency_grid(inputs: Tensor, teacher_grads: Tensor, student_grads: Tensor, tile: int = TILE) -> Tensor:
    """An image [3, 3 * (tile + 2) + 2, n * (tile + 2) + 2]: row 1 the inputs, row 2 the teacher's saliency, row 3 the
    student's, one column per input. inputs and grads: [n, c, h, w] with c = 1 or 3 (or [n, d] flat,
    drawn as a 1 x d strip). Saliency is |gradient|, the maximum over channels, each map scaled to [0, 1]."""
    def as_images(x: Tensor) -> Tensor:
        x = x.detach().float().cpu()
        if x.dim() == 2:
            x = x[:, None, None, :]
        elif x.dim() == 3:
            x = x[:, None]
        return x

    from torchvision.utils import make_grid

    images = _rgb(_normalise(as_images(inputs)))
    maps = [_rgb(_normalise(as_images(g).abs().amax(1, keepdim=True))) for g in (teacher_grads, student_grads)]
    tiles = torch.cat([F.interpolate(row, size=(tile, tile), mode="nearest") for row in (images, *maps)])
    return make_grid(tiles, nrow=len(images), padding=2, pad_value=0.5)


def saliency_image(student: nn.Module, teacher: nn.Module, inputs: Tensor) -> Tensor:
    """The grid of saliency_grid, [3, 3 * (TILE + 2) + 2, n * (TILE + 2) + 2], for inputs [n, *input]:
    both networks' input-gradients of the teacher's top class for each input."""
    with torch.no_grad():
        top = teacher(inputs).argmax(1)
    return saliency_grid(inputs, input_gradients(teacher, inputs, top), input_gradients(student, inputs, top))
