"""Saliency maps for TensorBoard: the teacher's and the student's input-gradients, side by side.

Both maps are gradients of the logit of the teacher's top class (what `top1` Jacobian matching makes
the student imitate), for a fixed set of validation images, so the maps of successive epochs compare.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacdistill_cli.engine.jacobian import class_gradients

SALIENCY_MODES = ("abs", "signed")  # how the input-gradients are drawn (trainer.saliency)

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


LABEL_WIDTH = 56     # pixels left of the grid for the row labels
CAPTION_HEIGHT = 14  # pixels under the grid for each column's cosine
ROW_LABELS = ("input", "teacher", "student")


def _maps(grads: Tensor, mode: str) -> Tensor:
    """Saliency maps [n, 3, h, w] in [0, 1] of gradients [n, c, h, w]. `abs`: |gradient|, the maximum
    over channels, scaled to [0, 1] per map (grey). `signed`: the gradient summed over channels, divided
    by its largest magnitude per map, red where it is positive, blue where negative, white at zero."""
    if mode == "abs":
        return _rgb(_normalise(grads.abs().amax(1, keepdim=True)))
    summed = grads.sum(1, keepdim=True)
    scaled = summed / summed.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    positive, negative = scaled.clamp_min(0), (-scaled).clamp_min(0)
    return torch.cat([1 - negative, 1 - positive - negative, 1 - positive], dim=1)


def _as_images(x: Tensor) -> Tensor:
    """[n, c, h, w] as it is; [n, d] as 1 x d strips; [n, h, w] with one channel."""
    x = x.detach().float().cpu()
    if x.dim() == 2:
        x = x[:, None, None, :]
    elif x.dim() == 3:
        x = x[:, None]
    return x


def _labelled(grid: Tensor, tile: int, cosines: list[float]) -> Tensor:
    """`grid` with the row labels (input, teacher, student) in a margin on its left and each column's
    cosine of the teacher's and the student's gradients in a strip under it."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    _, height, width = grid.shape
    canvas = Image.new("RGB", (LABEL_WIDTH + width, height + CAPTION_HEIGHT), (0, 0, 0))
    pixels = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)), (LABEL_WIDTH, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for row, label in enumerate(ROW_LABELS):
        draw.text((4, 2 + row * (tile + 2) + tile // 2), label, fill=(255, 255, 255), font=font, anchor="lm")
    draw.text((4, height + CAPTION_HEIGHT // 2), "cosine", fill=(255, 255, 255), font=font, anchor="lm")
    for column, cosine in enumerate(cosines):
        draw.text((LABEL_WIDTH + 2 + column * (tile + 2) + tile // 2, height + CAPTION_HEIGHT // 2),
                  f"{cosine:.2f}", fill=(255, 255, 255), font=font, anchor="mm")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def saliency_grid(inputs: Tensor, teacher_grads: Tensor, student_grads: Tensor, tile: int = TILE,
                  mode: str = "abs", labels: bool = True) -> Tensor:
    """A grid of one column per input: row 1 the input, row 2 the teacher's saliency map, row 3 the
    student's (_maps: `abs` or `signed`), each tile `tile` pixels square with 2 pixels between. inputs and
    grads: [n, c, h, w] with c = 1 or 3 (or [n, d] flat, drawn as a 1 x d strip). With `labels`, the rows
    are named in a margin of LABEL_WIDTH pixels on the left and each column's cosine of the two gradients
    is written under it (CAPTION_HEIGHT pixels): [3, 3 * (tile + 2) + 2 + CAPTION_HEIGHT,
    LABEL_WIDTH + n * (tile + 2) + 2]; without, [3, 3 * (tile + 2) + 2, n * (tile + 2) + 2]."""
    from torchvision.utils import make_grid

    if mode not in SALIENCY_MODES:
        raise ValueError(f"saliency mode {mode!r}: it must be one of {', '.join(SALIENCY_MODES)}")
    teacher_grads, student_grads = _as_images(teacher_grads), _as_images(student_grads)
    images = _rgb(_normalise(_as_images(inputs)))
    maps = [_maps(g, mode) for g in (teacher_grads, student_grads)]
    tiles = torch.cat([F.interpolate(row, size=(tile, tile), mode="nearest") for row in (images, *maps)])
    grid = make_grid(tiles, nrow=len(images), padding=2, pad_value=0.5)
    if not labels:
        return grid
    cosines = F.cosine_similarity(teacher_grads.flatten(1), student_grads.flatten(1), dim=1, eps=1e-12)
    return _labelled(grid, tile, cosines.tolist())


def saliency_image(student: nn.Module, teacher: nn.Module, inputs: Tensor, mode: str = "abs") -> Tensor:
    """The labelled grid of saliency_grid for inputs [n, *input]: both networks' input-gradients of the
    teacher's top class for each input, drawn as `mode` (abs or signed)."""
    with torch.no_grad():
        top = teacher(inputs).argmax(1)
    return saliency_grid(inputs, input_gradients(teacher, inputs, top), input_gradients(student, inputs, top),
                         mode=mode)
