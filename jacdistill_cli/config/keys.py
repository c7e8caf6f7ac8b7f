"""Overrides that name no setting: refused in one line with the nearest valid key.

Hydra refuses `trainer.epoch=2` (no such key) itself, in several lines, before a command runs;
`composition_message` says such an error in one line (the console script catches it). Hydra accepts
`+trainer.epoch=2` (add a key) silently, and nothing would read it; `check_added_keys` compares the
composed config with the one the same selection of shipped options gives without the added keys.
A model setting that the model's builder takes but its yaml does not list (`+student.dropout=0.1`
for mlp) is a valid addition.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.errors import UsageError

MODEL_GROUPS = ("teacher", "student", "loss", "jacobian", "features", "optim", "dataset")   # built by _target_


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key path of a config, nodes and leaves: trainer, trainer.epochs, ..."""
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            keys.append(path)
            keys += dotted_keys(node._get_node(key), f"{path}.")
    return keys


def model_settings(base: DictConfig, group: str) -> list[str]:
    """The keyword settings the `_target_` of the option selected in `group` takes (besides its yaml's keys)."""
    from jacdistill_cli.config.registry import accepted_keys, locate

    node = OmegaConf.select(base, group, default=None)
    if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
        return []
    try:
        target = locate(group, node)
    except UsageError:
        return []
    names, _ = accepted_keys(target, ("input_shape", "num_classes"))
    return names


def nearest(key: str, candidates: Iterable[str]) -> str:
    """`; did you mean trainer.epochs?`, or nothing when no valid key is close: first among the
    settings beside it (same parent), then among all."""
    candidates = [c for c in candidates if c != key.rpartition(".")[0]]
    parent, _, leaf = key.rpartition(".")
    siblings = [c.rpartition(".")[2] for c in candidates if c.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
    elsewhere = [c for c in candidates if c.rpartition(".")[0] != parent]  # a setting in the wrong place
    close = difflib.get_close_matches(key, elsewhere, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def split_override(text: str) -> tuple[str, str]:
    key, _, value = text.lstrip("+~").partition("=")
    return key.strip(), value


def is_group(key: str) -> bool:
    """Whether `key` names a config group (`+experiment=...` selects an option, it adds no key)."""
    from importlib import resources

    return "." not in key and (resources.files("jacdistill_cli.conf") / key).is_dir()


def compose_without(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def check_added_keys() -> None:
    """Refuse `+KEY=VALUE` overrides of the running Hydra job whose KEY is no setting of the command."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    added = [o for o in overrides if o.startswith("+") and not split_override(o)[0].startswith("hydra.")
             and not is_group(split_override(o)[0])]
    if not added:
        return
    try:
        base = compose_without(str(hydra_cfg.job.config_name), [o for o in overrides if o not in added])
    except Exception:  # noqa: BLE001 - the other overrides need the added keys: nothing to compare with
        return
    for override in added:
        key, value = split_override(override)
        if OmegaConf.select(base, key, default=None) is not None or _present(base, key):
            continue
        parent, _, leaf = key.rpartition(".")
        if parent in MODEL_GROUPS and leaf in model_settings(base, parent):
            continue
        candidates = dotted_keys(base) + [f"{g}.{s}" for g in MODEL_GROUPS for s in model_settings(base, g)]
        where = f"{parent} has no setting {leaf!r}" if parent and _present(base, parent) else "there is no such setting"
        raise UsageError(f"+{key}={value} is not allowed: {where}{nearest(key, candidates)}")


def _present(cfg: DictConfig, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return True


def composition_message(command: str, args: list[str], err: Exception) -> str:
    text = str(err)
    missing = re.search(r"Could not override '([\w.]+)'", text)
    if missing and "To append to your config use" in text:
        key = missing.group(1)
        value = next((split_override(a)[1] for a in args if split_override(a)[0] == key), "")
        try:
            candidates = dotted_keys(compose_without(command, [a for a in args if split_override(a)[0] != key]))
        except Exception:  # noqa: BLE001
            candidates = []
        return f"{key}={value} is not allowed: there is no such setting{nearest(key, candidates)}"
    text = text.split("Config search path")[0]  # Hydra's list of where it looked: not the user's concern
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


def hydra_quoted(text: str) -> str:
    """`text` as a single-quoted value of Hydra's override grammar: a quote becomes \\', the backslashes
    just before a quote or before the closing quote are doubled, `${` is kept from interpolating."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("${", "\\${") + "'"


HOME_VALUE = re.compile(r"^([+~]{0,2}[A-Za-z_][\w.\-/@]*)=(~(?:/.*)?)$")


def home_paths(args: list[str]) -> list[str]:
    """`key=~/data` as Hydra's override grammar takes it (quoted: it does not take an unquoted `~`, and no
    shell expands `~` inside `key=~/path`); the value stays `~/data`, which the settings that are paths expand
    to the home directory."""
    return [f"{m.group(1)}={hydra_quoted(m.group(2))}" if (m := HOME_VALUE.match(arg)) else arg for arg in args]
