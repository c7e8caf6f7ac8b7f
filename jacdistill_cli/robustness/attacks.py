"""The attacks, on pixels in [0, 1] (see pixels.py), one batch at a time.

    fgsm          one step of size eps along sign(g) (linf) or g / ||g||_2 (l2), g = d CE / d pixels
    pgd           `steps` projected steps of `step_size` (default 2.5 eps / steps), from a random point
                  of the ball (`random_start`), `restarts` times; a sample falls if any restart's end
                  point is misclassified
    transfer_pgd  pgd made on another network (the teacher), applied to the attacked one: an attack that
                  needs no gradient of the attacked network, so gradient masking shows
    apgd_ce, apgd_t, square, autoattack
                  torchattacks' APGD (cross-entropy), APGD-T (targeted DLR), Square (gradient-free,
                  `queries` per restart) and AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square)
    noise         pixels + sigma * N(0, 1), clipped

Every attack returns adversarial pixels inside the eps-ball around the clean pixels and inside the pixel
range (clipping moves each coordinate towards the clean one, so it never leaves the ball). Random draws
of fgsm/pgd/noise are made per sample, from a generator seeded by (seed, attack, restart, the sample's
index in the split): a sample's result does not depend on the batch it is in, nor on the rank that attacks
it. torchattacks draws from torch's global generator; those attacks run under a forked generator seeded
per block of samples (see evaluate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacdistill_cli.robustness.pixels import Pixels
from jacdistill_cli.zoo.data import derived_seed

OWN = ("fgsm", "pgd", "transfer_pgd", "noise")
LIBRARY = ("apgd_ce", "apgd_t", "square", "autoattack")
ATTACKS = OWN + LIBRARY
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class Attack:
    """One attack of `robustness.attacks`, checked (settings.py). `eps` is the noise's sigma for `noise`."""

    name: str
    eps: float
    norm: str = "linf"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    queries: int = 1000

    @property
    def key(self) -> str:
        """The metric's name: pgd_linf_0.1, fgsm_l2_0.5, noise_0.1."""
        return f"noise_{self.eps:g}" if self.name == "noise" else f"{self.name}_{self.norm}_{self.eps:g}"

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


# --------------------------------------------------------------------------------------------- pieces

def per_sample_draws(shape: tuple[int, ...], seed: int, purpose: str, indices: Tensor, kind: str,
                     device: torch.device) -> Tensor:
    """[b, *shape] draws (`normal` or `uniform` in [0, 1)), sample i's from a generator seeded by
    (seed, purpose, indices[i]); drawn on the CPU so that they do not depend on the device."""
    rows = []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed(derived_seed(seed, f"{purpose}:{index}"))
        rows.append(torch.randn(shape, generator=generator) if kind == "normal"
                    else torch.rand(shape, generator=generator))
    return torch.stack(rows).to(device)


def l2_norms(values: Tensor) -> Tensor:
    """[b, ...] -> [b, 1, ..., 1]: each sample's l2 norm, shaped to broadcast."""
    return values.flatten(1).norm(dim=1).view(-1, *([1] * (values.dim() - 1)))


def project(delta: Tensor, eps: float, norm: str) -> Tensor:
    """The nearest point of the eps-ball (linf or l2) to each sample's delta."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / l2_norms(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor


def ascent(gradient: Tensor, norm: str) -> Tensor:
    """The steepest-ascent direction of unit norm: sign(g) for linf, g / ||g||_2 for l2 (0 where g = 0)."""
    if norm == "linf":
        return gradient.sign()
    return gradient / l2_norms(gradient).clamp_min(1e-12)


def loss_gradient(model: nn.Module, pixels: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(d CE / d pixels [b, ...], per-sample CE [b], logits [b, classes]); summed over the batch so that
    each sample's gradient is its own, whatever the batch size."""
    pixels = pixels.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(pixels)
        losses = F.cross_entropy(logits, labels, reduction="none")
        (gradient,) = torch.autograd.grad(losses.sum(), pixels)
    return gradient, losses.detach(), logits.detach()


def random_start(clean: Tensor, attack: Attack, seed: int, purpose: str, indices: Tensor) -> Tensor:
    """A point drawn uniformly from each sample's eps-ball (linf: a cube; l2: direction and radius)."""
    shape = tuple(clean.shape[1:])
    if attack.norm == "linf":
        uniform = per_sample_draws(shape, seed, purpose, indices, "uniform", clean.device)
        return (2 * uniform - 1) * attack.eps
    direction = per_sample_draws(shape, seed, purpose, indices, "normal", clean.device)
    radius = per_sample_draws((1,), seed, purpose + ":radius", indices, "uniform", clean.device)
    radius = radius.pow(1.0 / clean[0].numel()).view(-1, *([1] * len(shape)))
    return direction / l2_norms(direction).clamp_min(1e-12) * radius * attack.eps


# --------------------------------------------------------------------------------------------- attacks

