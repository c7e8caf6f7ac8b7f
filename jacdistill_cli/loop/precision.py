"""Mixed precision: `trainer.precision=32|bf16|16`.

bf16 and 16 run the forward passes and the input-gradients under `torch.autocast`; the Jacobian-ready
layers' autograd Functions follow autocast's dtypes (engine/layers.py). 16 adds a GradScaler and
PyTorch's recipe for gradient penalties: the input-gradients are taken of the scaled logits and
unscaled (methods.Passes.scale), the term is built inside autocast, and the scaled total is
backpropagated; a step whose gradients overflow is skipped and the scale lowered.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


@dataclass
class Precision:
    name: str           # 32 | bf16 | 16
    device_type: str    # cpu | cuda

    def autocast(self):
        if self.name == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.name])

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "16")
