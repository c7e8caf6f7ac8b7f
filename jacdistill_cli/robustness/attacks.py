"""The attacks, on pixels in [0, 1] (see pixels.py), one batch at a time; `ATTACKS` is their one table.

    fgsm          one step of size eps along sign(g) (linf) or g / ||g||_2 (l2), g = d CE / d pixels
    pgd           `steps` projected steps of `step_size` (default 2.5 eps / steps), from a random point
                  of the ball (`random_start`), `restarts` times; a sample falls if any point a restart
                  reaches (its start, a step) is misclassified
    transfer_pgd  pgd made on another network (the teacher), applied to the attacked one: an attack that
                  needs no gradient of the attacked network, so gradient masking shows (its end points,
                  which transfer better than the first points past the source's boundary)
    apgd_ce, apgd_t, square, autoattack
                  torchattacks' APGD (cross-entropy), APGD-T (targeted DLR), Square (gradient-free,
                  `queries` per restart) and AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square)
    noise         pixels + sigma * N(0, 1), clipped

An entry of `robustness.attacks` names one of them ({name: pgd, norm: linf, eps: 0.1, steps: 20}): its other
keys are the keyword settings of the class `ATTACKS[name]`, which checks them (a `config.checks.SettingError`
becomes one line naming `robustness.attacks[i].key`; robustness/settings.py builds them through
config/registry.py). The random start of pgd is uniform in the cube (linf) and at a radius uniform in
[0, eps] (l2), as torchattacks' PGD and PGDL2 draw it: uniform in the l2 ball's volume (radius eps u^(1/d))
puts nearly every start on the sphere (half beyond 0.989 eps for 64 pixels), from where the steps are
spent turning away from a random direction (PGD-20 at L2 1.0 read 0.28 on the robust_transfer preset's
teacher, where PGDL2 reads 0.25). The start (`random_start`) is shared with adversarial training
(robustness/training.py).

A user's attack is an entry with its own `_target_` ({_target_: mypackage.Blur, norm: l2, eps: 0.5}): the
target (a class, or a function returning an instance) takes the entry's other keys as keyword settings,
raises `SettingError` for a bad value, and returns an `Attack` (subclass it, or `BallAttack`, a frozen
dataclass with `norm` and `eps` checked, and the defaults below come with it):

    name               a class attribute: the metric's key is `<name>_<norm>_<eps>` (or override `key`); it
                       may not be a name of `ATTACKS` (an entry's `name`, if given, must be the attack's own)
    __call__(model, clean, labels, context) -> adversarial pixels [b, ...]
                       model: the network as a function of pixels [b, ...] -> logits [b, classes] (eval
                       mode, float32); clean [b, ...] pixels; labels [b]; context: a `Context`
    norm, eps          the ball ('linf' | 'l2'; norm None: no ball, as noise) the points are held to, with
                       the pixel range, after the call
    plain_accuracy     False: a sample counts when it and its adversarial point are both classified right;
                       True: the metric is the plain accuracy on the perturbed samples (noise)
    unavailable(pixels, source) -> why it cannot run here (a str), or None
    identity()         what a remembered robust accuracy is keyed by (default: its target and settings)

Every attack returns adversarial pixels inside the eps-ball around the clean pixels and inside the pixel
range (clipping moves each coordinate towards the clean one, so it never leaves the ball). Random draws
of fgsm/pgd/noise are made per sample, from a generator seeded by (seed, attack, restart, the sample's
index in the split): a sample's result does not depend on the batch it is in, nor on the rank that attacks
it. torchattacks draws from torch's global generator; those attacks run under a forked generator seeded
per block of samples (see measure.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacdistill_cli.config.checks import SettingError, boolean, number, one_of, whole
from jacdistill_cli.robustness.pixels import Pixels
from jacdistill_cli.zoo.data import derived_seed

NORMS = ("linf", "l2")
# (kind "uniform" in [0, 1) or "normal", the shape of one sample's draw, purpose) -> draws [b, *shape]
Draw = Callable[[str, tuple[int, ...], str], Tensor]


@dataclass(frozen=True)
class Context:
    """What an attack is told about the batch it attacks besides the network, the pixels and the labels."""

    pixels: Pixels
    seed: int = 0
    indices: Tensor | None = None       # [b] the samples' indices in the split: the per-sample seeds
    source: nn.Module | None = None     # the pixel model a transfer attack is made on (the teacher)
    block: int = 0                      # the block's number: seeds torchattacks' attacks

    def draw(self, kind: str, shape: tuple[int, ...], purpose: str) -> Tensor:
        """[b, *shape] draws, sample i's from a generator seeded by (seed, purpose, indices[i])."""
        assert self.indices is not None, "per-sample draws need the samples' indices"
        return per_sample_draws(shape, self.seed, purpose, self.indices, kind, torch.device("cpu"))


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