def fgsm(model: nn.Module, clean: Tensor, labels: Tensor, attack: Attack, pixels: Pixels) -> Tensor:
    """clean pixels [b, ...] -> adversarial pixels [b, ...]: one step of size eps."""
    gradient, _, _ = loss_gradient(model, clean, labels)
    return pixels.clip(clean + attack.eps * ascent(gradient, attack.norm)).detach()


def ascend(loss: Callable[[Tensor], Tensor], clean: Tensor, delta: Tensor, attack: Attack,
           pixels: Pixels) -> Tensor:
    """Projected steepest ascent of `loss` (pixels [b, ...] -> per-sample losses [b]) from clean + delta:
    `attack.steps` steps of `attack.step` along the norm's ascent direction, each projected onto the
    eps-ball and clipped to the pixel range. Returns the end point [b, ...], detached."""
    adversarial = pixels.clip(clean + delta).detach()
    for _ in range(attack.steps):
        point = adversarial.requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(loss(point).sum(), point)
        moved = adversarial.detach() + attack.step * ascent(gradient, attack.norm)
        adversarial = pixels.clip(clean + project(moved - clean, attack.eps, attack.norm)).detach()
    return adversarial


def pgd(model: nn.Module, clean: Tensor, labels: Tensor, attack: Attack, pixels: Pixels, seed: int,
        indices: Tensor) -> Tensor:
    """clean pixels [b, ...] -> adversarial pixels [b, ...] (Madry et al. 2018): per sample, a
    misclassified end point of a restart if there is one, else the end point of highest loss."""
    best, best_wrong, best_loss = clean.clone(), None, None
    cross_entropy = lambda point: F.cross_entropy(model(point), labels, reduction="none")  # noqa: E731
    for restart in range(attack.restarts):
        delta = (random_start(clean, attack, seed, f"{attack.key}:{restart}", indices) if attack.random_start
                 else torch.zeros_like(clean))
        adversarial = ascend(cross_entropy, clean, delta, attack, pixels)
        with torch.no_grad():
            logits = model(adversarial)
        loss = F.cross_entropy(logits, labels, reduction="none")
        wrong = logits.argmax(1) != labels
        if best_wrong is None:
            better = torch.ones_like(wrong)
        else:
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        best = torch.where(better.view(-1, *([1] * (clean.dim() - 1))), adversarial, best)
        best_wrong = wrong if best_wrong is None else torch.where(better, wrong, best_wrong)
        best_loss = loss if best_loss is None else torch.where(better, loss, best_loss)
    return best


def noise(clean: Tensor, attack: Attack, pixels: Pixels, seed: int, indices: Tensor) -> Tensor:
    """clean pixels + sigma * N(0, 1), per sample seeded, clipped to the pixel range."""
    draws = per_sample_draws(tuple(clean.shape[1:]), seed, attack.key, indices, "normal", clean.device)
    return pixels.clip(clean + attack.eps * draws)


def library_attack(model: nn.Module, attack: Attack, classes: int, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
    """torchattacks' attack on the pixel model (it checks that pixels lie in [0, 1])."""
    import torchattacks

    norm = {"linf": "Linf", "l2": "L2"}[attack.norm]
    if attack.name == "apgd_ce":
        return torchattacks.APGD(model, norm=norm, eps=attack.eps, steps=attack.steps, n_restarts=attack.restarts,
                                 seed=seed, loss="ce")
    if attack.name == "apgd_t":
        return torchattacks.APGDT(model, norm=norm, eps=attack.eps, steps=attack.steps,
                                  n_restarts=attack.restarts, seed=seed, n_classes=classes)
    if attack.name == "square":
        return torchattacks.Square(model, norm=norm, eps=attack.eps, n_queries=attack.queries,
                                   n_restarts=attack.restarts, seed=seed)
    return torchattacks.AutoAttack(model, norm=norm, eps=attack.eps, version="standard", n_classes=classes,
                                   seed=seed)


def run_attack(attack: Attack, model: nn.Module, clean: Tensor, labels: Tensor, pixels: Pixels, seed: int,
               indices: Tensor, source: nn.Module | None = None, block: int = 0) -> Tensor:
    """Adversarial pixels [b, ...] of one attack on the pixel model `model` (`source`: the pixel model a
    transfer attack is made on); `block` seeds the library attacks (see the module's docstring)."""
    if attack.name == "fgsm":
        return fgsm(model, clean, labels, attack, pixels)
    if attack.name == "pgd":
        return pgd(model, clean, labels, attack, pixels, seed, indices)
    if attack.name == "transfer_pgd":
        return pgd(source, clean, labels, attack, pixels, seed, indices)
    if attack.name == "noise":
        return noise(clean, attack, pixels, seed, indices)
    with torch.no_grad():
        classes = model(clean[:1]).shape[1]
    devices = [clean.device] if clean.device.type == "cuda" else []
    block_seed = derived_seed(seed, f"{attack.key}:block{block}") % (2 ** 31)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(block_seed)
        adversarial = library_attack(model, attack, classes, block_seed)(clean, labels)
    # torchattacks returns its images after float arithmetic of its own: hold them to the ball exactly.
    return pixels.clip(clean + project(adversarial.detach() - clean, attack.eps, attack.norm))
