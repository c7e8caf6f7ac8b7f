"""Validation of composed configs: every bad value stops the run before any work, in one line.

Hydra composes the config and checks the group options; the checks here cover the values.
Each raises `UsageError("KEY=VALUE is not allowed: WHAT IS")`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.errors import UsageError, setting_error

DEVICES = ("auto", "cpu", "cuda")
BATCHNORM_MODES = ("batch", "running", "coupled")


def value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def real(cfg: DictConfig, key: str, low: float | None = None, high: float | None = None,
         low_open: bool = False, allowed: str = "") -> float:
    """A finite number within [low, high] (or (low, high] with low_open)."""
    raw = value(cfg, key)
    try:
        if isinstance(raw, bool):
            raise TypeError
        number = float(raw)
    except (TypeError, ValueError):
        raise setting_error(key, raw, allowed or "it must be a number") from None
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and number > high
    if not math.isfinite(number) or too_low or too_high:
        raise setting_error(key, raw, allowed)
    return number


def integer(cfg: DictConfig, key: str, low: int = 1, allowed: str = "") -> int:
    raw = value(cfg, key)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < low:
        raise setting_error(key, raw, allowed or f"it must be an integer >= {low}")
    return raw


def choice(cfg: DictConfig, key: str, options: Iterable[str]) -> str:
    raw = value(cfg, key)
    options = tuple(options)
    if raw not in options:
        raise setting_error(key, raw, f"it must be one of {', '.join(options)}")
    return raw


def flag(cfg: DictConfig, key: str) -> bool:
    raw = value(cfg, key)
    if not isinstance(raw, bool):
        raise setting_error(key, raw, "it must be true or false")
    return raw


def validate_trainer(cfg: DictConfig) -> None:
    integer(cfg, "seed", low=0, allowed="it must be an integer >= 0")
    integer(cfg, "trainer.epochs", low=1, allowed="it must be an integer >= 1")
    integer(cfg, "trainer.batch_size", low=1, allowed="it must be an integer >= 1")
    integer(cfg, "trainer.eval_batch_size", low=1, allowed="it must be an integer >= 1")
    integer(cfg, "trainer.eval_every", low=1, allowed="it must be an integer >= 1")
    integer(cfg, "trainer.num_workers", low=0, allowed="it must be an integer >= 0")
    if OmegaConf.select(cfg, "trainer.threads", default=None) is not None:
        integer(cfg, "trainer.threads", low=1, allowed="it must be null (torch's default) or an integer >= 1")
    from jacdistill_cli.run.runtime import check_device_name

    check_device_name(value(cfg, "trainer.device"), "trainer.device")  # auto, cpu, cuda or cuda:N


def existing_file(cfg: DictConfig, key: str) -> None:
    """An optional path setting: unset, or an existing file."""
    import os

    raw = value(cfg, key)
    if raw is not None and not os.path.isfile(os.path.expanduser(str(raw))):
        raise setting_error(key, str(raw), "no such file")


def validate_teacher_training(cfg: DictConfig) -> None:
    existing_file(cfg, "teacher.checkpoint")
    integer(cfg, "teacher.epochs", low=1, allowed="it must be an integer >= 1")
    integer(cfg, "teacher.batch_size", low=1, allowed="it must be an integer >= 1")
    real(cfg, "teacher.lr", low=0, low_open=True, allowed="it must be a number > 0")
    real(cfg, "teacher.weight_decay", low=0, allowed="it must be a number >= 0")


def validate_optim(cfg: DictConfig) -> None:
    real(cfg, "optim.lr", low=0, low_open=True, allowed="it must be a number > 0")
    real(cfg, "optim.weight_decay", low=0, allowed="it must be a number >= 0")
    choice(cfg, "optim.schedule", ("cosine", "constant"))
    if cfg.optim.name == "sgd":
        real(cfg, "optim.momentum", low=0, high=1, allowed="it must be a number in [0, 1]")


def validate_jacobian(cfg: DictConfig) -> None:
    from jacdistill_cli.engine.methods import METHODS

    name = choice(cfg, "jacobian.name", METHODS)
    if name == "none":
        return
    if name == "noise":
        real(cfg, "jacobian.sigma", low=0, low_open=True, allowed="it must be a number > 0")
        integer(cfg, "jacobian.samples", low=1, allowed="it must be an integer >= 1")
        return
    flag(cfg, "jacobian.normalize")
    flag(cfg, "jacobian.squared")
    choice(cfg, "jacobian.batchnorm", BATCHNORM_MODES)
    if name == "exact":
        from jacdistill_cli.engine.jacobian import EXACT_STRATEGIES

        choice(cfg, "jacobian.strategy", EXACT_STRATEGIES)
    if name == "projected":
        integer(cfg, "jacobian.num_projections", low=1, allowed="it must be an integer >= 1")
        choice(cfg, "jacobian.distribution", ("rademacher", "gaussian"))


def validate_objective(cfg: DictConfig) -> None:
    from jacdistill_cli.engine.objective import DISTILL_LOSSES

    real(cfg, "alpha", low=0, high=1, allowed="alpha must be a number in [0, 1]")
    real(cfg, "temperature", low=0, low_open=True, allowed="temperature must be a number > 0")
    real(cfg, "hard_weight", low=0, allowed="hard_weight must be a number >= 0")
    choice(cfg, "loss.name", DISTILL_LOSSES)
    validate_jacobian(cfg)
    from jacdistill_cli.engine.features import validate_features

    validate_features(cfg)  # the features group and jacobian.of


def validate_train(cfg: DictConfig) -> None:
    validate_trainer(cfg)
    validate_objective(cfg)
    validate_optim(cfg)
    validate_teacher_training(cfg)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)
