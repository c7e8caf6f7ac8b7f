"""The edge between the config and the engine: composed configs are checked and turned into typed
settings before any work; every bad value stops the run in one line.

Hydra composes the config and checks the group options; each group's node builds its object through
config/registry.py (the entry checks its own keys); the checks here cover the top-level values.
Each raises `UsageError("KEY=VALUE is not allowed: WHAT IS")`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config import checks
from jacdistill_cli.config.checks import SettingError
from jacdistill_cli.errors import UsageError, setting_error

DEVICES = ("auto", "cpu", "cuda")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
PRECISIONS = ("32", "bf16", "16")   # trainer.precision; run/precision.py runs them
SCHEDULES = ("cosine", "constant", "multistep")
# The feature Jacobian is one input-gradient per sample and pair: the analogue of top1 (jacobian.of=features).
FEATURE_JACOBIAN_METHODS = ("top1",)


def value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def _checked(check: Callable, cfg: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return check(key, value(cfg, key), *args, **kwargs)
    except SettingError as err:
        raise setting_error(err.key, err.value, err.allowed) from None


def real(cfg: DictConfig, key: str, low: float | None = None, high: float | None = None,
         low_open: bool = False, allowed: str = "") -> float:
    """A finite number within [low, high] (or (low, high] with low_open)."""
    return _checked(checks.number, cfg, key, low, high, low_open, allowed)


def integer(cfg: DictConfig, key: str, low: int = 1, allowed: str = "") -> int:
    return _checked(checks.whole, cfg, key, low, allowed)


def choice(cfg: DictConfig, key: str, options: Iterable[str]) -> str:
    return _checked(checks.one_of, cfg, key, options)


def flag(cfg: DictConfig, key: str) -> bool:
    return _checked(checks.boolean, cfg, key)


def validate_trainer(cfg: DictConfig) -> None:
    integer(cfg, "seed", low=0, allowed="it must be an integer >= 0")
    integer(cfg, "trainer.epochs", low=1, allowed="it must be an integer >= 1")
    integer(cfg, "trainer.batch_size", low=1, allowed="it must be an integer >= 1")
    integer(cfg, "trainer.eval_batch_size", low=1, allowed="it must be an integer >= 1")
    integer(cfg, "trainer.eval_every", low=1, allowed="it must be an integer >= 1")
    integer(cfg, "trainer.num_workers", low=0, allowed="it must be an integer >= 0")
    if OmegaConf.select(cfg, "trainer.threads", default=None) is not None:
        integer(cfg, "trainer.threads", low=1, allowed="it must be null (torch's default) or an integer >= 1")
    check_device_name(value(cfg, "trainer.device"), "trainer.device")  # auto, cpu, cuda or cuda:N
    integer(cfg, "trainer.devices", low=1, allowed="it must be an integer >= 1 (processes of data-parallel training)")
    precision(cfg)
    if flag(cfg, "trainer.sync_batchnorm") and OmegaConf.select(cfg, "jacobian.batchnorm") == "batch":
        raise setting_error("trainer.sync_batchnorm", True, "with jacobian.batchnorm=batch the per-sample Jacobians "
                            "hold each rank's own BatchNorm statistics; use jacobian.batchnorm=running or coupled "
                            "with synchronised BatchNorm, or trainer.sync_batchnorm=false")
    if value(cfg, "trainer.devices") > 1 and OmegaConf.select(cfg, "jacobian.strategy") == "func":
        raise setting_error("jacobian.strategy", "func", "with trainer.devices > 1 the student runs inside "
                            "DistributedDataParallel, which torch.func cannot trace; use loop, batched or auto")


def check_device_name(name: Any, key: str = "trainer.device") -> str:
    """A device setting's form, before any work: auto, cpu, cuda or cuda:N (whether the GPU exists is
    run/runtime.select_device's question, asked when torch is imported)."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise UsageError(f"{key}={name!r} is not allowed: it must be one of auto, cpu, cuda, cuda:N "
                         "(N: the index of a GPU torch sees)")
    return name


def precision(cfg: DictConfig) -> str:
    """`trainer.precision` (train, check and bench): 32, bf16 or 16 (Hydra reads 16 and 32 as integers)."""
    raw = value(cfg, "trainer.precision")
    if str(raw) not in PRECISIONS:
        raise setting_error("trainer.precision", raw, f"it must be one of {', '.join(PRECISIONS)}")
    return str(raw)


def existing_file(cfg: DictConfig, key: str) -> None:
    """An optional path setting: unset, or an existing file."""
    import os

    raw = value(cfg, key)
    if raw is not None and not os.path.isfile(os.path.expanduser(str(raw))):
        raise setting_error(key, str(raw), "no such file")


def validate_reuse(cfg: DictConfig) -> None:
    raw = OmegaConf.select(cfg, "teacher.reuse_outputs", default="auto")
    if raw not in ("auto", True, False):
        raise setting_error("teacher.reuse_outputs", raw, "it must be auto, true or false")


def validate_teacher_training(cfg: DictConfig) -> None:
    existing_file(cfg, "teacher.checkpoint")
    integer(cfg, "teacher.epochs", low=1, allowed="it must be an integer >= 1")
    integer(cfg, "teacher.batch_size", low=1, allowed="it must be an integer >= 1")
    real(cfg, "teacher.lr", low=0, low_open=True, allowed="it must be a number > 0")
    real(cfg, "teacher.weight_decay", low=0, allowed="it must be a number >= 0")


