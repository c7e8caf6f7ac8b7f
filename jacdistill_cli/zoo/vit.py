"""A small vision transformer built from torch's own nn.TransformerEncoder: a standard transformer
(nn.MultiheadAttention called with need_weights=False, on the fused attention kernels), sized for
8x8 and 32x32 inputs.

    inputs [batch, C, H, W] -> patches (a Conv2d of kernel and stride `patch_size`) [batch, N, dim]
    -> class token + learned position embeddings -> `depth` pre-norm encoder layers (GELU MLPs)
    -> LayerNorm of the class token -> Linear -> logits [batch, num_classes]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from jacdistill_cli.config.checks import SettingError, whole


class VisionTransformer(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, patch_size: int, dim: int, depth: int,
                 heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        channels, height, width = input_shape
        self.patches = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        tokens = (height // patch_size) * (width // patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)          # [batch, N, dim]
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.position
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


def vit(input_shape: tuple[int, ...], num_classes: int, patch_size: int = 2, dim: int = 32, depth: int = 2,
        heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.0) -> nn.Module:
    """A ViT of `depth` pre-norm nn.TransformerEncoderLayer blocks of width `dim` and `heads` heads on
    `patch_size` x `patch_size` patches (which must tile the input: 2 on 8x8 gives 16 tokens)."""
    from jacdistill_cli.zoo.models import probability

    if len(input_shape) != 3:
        raise SettingError("patch_size", patch_size, f"a ViT takes images [C, H, W], the inputs are {list(input_shape)}")
    patch_size = whole("patch_size", patch_size)
    if input_shape[1] % patch_size or input_shape[2] % patch_size:
        raise SettingError("patch_size", patch_size, f"it must divide the input's height and width "
                           f"{input_shape[1]}x{input_shape[2]}")
    dim, depth, heads = whole("dim", dim), whole("depth", depth), whole("heads", heads)
    if dim % heads:
        raise SettingError("heads", heads, f"it must divide dim={dim}")
    settings: dict[str, Any] = {"mlp_ratio": whole("mlp_ratio", mlp_ratio), "dropout": probability("dropout", dropout)}
    return VisionTransformer(tuple(input_shape), num_classes, patch_size, dim, depth, heads, **settings)