def random_start(clean: Tensor, norm: str, eps: float, draw: Draw, purpose: str) -> Tensor:
    """A random offset [b, ...] in each sample's eps-ball: uniform in the cube (linf); a uniform direction
    at a radius uniform in [0, eps] (l2, as torchattacks' PGDL2 draws it). `draw` gives the random numbers
    (evaluation: per sample, `Context.draw`; adversarial training: the objective's generator)."""
    shape = tuple(clean.shape[1:])
    if norm == "linf":
        return ((2 * draw("uniform", shape, purpose) - 1) * eps).to(clean.device)
    direction = draw("normal", shape, purpose)
    radius = draw("uniform", (1,), purpose + ":radius").view(-1, *([1] * len(shape)))
    return (direction / l2_norms(direction).clamp_min(1e-12) * radius * eps).to(clean.device)


def ascend(loss: Callable[[Tensor], Tensor], clean: Tensor, delta: Tensor, attack: "PGD",
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


class FirstFall:
    """The first misclassified point of each sample among the points an ascent evaluates: a sample that an
    intermediate point fools has fallen, whatever the later steps do (the loss is not the 0-1 loss)."""

    def __init__(self, clean: Tensor, labels: Tensor):
        self.labels = labels
        self.fallen = torch.zeros_like(labels, dtype=torch.bool)
        self.points = clean.detach().clone()

    def see(self, point: Tensor, logits: Tensor) -> None:
        """point [b, ...] and its logits [b, classes]: keeps the points that misclassify first."""
        new = (logits.detach().argmax(1) != self.labels) & ~self.fallen
        self.points = torch.where(new.view(-1, *([1] * (point.dim() - 1))), point.detach(), self.points)
        self.fallen = self.fallen | new

    def or_else(self, end: Tensor) -> Tensor:
        """Each sample's first misclassified point, else its `end` point."""
        return torch.where(self.fallen.view(-1, *([1] * (end.dim() - 1))), self.points, end)


# --------------------------------------------------------------------------------------------- attacks

class Attack:
    """What every attack is (see the module's docstring for what a user's attack implements)."""

    name: ClassVar[str] = "attack"
    plain_accuracy: ClassVar[bool] = False
    norm: str | None = None
    eps: float = 0.0

    @property
    def key(self) -> str:
        """The metric's name: pgd_linf_0.1, fgsm_l2_0.5."""
        return f"{self.name}_{self.norm}_{self.eps:g}"

    def unavailable(self, pixels: Pixels, source: nn.Module | None) -> str | None:
        """Why the attack cannot run on this dataset (or without a source network), or None."""
        return None

    def __call__(self, model: nn.Module, clean: Tensor, labels: Tensor, context: Context) -> Tensor:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The keyword settings it was built with."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def identity(self) -> dict[str, Any]:
        """What the remembered robust accuracy of a teacher is keyed by (loop/robust.py)."""
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", "name": self.name,
                **self.settings()}

    def _set(self, **values: Any) -> None:
        for key, value in values.items():   # checked values of a frozen dataclass, in __post_init__
            object.__setattr__(self, key, value)


# The remembered robust accuracy of a teacher (loop/robust.py) was first keyed by one record holding every
# setting of every attack, a setting an attack lacks at these values: the shipped attacks keep that form, so
# that results remembered before are found again.
RECORD = {"norm": "linf", "steps": 10, "step_size": None, "random_start": True, "restarts": 1, "queries": 1000}


def shipped(attack: Attack) -> bool:
    """Whether the attack is one of `ATTACKS` (not a user's subclass of one)."""
    return ATTACKS.get(attack.name) is type(attack)


@dataclass(frozen=True)
class BallAttack(Attack):
    """An attack within the `norm` ball of radius `eps` (pixel scale) around each sample."""

    norm: str = "linf"
    eps: float | None = None   # required: None is refused

    def __post_init__(self) -> None:
        self._set(norm=one_of("norm", self.norm, NORMS),
                  eps=number("eps", self.eps, low=0, allowed="epsilon in pixel scale ([0, 1]) must be a number >= 0"))

    def identity(self) -> dict[str, Any]:
        return {**RECORD, **self.settings(), "name": self.name} if shipped(self) else super().identity()