def validate_optim(cfg: DictConfig) -> "OptimSettings":
    """The optimiser (its `_target_`, e.g. torch.optim.AdamW, called with the parameters and the node's
    settings) and the schedule."""
    from jacdistill_cli.config import registry

    real(cfg, "optim.lr", low=0, low_open=True, allowed="it must be a number > 0")
    real(cfg, "optim.weight_decay", low=0, allowed="it must be a number >= 0")
    schedule = choice(cfg, "optim.schedule", SCHEDULES)
    if schedule == "multistep":
        milestones = OmegaConf.select(cfg, "optim.milestones", default=None)
        listed = OmegaConf.to_container(milestones) if OmegaConf.is_list(milestones) else milestones
        if not (isinstance(listed, list) and listed and all(isinstance(m, int) and not isinstance(m, bool)
                                                            and m >= 1 for m in listed)
                and listed == sorted(set(listed))):
            raise setting_error("optim.milestones", listed, "with optim.schedule=multistep it must be a list of "
                                "increasing epochs >= 1, e.g. [150,180,210]")
        real(cfg, "optim.gamma", low=0, high=1, low_open=True, allowed="it must be a number in (0, 1]")
    if OmegaConf.select(cfg, "optim.momentum") is not None:
        real(cfg, "optim.momentum", low=0, high=1, allowed="it must be a number in [0, 1]")
    exclude = ("schedule", "milestones", "gamma")
    build = registry.bind("optim", cfg.optim, exclude=exclude, positional=1)
    return OptimSettings(registry.label("optim", cfg.optim), build, schedule,
                         list(OmegaConf.select(cfg, "optim.milestones", default=None) or []),
                         float(OmegaConf.select(cfg, "optim.gamma", default=0.1)))


@dataclass
class OptimSettings:
    name: str
    build: Callable[[Any], Any]   # parameters -> torch.optim.Optimizer
    schedule: str                 # cosine | constant | multistep (per epoch)
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class ObjectiveSettings:
    """The objective's settings, checked and typed: what engine.objective.distillation_objective takes."""

    alpha: float
    temperature: float
    hard_weight: float
    loss_name: str
    loss: Callable[[Any, Any], Any]   # (student logits, teacher logits) -> scalar
    method: Any                       # an engine.methods.JacobianMethod
    features: Any                     # an engine.features.FeatureMethod, or NoFeatures
    terms: list[Any] = field(default_factory=list)   # a user's own engine.terms.Term objects

    @property
    def nothing_to_train(self) -> bool:
        """No term of the loss has a weight: a student with no gradient cannot be trained."""
        distill = self.loss_name != "none" and self.alpha < 1
        jacobian = self.alpha > 0 and (self.method.uses_gradients or self.method.perturbs_inputs)
        features = getattr(self.features, "weight", 0) > 0
        return not (distill or jacobian or features or self.hard_weight > 0 or self.terms)


def validate_methods(cfg: DictConfig) -> tuple[Any, Any]:
    """(the Jacobian method, the feature method) of the `jacobian` and `features` nodes."""
    from jacdistill_cli.config import registry

    method = registry.build("jacobian", cfg.jacobian)
    node = OmegaConf.select(cfg, "features")   # a config of one's own without features: the shipped none
    features = registry.build("features", node if node is not None else registry.shipped_node("features", "none"))
    if getattr(method, "of", "logits") == "features":
        if features.name == "none":
            raise setting_error("jacobian.of", "features", "it takes the Jacobian of the matched features: choose "
                                "features=attention or features=hint (features.weight=0 to match their Jacobians "
                                "only)")
        if method.name not in FEATURE_JACOBIAN_METHODS:
            raise setting_error("jacobian.of", "features", f"with jacobian={method.name}: the feature Jacobian is one "
                                "input-gradient per sample and pair, as jacobian=top1 is for the logits; use "
                                "jacobian=top1")
    return method, features


def validate_objective(cfg: DictConfig) -> ObjectiveSettings:
    from jacdistill_cli.config import registry

    alpha = real(cfg, "alpha", low=0, high=1, allowed="alpha must be a number in [0, 1]")
    temperature = real(cfg, "temperature", low=0, low_open=True, allowed="temperature must be a number > 0")
    hard_weight = real(cfg, "hard_weight", low=0, allowed="hard_weight must be a number >= 0")
    loss = registry.bind("loss", cfg.loss, positional=2)
    method, features = validate_methods(cfg)
    terms = []
    for name, term_node in (OmegaConf.select(cfg, "terms", default=None) or {}).items():
        if name in ("distill", "jacobian", "hard", "features", "total"):
            raise setting_error(f"terms.{name}", "...", "the name is taken by a shipped term; choose another")
        weight = real(cfg, f"terms.{name}.weight", low=0, allowed="it must be a number >= 0")
        terms.append(registry.build(f"terms.{name}", term_node, exclude=("weight",), name=name, weight=weight))
    return ObjectiveSettings(alpha, temperature, hard_weight, registry.label("loss", cfg.loss), loss, method,
                             features, terms)


def validate_train(cfg: DictConfig) -> tuple[ObjectiveSettings, OptimSettings]:
    validate_trainer(cfg)
    objective = validate_objective(cfg)
    if objective.nothing_to_train:
        raise UsageError(f"loss={objective.loss_name} jacobian={objective.method.name} alpha={objective.alpha:g} "
                         f"hard_weight={objective.hard_weight:g} is not allowed: no term of the loss has a weight, so "
                         "there is nothing to train; give a loss, a jacobian method with alpha > 0, or hard_weight > 0")
    optim = validate_optim(cfg)
    validate_teacher_training(cfg)
    validate_reuse(cfg)
    return objective, optim


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)
