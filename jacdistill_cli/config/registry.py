"""One mechanism for every config group: a node names what builds its object with Hydra's `_target_`.

    conf/loss/kl.yaml:        _target_: jacdistill_cli.engine.losses.kl
                              temperature: ${temperature}
    myconf/student/tiny.yaml: _target_: mymodels.tiny
                              width: 8

The options of a group are its config files (shipped in conf/, or a user's found through
`--config-dir`/`hydra.searchpath`); the target is located as Hydra's locator finds it (saying why not) and called with
the node's keys as keywords, plus what the caller supplies (a model's input shape and class count,
an optimiser's parameters). The target checks its own settings: a `config.checks.SettingError`
becomes one line naming `<group>.<key>`. A key the target does not take is refused in one line
listing the keys it takes. `name` labels the option (logs, hyperparameters, reports); a shipped
option's name may not be pointed at another target (`optim.name=adamw` on `optim=adam` is refused,
never silently Adam).
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import os
import sys
from importlib import resources
from typing import Any, Callable, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.checks import SettingError
from jacdistill_cli.errors import UsageError, setting_error

RESERVED = ("_target_", "_partial_", "_recursive_", "_convert_", "name")


def locate(group: str, node: Any) -> Callable:
    """The callable the node's `_target_` names, or one line saying what is wrong."""
    target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
    if not isinstance(target, str) or not target:
        raise UsageError(f"{group} has no _target_: each option of the {group} group names what builds it with "
                         f"`_target_: package.module.name`")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())   # a user's own module next to where the command runs, as with `python -m`
    try:
        found = import_target(target)
    except Exception as err:   # noqa: BLE001 - importing a user's module runs its code: any error is the reason
        raise setting_error(f"{group}._target_", target, f"it cannot be imported ({import_failure(err)}); "
                            "it must name a function or class, e.g. mypackage.module.name, importable from "
                            "the current directory or PYTHONPATH") from None
    if not callable(found):
        raise setting_error(f"{group}._target_", target, "it must name a function or class")
    return found


def import_target(path: str) -> Any:
    """The object at a dotted path, as Hydra's locator finds it (the longest importable module, then
    attributes), but failing with the underlying reason: `No module named 'mymodels'`, `module 'mymodels'
    has no attribute 'tinyy'`, or the error the module raised while it was imported."""
    parts = path.split(".")
    if not all(part.isidentifier() for part in parts):
        raise ValueError(f"{path!r} is not a dotted path of names")
    found = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(found, part):
            found = getattr(found, part)
            continue
        prefix = ".".join(parts[:i + 1])
        try:
            found = importlib.import_module(prefix)
        except ModuleNotFoundError as err:
            if err.name != prefix:   # the module exists but imports something missing: that is the reason
                raise
            owner = f"module {'.'.join(parts[:i])!r}" if inspect.ismodule(found) else repr(".".join(parts[:i]))
            raise AttributeError(f"{owner} has no attribute {part!r}") from None
    return found


def import_failure(err: BaseException) -> str:
    """An import's failure in one line: the message of an ImportError or AttributeError, else `Type: message`."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, (ImportError, AttributeError, ValueError)) and lines:
        return lines[0]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def settings_of(node: Any, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The node's keyword settings: every key but the reserved ones and `exclude`, resolved."""
    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    skip = set(RESERVED) | set(exclude)
    return {k: v for k, v in plain.items() if k not in skip}


