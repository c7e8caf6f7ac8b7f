"""A train run's hyperparameters, flat, for TensorBoard's HPARAMS tab (and the sweep's experiment)."""

from __future__ import annotations

from typing import Any, Mapping

from omegaconf import OmegaConf

from jacdistill_cli.config.registry import label
from jacdistill_cli.engine.pairs import parse_pairs
from jacdistill_cli.spec.reader import Reader
from jacdistill_cli.zoo.models import architecture

NOT_HPARAMS = {"cache_dir"}
SCALARS = (int, float, str, bool)


def describe(spec: Mapping[str, Any]) -> str:
    """A model node's architecture on one line: `mlp(hidden=[64], batchnorm=False)`."""
    settings = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("name", "_target_"))
    return f"{label('model', spec)}({settings})"


def hparams(read: Reader, choices: Mapping[str, Any]) -> dict[str, Any]:
    """Every top-level setting (alpha, temperature, hard_weight, seed, ...), the recipe and experiment preset,
    the distillation loss, the Jacobian method and each of its settings, teacher, student, dataset,
    samples_per_class (None: the whole training split), features, optimiser. Read as recorded (the keys are
    read where the spec takes them)."""
    cfg = read.cfg
    found: dict[str, Any] = {key: value for key, value in cfg.items()
                             if key not in NOT_HPARAMS and isinstance(value, SCALARS)}
    found["recipe"] = choices.get("recipe")
    found["experiment"] = choices.get("experiment")
    found["loss"] = label("loss", cfg.loss)
    found["jacobian"] = label("jacobian", cfg.jacobian)
    found.update({f"jacobian.{key}": value for key, value in cfg.jacobian.items()
                  if key not in ("name", "_target_") and isinstance(value, SCALARS)})
    checkpoint = cfg.teacher.get("checkpoint")
    found["teacher"] = str(checkpoint) if checkpoint else describe(architecture(cfg.teacher, choices.get("teacher")))
    found["student"] = describe(architecture(cfg.student, choices.get("student")))
    found["dataset"] = label("dataset", cfg.dataset)
    found["samples_per_class"] = OmegaConf.select(cfg, "dataset.samples_per_class", default=None)
    features = OmegaConf.select(cfg, "features")
    found["features"] = label("features", features) if features else "none"
    if found["features"] != "none":
        for key, value in features.items():
            if key not in ("name", "_target_"):
                found[f"features.{key}"] = value if isinstance(value, SCALARS) else (
                    "architecture defaults" if value is None else str([list(p) for p in parse_pairs(value)]))
    explain = OmegaConf.select(cfg, "explain")
    found["explain"] = label("explain", explain) if explain else "none"
    found["optim"] = label("optim", cfg.optim)
    found["optim.lr"] = cfg.optim.lr
    found["trainer.epochs"] = cfg.trainer.epochs
    found["trainer.batch_size"] = cfg.trainer.batch_size
    return found
