"""The `robustness` node (conf/robustness/<name>.yaml) and the teacher's `training`/`adversarial` keys,
checked and typed: every bad value stops the command in one line naming its key."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from jacdistill_cli.config.checks import SettingError, boolean, number, one_of, whole
from jacdistill_cli.errors import setting_error
from jacdistill_cli.robustness.attacks import ATTACKS, LIBRARY, NORMS, Attack

# The settings each attack takes (besides `name`).
ATTACK_KEYS = {
    "fgsm": ("norm", "eps"),
    "pgd": ("norm", "eps", "steps", "step_size", "random_start", "restarts"),
    "transfer_pgd": ("norm", "eps", "steps", "step_size", "random_start", "restarts"),
    "apgd_ce": ("norm", "eps", "steps", "restarts"),
    "apgd_t": ("norm", "eps", "steps", "restarts"),
    "square": ("norm", "eps", "queries", "restarts"),
    "autoattack": ("norm", "eps"),
    "noise": ("sigma",),
}
TEACHER_TRAININGS = ("standard", "adversarial", "trades")


@dataclass(frozen=True)
class RobustnessSettings:
    """What the robustness evaluation runs: `attacks` on the first `samples` samples of a split (None:
    all), `batch_size` at a time, random draws seeded from `seed`."""

    attacks: tuple[Attack, ...] = ()
    samples: int | None = None
    batch_size: int = 200
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.attacks)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def attack_from(entry: Any, where: str) -> Attack:
    """One entry of `robustness.attacks` ({name: pgd, norm: linf, eps: 0.1, ...}) as an Attack."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise setting_error(where, entry, "each attack must be a mapping with a name, e.g. {name: pgd, norm: linf, "
                            "eps: 0.1, steps: 10}")
    try:
        name = one_of("name", entry["name"], ATTACKS)
        allowed = ATTACK_KEYS[name]
        for key in entry:
            if key != "name" and key not in allowed:
                raise SettingError(key, entry[key], f"attack {name} has no setting {key!r}; its settings are "
                                   f"{', '.join(allowed)}")
        values: dict[str, Any] = {"name": name}
        if name == "noise":
            values["eps"] = number("sigma", entry.get("sigma"), low=0, low_open=True,
                                   allowed="the noise's std in pixel scale must be a number > 0")
            return Attack(**values)
        values["norm"] = one_of("norm", entry.get("norm", "linf"), NORMS)
        values["eps"] = number("eps", entry.get("eps"), low=0,
                               allowed="epsilon in pixel scale ([0, 1]) must be a number >= 0")
        if "steps" in allowed:
            values["steps"] = whole("steps", entry.get("steps", 10), low=1, allowed="it must be an integer >= 1")
        if "restarts" in allowed:
            values["restarts"] = whole("restarts", entry.get("restarts", 1), low=1,
                                       allowed="it must be an integer >= 1")
        if entry.get("step_size") is not None:
            values["step_size"] = number("step_size", entry["step_size"], low=0, low_open=True,
                                         allowed="it must be null (2.5 eps / steps) or a number > 0")
        if "random_start" in entry:
            values["random_start"] = boolean("random_start", entry["random_start"])
        if "queries" in allowed:
            values["queries"] = whole("queries", entry.get("queries", 1000), low=1,
                                      allowed="it must be an integer >= 1")
    except SettingError as err:
        raise setting_error(f"{where}.{err.key}", err.value, err.allowed) from None
    if name in LIBRARY and importlib.util.find_spec("torchattacks") is None:   # found, not imported (seconds)
        raise setting_error(f"{where}.name", name, "it needs torchattacks: pip install 'jacdistill[robust]'")
    return Attack(**values)


