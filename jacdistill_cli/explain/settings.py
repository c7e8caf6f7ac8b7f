"""The `explain` node (conf/explain/<name>.yaml), checked and typed through config/registry.py: its
`_target_` is `faithfulness_settings` (an option that measures) or `no_faithfulness` (`none`); a bad value
stops the command in one line naming `explain.<key>`.

    settings = explain_settings(cfg.get("explain"), seed=cfg.seed)     # ExplainSettings; .enabled
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from jacdistill_cli.config import registry
from jacdistill_cli.config.checks import SettingError, number, one_of, whole
from jacdistill_cli.errors import UsageError

SALIENCIES = ("gradient", "gradient_x_input", "smoothgrad")
REFERENCES = ("zero", "mean", "blur")
SMOOTHGRAD_KEYS = ("noise", "samples")


@dataclass(frozen=True)
class SmoothGrad:
    """SmoothGrad (Smilkov et al. 2017): the mean gradient over `samples` noisy copies of the image, the
    noise's std `noise` times the pixel range (high - low; a dataset without one: the image's own max - min)."""

    noise: float = 0.15
    samples: int = 20


@dataclass(frozen=True)
class ExplainSettings:
    """What the faithfulness measurement runs (see faithfulness.py): on the first `samples` samples of a
    split (None: all), `batch_size` samples at a time, each curve in `steps` steps, the pixels ordered by
    `saliency`; deleted pixels take the `baseline`, inserted ones go onto the `canvas` (zero: pixels 0;
    mean: the dataset's mean pixel, the normalised input 0; blur: the image under a Gaussian blur of std
    `blur_sigma` pixels); `random_orders` seeded random orders per sample give the reference areas."""

    enabled: bool = False
    samples: int | None = None
    batch_size: int = 32
    steps: int = 16
    saliency: str = "gradient"
    smoothgrad: SmoothGrad = SmoothGrad()
    baseline: str = "zero"
    canvas: str = "blur"
    blur_sigma: float = 1.0
    random_orders: int = 20
    seed: int = 0


def _smoothgrad(node: Any) -> SmoothGrad:
    if node is None:
        return SmoothGrad()
    if not isinstance(node, dict):
        raise SettingError("smoothgrad", node, "it must be a node {noise, samples}, e.g. {noise: 0.15, samples: 20}")
    unknown = sorted(set(node) - set(SMOOTHGRAD_KEYS))
    if unknown:
        raise SettingError(f"smoothgrad.{unknown[0]}", node[unknown[0]],
                           f"smoothgrad has the settings {', '.join(SMOOTHGRAD_KEYS)}")
    noise = number("smoothgrad.noise", node.get("noise", 0.15), low=0, low_open=True,
                   allowed="the noise's std as a fraction of the pixel range must be a number > 0")
    samples = whole("smoothgrad.samples", node.get("samples", 20), low=1, allowed="it must be an integer >= 1")
    return SmoothGrad(noise, samples)


def faithfulness_settings(samples: int | None = None, batch_size: int = 32, steps: int = 16,
                          saliency: str = "gradient", smoothgrad: Any = None, baseline: str = "zero",
                          canvas: str = "blur", blur_sigma: float = 1.0, random_orders: int = 20,
                          seed: int = 0) -> ExplainSettings:
    """The builder of an `explain` option that measures (its parameters are the node's keys; `seed` is the
    run's, supplied by the caller)."""
    if samples is not None:
        whole("samples", samples, low=1, allowed="it must be null (the whole split) or an integer >= 1")
    whole("batch_size", batch_size, low=1, allowed="it must be an integer >= 1")
    whole("steps", steps, low=1, allowed="the points of a curve after its start: an integer >= 1")
    one_of("saliency", saliency, SALIENCIES)
    one_of("baseline", baseline, REFERENCES)
    one_of("canvas", canvas, REFERENCES)
    sigma = number("blur_sigma", blur_sigma, low=0, low_open=True,
                   allowed="the blur's std in pixels must be a number > 0")
    whole("random_orders", random_orders, low=1, allowed="it must be an integer >= 1 (20 or more for a steady mean)")
    return ExplainSettings(True, samples, batch_size, steps, saliency, _smoothgrad(smoothgrad), baseline, canvas,
                           sigma, random_orders, seed)


def no_faithfulness(seed: int = 0) -> ExplainSettings:
    """The builder of `explain=none`: nothing measured."""
    return ExplainSettings(seed=seed)


def explain_settings(node: Any, seed: int = 0) -> ExplainSettings:
    """The `explain` node (None or missing: explain=none) as typed settings, through the registry (its
    `_target_` located, its keys checked, a SettingError turned into one line naming explain.<key>)."""
    if node is None:
        node = registry.shipped_node("explain", "none")
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    settings = registry.build("explain", node, seed=seed)
    if not isinstance(settings, ExplainSettings):
        raise UsageError(f"explain._target_={node.get('_target_')} is not allowed: it must build ExplainSettings "
                         "(jacdistill_cli.explain.settings.faithfulness_settings or no_faithfulness)")
    return settings