@dataclass(frozen=True)
class FGSM(BallAttack):
    """One step of size eps along the norm's ascent direction of the cross-entropy (Goodfellow et al. 2015)."""

    name: ClassVar[str] = "fgsm"

    def __call__(self, model: nn.Module, clean: Tensor, labels: Tensor, context: Context) -> Tensor:
        gradient, _, _ = loss_gradient(model, clean, labels)
        return context.pixels.clip(clean + self.eps * ascent(gradient, self.norm)).detach()


@dataclass(frozen=True)
class PGD(BallAttack):
    """Projected gradient ascent on the cross-entropy (Madry et al. 2018): per sample, the first misclassified
    point of a restart if there is one, else the end point of highest loss."""

    name: ClassVar[str] = "pgd"
    # Keep the first point that misclassifies (False: the end points, for an attack made on another network,
    # where a point further past the source's boundary transfers better).
    first_fall: ClassVar[bool] = True
    steps: int = 10
    step_size: float | None = None    # None: 2.5 eps / steps
    random_start: bool = True
    restarts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(steps=whole("steps", self.steps, low=1, allowed="it must be an integer >= 1"),
                  restarts=whole("restarts", self.restarts, low=1, allowed="it must be an integer >= 1"))
        if self.step_size is not None:
            self._set(step_size=number("step_size", self.step_size, low=0, low_open=True,
                                       allowed="it must be null (2.5 eps / steps) or a number > 0"))
        self._set(random_start=boolean("random_start", self.random_start))

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def run(self, model: nn.Module, clean: Tensor, labels: Tensor, context: Context, restart: int) -> Tensor:
        """One restart's point [b, ...]: the first misclassified point it reaches (with `first_fall`; the
        logits of the points the ascent takes gradients at, no pass more), else its end point."""
        first = FirstFall(clean, labels)

        def cross_entropy(point: Tensor) -> Tensor:
            logits = model(point)
            if self.first_fall:
                first.see(point, logits)
            return F.cross_entropy(logits, labels, reduction="none")

        delta = (random_start(clean, self.norm, self.eps, context.draw, f"{self.key}:{restart}")
                 if self.random_start else torch.zeros_like(clean))
        return first.or_else(ascend(cross_entropy, clean, delta, self, context.pixels))

    def __call__(self, model: nn.Module, clean: Tensor, labels: Tensor, context: Context) -> Tensor:
        best, best_wrong, best_loss = clean.clone(), None, None
        for restart in range(self.restarts):
            adversarial = self.run(model, clean, labels, context, restart)
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


@dataclass(frozen=True)
class TransferPGD(PGD):
    """PGD made on the context's source network (the teacher), applied to the attacked one."""

    name: ClassVar[str] = "transfer_pgd"
    first_fall: ClassVar[bool] = False

    def unavailable(self, pixels: Pixels, source: nn.Module | None) -> str | None:
        return "no teacher to transfer the attack from" if source is None else None

    def __call__(self, model: nn.Module, clean: Tensor, labels: Tensor, context: Context) -> Tensor:
        return super().__call__(context.source, clean, labels, context)


@dataclass(frozen=True)
class Noise(Attack):
    """Gaussian noise of std `sigma` (pixel scale), per sample seeded, clipped to the pixel range: the
    accuracy under noise."""

    name: ClassVar[str] = "noise"
    plain_accuracy: ClassVar[bool] = True
    sigma: float | None = None   # required: None is refused

    def __post_init__(self) -> None:
        self._set(sigma=number("sigma", self.sigma, low=0, low_open=True,
                               allowed="the noise's std in pixel scale must be a number > 0"))

    @property
    def key(self) -> str:
        return f"noise_{self.sigma:g}"

    def identity(self) -> dict[str, Any]:
        return {**RECORD, "name": self.name, "eps": self.sigma} if shipped(self) else super().identity()

    def __call__(self, model: nn.Module, clean: Tensor, labels: Tensor, context: Context) -> Tensor:
        draws = context.draw("normal", tuple(clean.shape[1:]), self.key).to(clean.device)
        return context.pixels.clip(clean + self.sigma * draws)