def robustness_settings(node: Any, seed: int = 0, key: str = "robustness") -> RobustnessSettings:
    """The `robustness` node (None or missing: no attacks) as typed settings."""
    node = _plain(node)
    if node is None:
        return RobustnessSettings(seed=seed)
    if not isinstance(node, dict):
        raise setting_error(key, node, "it must be a config node, e.g. robustness=digits")
    unknown = sorted(set(node) - {"attacks", "samples", "batch_size", "name"})
    if unknown:
        raise setting_error(f"{key}.{unknown[0]}", node[unknown[0]],
                            "robustness has the settings name, attacks, samples, batch_size")
    samples = node.get("samples")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise setting_error(f"{key}.samples", samples, "it must be null (the whole split) or an integer >= 1")
    batch_size = node.get("batch_size", 200)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise setting_error(f"{key}.batch_size", batch_size, "it must be an integer >= 1")
    entries = node.get("attacks") or []
    if not isinstance(entries, list):
        raise setting_error(f"{key}.attacks", entries, "it must be a list of attacks, e.g. "
                            "[{name: pgd, norm: linf, eps: 0.1}]")
    attacks = tuple(attack_from(entry, f"{key}.attacks[{i}]") for i, entry in enumerate(entries))
    keys = [a.key for a in attacks]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise setting_error(f"{key}.attacks", entries, f"{repeated[0]} is listed twice (one metric per name, "
                            "norm and epsilon)")
    return RobustnessSettings(attacks, samples, batch_size, seed)


@dataclass(frozen=True)
class TeacherTraining:
    """How a teacher trained by the runner is trained: `standard` (cross-entropy), `adversarial` (cross-
    entropy on PGD examples, Madry et al. 2018) or `trades` (clean cross-entropy + beta * KL(clean ||
    adversarial), the adversarial examples maximising the KL; Zhang et al. 2019)."""

    kind: str = "standard"
    attack: Attack | None = None     # the inner maximisation's PGD (adversarial, trades)
    beta: float = 6.0                # trades

    def identity(self) -> dict[str, Any]:
        """The entries the teacher's cache key must hold (nothing new for standard training, so that
        the teachers cached before keep their key)."""
        if self.kind == "standard":
            return {}
        assert self.attack is not None
        adversarial = {"norm": self.attack.norm, "eps": self.attack.eps, "steps": self.attack.steps,
                       "step_size": self.attack.step, "random_start": self.attack.random_start}
        if self.kind == "trades":
            adversarial["beta"] = self.beta
        return {"training": self.kind, "adversarial": adversarial}


def teacher_training(teacher: Any) -> TeacherTraining:
    """`teacher.training` (standard | adversarial | trades) and `teacher.adversarial` ({norm, eps, steps,
    step_size, random_start, beta}) of the `teacher` node."""
    teacher = _plain(teacher) or {}
    kind = teacher.get("training", "standard")
    if kind not in TEACHER_TRAININGS:
        raise setting_error("teacher.training", kind, f"it must be one of {', '.join(TEACHER_TRAININGS)}")
    if kind == "standard":
        return TeacherTraining()
    node = teacher.get("adversarial") or {}
    if not isinstance(node, dict):
        raise setting_error("teacher.adversarial", node, "it must be a node {norm, eps, steps, step_size, "
                            "random_start, beta}")
    allowed = ("norm", "eps", "steps", "step_size", "random_start", "beta")
    unknown = sorted(set(node) - set(allowed))
    if unknown:
        raise setting_error(f"teacher.adversarial.{unknown[0]}", node[unknown[0]],
                            f"its settings are {', '.join(allowed)}")
    beta = node.get("beta", 6.0)
    try:
        beta = number("beta", beta, low=0, low_open=True, allowed="TRADES' weight of the KL term must be a "
                      "number > 0")
    except SettingError as err:
        raise setting_error(f"teacher.adversarial.{err.key}", err.value, err.allowed) from None
    entry = {"name": "pgd", **{k: v for k, v in node.items() if k != "beta"}}
    attack = attack_from(entry, "teacher.adversarial")
    if attack.eps == 0:
        raise setting_error("teacher.adversarial.eps", 0, f"with teacher.training={kind} it must be > 0")
    return TeacherTraining(kind, attack, beta)