def accepted_keys(target: Callable, supplied: Iterable[str] = ()) -> tuple[list[str], bool]:
    """(keyword parameters of the target other than those the caller supplies, takes **kwargs)."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return [], True
    supplied = set(supplied)
    names = [p.name for p in parameters
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in supplied]
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def check_keys(group: str, target: Callable, settings: dict[str, Any], supplied: Iterable[str] = (),
               positional: int = 0) -> None:
    names, takes_any = accepted_keys(target, supplied)
    names = names[positional:]
    if takes_any:
        return
    unknown = sorted(set(settings) - set(names))
    if unknown:
        shown = getattr(target, "__qualname__", str(target))
        raise UsageError(f"{group}.{unknown[0]} is not a setting of {shown!r}; its settings are: "
                         f"{', '.join(names) or '(none)'}")


@functools.lru_cache(maxsize=None)
def shipped_options(group: str) -> dict[str, str]:
    """{option name: _target_} of the options shipped in conf/<group>/."""
    options = {}
    for option in _shipped_option_names(group):
        target = _shipped_target(group, option)
        if isinstance(target, str):
            options[option] = target
    return options


def shipped_node(group: str, option: str) -> DictConfig:
    """The node of the option shipped as conf/<group>/<option>.yaml, as Hydra composes it (a copy)."""
    return copy.deepcopy(_composed_option(group, option))


# A shipped option's defaults list holds `_self_`, shipped configs placed at the option's own package
# (`/arch/cnn@_here_`: conf/teacher/cnn.yaml is conf/arch/cnn.yaml with the teacher's sizes), and `optional`
# entries that depend on another group's choice (conf/loss/dkd.yaml's `/crd_pair/dkd@_here_: ${crd_pair}`,
# the pair's nckd_weight), which add nothing to the option on its own. These readers follow the list as Hydra
# does, reading files only (they run at start-up); tests/test_conf.py proves them equal to Hydra's compose.
HERE = "@_here_"


@functools.lru_cache(maxsize=None)
def _shipped_option_names(group: str) -> tuple[str, ...]:
    folder = resources.files("jacdistill_cli.conf") / group
    if not folder.is_dir():
        return ()
    return tuple(sorted(e.name.removesuffix(".yaml") for e in folder.iterdir() if e.name.endswith(".yaml")))


def _option_text(group: str, option: str) -> str:
    return (resources.files("jacdistill_cli.conf") / group / f"{option}.yaml").read_text()


def _defaults(entries: Any) -> list[Any]:
    """The option's defaults entries in composition order; without `_self_`, Hydra composes the option's own
    keys last."""
    entries = list(entries or [])
    return entries if "_self_" in entries else [*entries, "_self_"]


def _included(group: str, option: str, entry: Any) -> tuple[str, str] | None:
    """(group, option) of a defaults entry `/GROUP/OPTION@_here_`; None for `_self_` and `optional` entries."""
    if isinstance(entry, str) and entry.startswith("/") and entry.endswith(HERE):
        included_group, _, included = entry[1:].removesuffix(HERE).rpartition("/")
        return included_group, included
    if entry == "_self_" or (isinstance(entry, dict) and len(entry) == 1
                             and str(next(iter(entry))).startswith("optional ")):
        return None
    raise ValueError(f"conf/{group}/{option}.yaml: the defaults entry {entry} is not one that shipped options use "
                     "(_self_, /GROUP/OPTION@_here_, or an optional choice)")


@functools.lru_cache(maxsize=None)
def _shipped_target(group: str, option: str) -> Any:
    """The `_target_` the option composes to: the last one set in the order of its defaults list. YAML's C
    reader where installed (a target and the defaults entries are plain strings), for start-up time."""
    data = yaml.load(_option_text(group, option), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(data, dict):
        return None
    target = None
    for entry in _defaults(data.get("defaults")):
        included = _included(group, option, entry)
        if included is not None:
            target = _shipped_target(*included) or target
        elif entry == "_self_":
            target = data.get("_target_") or target
    return target


@functools.lru_cache(maxsize=None)
def _composed_option(group: str, option: str) -> DictConfig:
    node = OmegaConf.create(_option_text(group, option))
    if not isinstance(node, DictConfig) or "defaults" not in node:
        return node
    entries = OmegaConf.to_container(node.pop("defaults"))
    composed = OmegaConf.create()
    for entry in _defaults(entries):
        included = _included(group, option, entry)
        if included is not None:
            composed = OmegaConf.merge(composed, _composed_option(*included))
        elif entry == "_self_":
            composed = OmegaConf.merge(composed, node)
    return composed


def check_name(group: str, node: Any) -> None:
    """`name` labels the node's own target: a shipped option's name (or the name of the function it
    calls) labels nothing else, so that `optim.name=adamw` on `optim=adam` never trains with Adam."""
    name = node.get("name") if isinstance(node, (dict, DictConfig)) else None
    target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
    options = shipped_options(group)
    if name is None or not options:
        return
    if name in options and options[name] != target:
        raise setting_error(f"{group}.name", name, f"{group}={name} is the option that builds {options[name]}, but "
                            f"this node builds {target}; choose the option with {group}={name} "
                            f"(options: {', '.join(sorted(options))}) or set {group}._target_")
    own = {option for option, built in options.items() if built == target}
    if own and name not in own and name != str(target).rsplit(".", 1)[-1]:
        raise setting_error(f"{group}.name", name, f"this node builds {target}, the option "
                            f"{' or '.join(sorted(own))}; choose an option with {group}=NAME "
                            f"(options: {', '.join(sorted(options))}) or set {group}._target_ to your own")


def label(group: str, node: Any) -> str:
    """The option's name: its `name`, else the last part of its `_target_`."""
    name = node.get("name") if isinstance(node, (dict, DictConfig)) else None
    if name is not None:
        return str(name)
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]


def build(group: str, node: Any, *args: Any, exclude: Iterable[str] = (), **supplied: Any) -> Any:
    """Call the node's target with `args`, the node's settings and `supplied` keywords."""
    target = locate(group, node)
    check_name(group, node)
    settings = settings_of(node, exclude)
    check_keys(group, target, settings, supplied, positional=len(args))
    try:
        return target(*args, **settings, **supplied)
    except SettingError as err:
        raise setting_error(f"{group}.{err.key}", err.value, err.allowed) from None


def bind(group: str, node: Any, exclude: Iterable[str] = (), positional: int = 0) -> Callable:
    """The node's target with its settings bound as keywords (a function that takes the rest)."""
    target = locate(group, node)
    check_name(group, node)
    settings = settings_of(node, exclude)
    check_keys(group, target, settings, positional=positional)
    check = getattr(target, "check_settings", None)   # a function target's own check of its values (losses)
    if check is not None:
        try:
            check(**settings)
        except SettingError as err:
            raise setting_error(f"{group}.{err.key}", err.value, err.allowed) from None
    return functools.partial(target, **settings)
