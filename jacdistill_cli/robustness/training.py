"""Objectives that train a robust network (a teacher), called as engine.objective.cross_entropy_objective is:

    objective(model, None, inputs, labels, gradient_scale=1.0, epoch=None) -> (logits [b, classes], {term: value, "total"})

    adversarial  hard = CE(f(x'), y), x' the PGD example of x: maximises CE within the eps-ball from a
                 random start (attacks.random_start, as evaluation's PGD; Madry et al. 2018); logits are
                 those of x'
    trades       hard = CE(f(x), y), robust = KL(softmax f(x) || softmax f(x')), total = hard + beta * robust,
                 x' maximising the KL from x + 0.001 N(0, 1) (Zhang et al. 2019); logits are those of x

The inner maximisation runs on pixels (the dataset's normalisation inside, see pixels.py) with the network
in eval mode, float32 and its Jacobian gate closed (BatchNorm's running statistics are neither used from the
attack's batches nor updated by them); the outer pass runs in the mode the trainer set. Random starts are
drawn from the objective's own generator (on the CPU), seeded by `seed`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacdistill_cli.robustness.attacks import ascend, random_start
from jacdistill_cli.robustness.pixels import PixelModel, Pixels, attacked
from jacdistill_cli.robustness.settings import TeacherTraining


class AdversarialObjective:
    """`teacher.training=adversarial|trades` as an objective (see the module's docstring)."""

    def __init__(self, training: TeacherTraining, pixels: Pixels, seed: int = 0):
        if training.kind not in ("adversarial", "trades") or training.attack is None:
            raise ValueError(f"an adversarial objective needs teacher.training=adversarial or trades, "
                             f"not {training.kind}")
        self.training, self.attack, self.pixels = training, training.attack, pixels
        self.generator = torch.Generator().manual_seed(seed)

    def start(self, clean: Tensor) -> Tensor:
        """The inner maximisation's starting offset [b, ...]: evaluation's random start in the ball
        (attacks.random_start), drawn from the objective's generator."""
        attack = self.attack
        if self.training.kind == "trades":
            return 0.001 * torch.randn(clean.shape, generator=self.generator).to(clean.device)
        if not attack.random_start:
            return torch.zeros_like(clean)

        def draw(kind: str, shape: tuple[int, ...], purpose: str) -> Tensor:   # one draw a batch: no purpose
            make = torch.randn if kind == "normal" else torch.rand
            return make((len(clean), *shape), generator=self.generator)

        return random_start(clean, attack.norm, attack.eps, draw, "start")

    def examples(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
        """The adversarial inputs [b, *input] (normalised, as the split's) of a normalised batch."""
        clean = self.pixels.to_pixels(inputs.detach().float())
        target = PixelModel(model, self.pixels)
        with attacked(model):
            if self.training.kind == "adversarial":
                loss: Callable[[Tensor], Tensor] = lambda point: F.cross_entropy(  # noqa: E731
                    target(point), labels, reduction="none")
            else:
                with torch.no_grad():
                    reference = F.log_softmax(target(clean), dim=1)
                loss = lambda point: F.kl_div(F.log_softmax(target(point), dim=1), reference,  # noqa: E731
                                              reduction="none", log_target=True).sum(1)
            adversarial = ascend(loss, clean, self.start(clean), self.attack, self.pixels)
        return self.pixels.to_inputs(adversarial).to(inputs.dtype)

    def __call__(self, model: nn.Module, teacher: None, inputs: Tensor, labels: Tensor,
                 gradient_scale: float = 1.0, epoch: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        # (called as the trainer calls any objective; `epoch` is accepted and unused)
        adversarial = self.examples(model, inputs, labels)
        if self.training.kind == "adversarial":
            logits = model(adversarial)
            hard = F.cross_entropy(logits, labels)
            return logits, {"hard": hard, "total": hard}
        # two passes, as TRADES' code takes them (BatchNorm normalises each batch with its own statistics)
        clean_logits, adversarial_logits = model(inputs), model(adversarial)
        hard = F.cross_entropy(clean_logits, labels)
        robust = F.kl_div(F.log_softmax(adversarial_logits, dim=1), F.log_softmax(clean_logits, dim=1),
                          reduction="batchmean", log_target=True)
        return clean_logits, {"hard": hard, "robust": robust, "total": hard + self.training.beta * robust}


def teacher_objective(training: TeacherTraining, pixels: Pixels, seed: int = 0) -> Callable:
    """The objective a teacher trained by the runner is trained with: engine.objective.cross_entropy_objective
    for standard training, else an AdversarialObjective."""
    if training.kind == "standard":
        from jacdistill_cli.engine.objective import cross_entropy_objective

        return cross_entropy_objective
    return AdversarialObjective(training, pixels, seed)