@dataclass(frozen=True)
class LibraryAttack(BallAttack):
    """An attack of torchattacks, on the pixel model (it checks that pixels lie in [0, 1])."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if importlib.util.find_spec("torchattacks") is None:   # found, not imported (seconds)
            raise SettingError("name", self.name, "it needs torchattacks: pip install 'jacdistill[robust]'")

    def unavailable(self, pixels: Pixels, source: nn.Module | None) -> str | None:
        return None if pixels.clipped else "torchattacks needs pixels in [0, 1] and this dataset has no pixel range"

    def build(self, model: nn.Module, classes: int, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, clean: Tensor, labels: Tensor, context: Context) -> Tensor:
        with torch.no_grad():
            classes = model(clean[:1]).shape[1]
        devices = [clean.device] if clean.device.type == "cuda" else []
        block_seed = derived_seed(context.seed, f"{self.key}:block{context.block}") % (2 ** 31)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(block_seed)
            return self.build(model, classes, block_seed)(clean, labels).detach()

    @property
    def library_norm(self) -> str:
        return {"linf": "Linf", "l2": "L2"}[self.norm]


@dataclass(frozen=True)
class APGDCE(LibraryAttack):
    """torchattacks' APGD on the cross-entropy (Croce & Hein 2020)."""

    name: ClassVar[str] = "apgd_ce"
    steps: int = 10
    restarts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(steps=whole("steps", self.steps, low=1, allowed="it must be an integer >= 1"),
                  restarts=whole("restarts", self.restarts, low=1, allowed="it must be an integer >= 1"))

    def build(self, model: nn.Module, classes: int, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
        import torchattacks

        return torchattacks.APGD(model, norm=self.library_norm, eps=self.eps, steps=self.steps,
                                 n_restarts=self.restarts, seed=seed, loss="ce")


@dataclass(frozen=True)
class APGDT(APGDCE):
    """torchattacks' APGD-T on the targeted DLR loss (needs 4 classes or more)."""

    name: ClassVar[str] = "apgd_t"

    def build(self, model: nn.Module, classes: int, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
        import torchattacks

        return torchattacks.APGDT(model, norm=self.library_norm, eps=self.eps, steps=self.steps,
                                  n_restarts=self.restarts, seed=seed, n_classes=classes)


@dataclass(frozen=True)
class Square(LibraryAttack):
    """torchattacks' Square attack: gradient-free, `queries` per restart (Andriushchenko et al. 2020)."""

    name: ClassVar[str] = "square"
    queries: int = 1000
    restarts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(restarts=whole("restarts", self.restarts, low=1, allowed="it must be an integer >= 1"),
                  queries=whole("queries", self.queries, low=1, allowed="it must be an integer >= 1"))

    def build(self, model: nn.Module, classes: int, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
        import torchattacks

        return torchattacks.Square(model, norm=self.library_norm, eps=self.eps, n_queries=self.queries,
                                   n_restarts=self.restarts, seed=seed)


@dataclass(frozen=True)
class AutoAttack(LibraryAttack):
    """torchattacks' AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square)."""

    name: ClassVar[str] = "autoattack"

    def build(self, model: nn.Module, classes: int, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
        import torchattacks

        return torchattacks.AutoAttack(model, norm=self.library_norm, eps=self.eps, version="standard",
                                       n_classes=classes, seed=seed)


# The one table of shipped attacks: the `name` of an entry of robustness.attacks -> the class that builds it.
ATTACKS: dict[str, type[Attack]] = {attack.name: attack for attack in (
    FGSM, PGD, TransferPGD, Noise, APGDCE, APGDT, Square, AutoAttack)}


def held(attack: Attack, adversarial: Tensor, clean: Tensor, pixels: Pixels) -> Tensor:
    """The attack's points held to its ball and the pixel range (torchattacks returns its images after float
    arithmetic of its own; a user's attack is held to what its metric names)."""
    if attack.norm not in NORMS:
        return adversarial
    return pixels.clip(clean + project(adversarial.detach() - clean, float(attack.eps), attack.norm))


def run_attack(attack: Attack, model: nn.Module, clean: Tensor, labels: Tensor, context: Context) -> Tensor:
    """Adversarial pixels [b, ...] of one attack on the pixel model `model`, inside its ball and the pixel
    range."""
    return held(attack, attack(model, clean, labels, context), clean, context.pixels)
