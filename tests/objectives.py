"""The objective of `jacdistill train`, built in tests from a loss name and a method's settings."""

from __future__ import annotations

import functools

import torch
from omegaconf import OmegaConf

from jacdistill_cli.config.registry import build, shipped_options
from jacdistill_cli.engine import losses
from jacdistill_cli.engine.objective import Objective, distillation_objective

LOSSES = {"kl": losses.kl, "mse": losses.mse, "ce": losses.ce, "none": losses.no_distillation}
COMMON = ("normalize", "squared", "batchnorm", "strategy", "of")
OWN = {"projected": ("num_projections", "distribution"), "noise": ("sigma", "samples", "antithetic", "form")}


def method(name: str, **settings):
    """The shipped method `name` with the given settings (keys other methods take are left out)."""
    keys = OWN.get(name, ()) + (COMMON if name not in ("noise", "none") else ())
    node = {"_target_": shipped_options("jacobian")[name], "name": name,
            **{k: v for k, v in settings.items() if k in keys}}
    return build("jacobian", OmegaConf.create(node))


def objective(loss: str, temperature: float, alpha: float, hard_weight: float, settings,
              generator: torch.Generator | None = None) -> Objective:
    """As training builds it: `settings` is a method's node (keys of other methods are ignored)."""
    plain = OmegaConf.to_container(settings) if OmegaConf.is_config(settings) else dict(settings)
    chosen = method(plain.pop("name"), **plain)
    return distillation_objective(functools.partial(LOSSES[loss], temperature=temperature), alpha, hard_weight,
                                  chosen, generator=generator)
