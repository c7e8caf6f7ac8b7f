"""Hydra's resolvers of jacdistill: unique default run directories and sweep job directories named by what
the sweep varies."""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

MAX_DIRNAME = 120

# Hydra's own sweeper runs each combination of values once, so its jobs' overrides are unique.
# Hydra's own sweeper, and jacdistill's, which checks every job first and runs them as Hydra's does.
BASIC_SWEEPERS = ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                  "hydra_plugins.jacdistill_sweeper.checked_sweeper.CheckedSweeper")

def _parse(lines: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([str(line) for line in lines])

def _values(override) -> int:
    """How many values an override gives its key: 1 for a plain value, the count of a choice or range
    sweep, 2 (more than one) for a sweep whose values are drawn (an interval)."""
    if not override.is_sweep_override():
        return 1
    try:
        return len(list(override.sweep_string_iterator()))
    except Exception:  # noqa: BLE001 - interval and other drawn sweeps: several values
        return 2

@functools.lru_cache(maxsize=32)
def swept_keys(sweep_dir: str) -> frozenset[str] | None:
    """The keys that take more than one value in the sweep at `sweep_dir`, read from the multirun.yaml
    Hydra's basic sweeper writes there before its first job: the command line's overrides and the
    config's hydra.sweeper.params (the command line wins for a key in both). None when unknown
    (no such file: another sweeper, or not a sweep)."""
    multirun = Path(sweep_dir) / "multirun.yaml"
    if not multirun.is_file():
        return None
    try:
        cfg = OmegaConf.load(multirun)
        params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
        lines = [f"{k}={v}" for k, v in params.items()]
        lines += list(OmegaConf.select(cfg, "hydra.overrides.task", default=None) or [])
        counts = {override.key_or_group: _values(override) for override in _parse(lines)}
    except Exception:  # noqa: BLE001 - an unreadable grid: the jobs are named by all their overrides
        return None
    return frozenset(key for key, count in counts.items() if count > 1)

def varying_dirname(task: list[str], swept: frozenset[str] | None, exclude: list[str] = (),
                    item_sep: str = ",", kv_sep: str = "=") -> str:
    """Hydra's override_dirname of a job's overrides `task`, keeping only the keys the sweep varies
    (all of them when `swept` is None) and leaving out `exclude`: `alpha=0.3,seed=1`."""
    lines = sorted(o.input_line for o in _parse(task)
                   if o.key_or_group not in exclude and (swept is None or o.key_or_group in swept))
    return re.sub("=", kv_sep, item_sep.join(lines))

def job_dirname(override_dirname: str, job_num: Any, _root_: Any = None) -> str:
    """A sweep job's directory name: the overrides the sweep varies (`alpha=0.3,jacobian=exact`; a
    constant one such as `trainer.epochs=1` is left out), made safe for a file name.

    TensorBoard names each run of a sweep directory by this name. It stays unique: a name whose
    characters had to be replaced, or that was cut to MAX_DIRNAME, ends in `~` and a short hash of the
    overrides; under a sweeper other than Hydra's basic one (Optuna may draw the same values twice, and
    which keys vary is not known in advance) the job number comes first and every override is kept
    (`007,alpha=0.31`). A job whose overrides are all constant is named by its number.
    """
    original = str(override_dirname)
    sweeper = OmegaConf.select(_root_, "hydra.sweeper._target_", default=None) if _root_ is not None else None
    if _root_ is not None and sweeper in (None, *BASIC_SWEEPERS):
        sweep_dir = OmegaConf.select(_root_, "hydra.sweep.dir", default=None)
        swept = swept_keys(str(Path(sweep_dir).resolve())) if sweep_dir else None
        if swept is not None:
            dirname = OmegaConf.select(_root_, "hydra.job.config.override_dirname", default=None) or {}
            original = varying_dirname(list(OmegaConf.select(_root_, "hydra.overrides.task", default=None) or []),
                                       swept, list(dirname.get("exclude_keys", None) or []),
                                       dirname.get("item_sep", ","), dirname.get("kv_sep", "="))
    name = re.sub(r"[^A-Za-z0-9=,._+\-]", "_", original).strip("._")
    if not name:
        return str(job_num)
    if name != original or len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(original.encode()).hexdigest()[:8]
        name = f"{name[:MAX_DIRNAME - 9]}~{digest}"
    if sweeper not in (None, *BASIC_SWEEPERS):
        name = f"{int(job_num):03d},{name}"
    return name

_UNIQUE: list[str] = []

def unique_suffix() -> str:
    """A short random name part, the same for the whole process: default run directories
    (`outputs/train/DATE/TIME-3f9a1c`) of runs started in the same second differ by it. Six hex
    digits keep names short for TensorBoard; a collision (one in 16 million) is still caught: a
    run refuses a directory that another configuration's results or a live run hold."""
    import secrets

    if not _UNIQUE:
        _UNIQUE.append(secrets.token_hex(3))
    return _UNIQUE[0]

def register_resolvers() -> None:
    """jacdistill's resolvers, and its sweeper among Hydra's plugins (Hydra finds plugins by scanning the
    `hydra_plugins` namespace, which an editable install does not expose to its scan)."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()   # first: its scan executes the plugin modules anew (Hydra's BasicSweeper too)
    from hydra_plugins.jacdistill_sweeper.checked_sweeper import CheckedSweeper

    plugins.register(CheckedSweeper)
    if not OmegaConf.has_resolver("jd_help"):
        from jacdistill_cli.config.help import help_template

        OmegaConf.register_new_resolver("jd_help", help_template)
    if not OmegaConf.has_resolver("jd_job_dir"):
        OmegaConf.register_new_resolver("jd_job_dir", job_dirname)
    if not OmegaConf.has_resolver("jd_unique"):
        # Cached in the config like Hydra's `now`, so a sweep's jobs (copies of its config) share it.
        OmegaConf.register_new_resolver("jd_unique", unique_suffix, use_cache=True)
