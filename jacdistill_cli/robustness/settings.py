"""The `robustness` node (conf/robustness/<name>.yaml) and the teacher's `training`/`adversarial` keys,
checked and typed: every bad value stops the command in one line naming its key.

Each entry of `robustness.attacks` is a `_target_` node built through config/registry.py: `{name: pgd, ...}`
stands for `{_target_: <robustness.attacks.ATTACKS["pgd"]>, ...}`, an entry may give its own `_target_` (a
user's attack, see robustness/attacks.py). The keys an attack takes are its target's keyword parameters, its
defaults theirs; the target checks its values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from jacdistill_cli.config import registry
from jacdistill_cli.config.checks import SettingError, number, one_of
from jacdistill_cli.errors import setting_error
from jacdistill_cli.robustness.attacks import ATTACKS, PGD, Attack

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


def target_path(attack: type) -> str:
    return f"{attack.__module__}.{attack.__qualname__}"


def check_settings(where: str, target: Any, label: str, node: dict[str, Any]) -> None:
    """Refuse a key the target does not take, in one line listing those it takes."""
    names, takes_any = registry.accepted_keys(target)
    for key in node:
        if key not in registry.RESERVED and not takes_any and key not in names:
            raise setting_error(f"{where}.{key}", node[key], f"attack {label} has no setting {key!r}; its settings "
                                f"are {', '.join(names)}")


def built_attack(where: str, node: dict[str, Any], label: str) -> Attack:
    """The attack the node's `_target_` builds with its settings (a bad value: one line naming its key)."""
    attack = registry.build(where, node)
    if not isinstance(attack, Attack):
        raise setting_error(f"{where}._target_", node["_target_"], "it must build a jacdistill_cli.robustness."
                            "attacks.Attack (see that module's docstring for what an attack implements)")
    own = ATTACKS.get(attack.name)
    if own is not None and type(attack) is not own:
        raise setting_error(f"{where}._target_", node["_target_"], f"it builds an attack named {attack.name!r}, "
                            f"the name of the shipped attack {target_path(own)}; name yours otherwise")
    if node.get("name", attack.name) != attack.name:
        raise setting_error(f"{where}.name", node["name"], f"the attack {label} names itself {attack.name!r} (its "
                            f"metric is {attack.key}); leave name out")
    return attack


def attack_from(entry: Any, where: str) -> Attack:
    """One entry of `robustness.attacks` ({name: pgd, norm: linf, eps: 0.1, ...}, or a user's own
    {_target_: ..., ...}) as an Attack."""
    if not isinstance(entry, dict) or ("name" not in entry and "_target_" not in entry):
        raise setting_error(where, entry, "each attack must be a mapping with a name, e.g. {name: pgd, norm: linf, "
                            "eps: 0.1, steps: 10}, or a _target_ of your own")
    if "_target_" in entry:
        target, label = registry.locate(where, entry), str(entry["_target_"])
        node = entry
    else:
        try:
            label = one_of("name", entry["name"], ATTACKS)
        except SettingError as err:
            raise setting_error(f"{where}.{err.key}", err.value, err.allowed) from None
        target, node = ATTACKS[label], {"_target_": target_path(ATTACKS[label]), **entry}
    check_settings(where, target, label, entry)
    return built_attack(where, node, label)


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
    attack: PGD | None = None        # the inner maximisation's PGD (adversarial, trades)
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
    allowed = adversarial_keys()
    if not isinstance(node, dict):
        raise setting_error("teacher.adversarial", node, f"it must be a node {{{', '.join(allowed)}}}")
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
    attack = registry.build("teacher.adversarial", {"_target_": target_path(PGD), **node}, exclude=("beta",))
    if attack.eps == 0:
        raise setting_error("teacher.adversarial.eps", 0, f"with teacher.training={kind} it must be > 0")
    return TeacherTraining(kind, attack, beta)


def adversarial_keys() -> list[str]:
    """The keys of `teacher.adversarial`: PGD's settings but `restarts` (training makes one start), and
    TRADES' `beta`."""
    names, _ = registry.accepted_keys(PGD)
    return [name for name in names if name != "restarts"] + ["beta"]
