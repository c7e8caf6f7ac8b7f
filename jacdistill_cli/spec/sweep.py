"""Every job of a sweep checked before the first one starts: its overrides expanded as Hydra's basic sweeper
expands them, each job composed and its spec built (the command's whole settings check), so that a sweep
never stops half-way for a value it could have refused at the start; and jobs that would be the same run
(they differ only in settings their other values make idle, `alpha=0` with two Jacobian methods) named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from jacdistill_cli.errors import UsageError


def builders() -> dict[str, Callable[..., Any]]:
    """Each command's spec builder, by the command's Hydra job name."""
    from jacdistill_cli.spec.build import teacher_run_spec, train_spec
    from jacdistill_cli.spec.tools import bench_spec, check_spec, evaluate_spec

    return {"train": train_spec, "teacher": teacher_run_spec, "evaluate": evaluate_spec, "check": check_spec,
            "bench": bench_spec}


def expanded(params: dict[str, Any], overrides: list[str], loader: Any = None) -> list[list[str]]:
    """The jobs' overrides: the sweeper's params (the config's hydra.sweeper.params) and the command line's,
    expanded into one list per job, in the order the basic sweeper runs them. `loader`: Hydra's config loader,
    which a `glob(...)` of a group's options needs (it lists them)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{key}={value}" for key, value in params.items()] + list(overrides)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(lines)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


@dataclass
class Job:
    overrides: list[str]
    spec: Any


def varying(jobs: list[list[str]]) -> list[list[str]]:
    """Each job's overrides that take more than one value in the sweep (how a job is told from the others)."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for line in job:
            key, _, value = line.partition("=")
            values.setdefault(key, set()).add(value)
    return [[line for line in job if len(values[line.partition("=")[0]]) > 1] or job for job in jobs]


def task_config(composed: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """A composed job's own config (its hydra node dropped, as Hydra hands it to the job) and its choices."""
    choices = OmegaConf.to_container(composed.hydra.runtime.choices) if "hydra" in composed else {}
    task = composed.copy()
    with open_dict(task):
        task.pop("hydra", None)
    return task, {group: option for group, option in choices.items() if not group.startswith("hydra/")}


def checked_jobs(command: str, jobs: list[list[str]], compose: Callable[[list[str]], DictConfig]) -> list[Job]:
    """Each job composed and its spec built; the first job refused ends all of them in one line naming its
    overrides and what is wrong."""
    build = builders()[command]
    shown = varying(jobs)
    checked = []
    for index, (job, named) in enumerate(zip(jobs, shown)):
        try:
            cfg, choices = task_config(compose(job))
            checked.append(Job(job, build(cfg, choices)))
        except UsageError as err:
            raise UsageError(f"job {index} of the sweep ({','.join(named)}) is refused, so no job runs: {err}") from None
    return checked


def effective(spec: Any) -> Any:
    """What a job's results depend on: its resolved config without the parts its other settings make idle
    (a Jacobian method whose term has weight 0)."""
    config = {k: v for k, v in spec.config.items() if k != "hydra"}
    for part, _ in getattr(getattr(spec, "objective", None), "idle", ()):
        config.pop(part, None)
    return OmegaConf.to_yaml(OmegaConf.create(config))


def same_runs(jobs: list[Job]) -> list[str]:
    """One line per group of jobs that would be the same run, naming them and why."""
    groups: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(effective(job.spec), []).append(index)
    shown = varying([job.overrides for job in jobs])
    lines = []
    for indices in groups.values():
        if len(indices) > 1:
            idle = getattr(getattr(jobs[indices[0]].spec, "objective", None), "idle", ())
            why = "; ".join(f"{reason}, so the {part} settings make no difference" for part, reason in idle)
            named = ", ".join(f"{i} ({','.join(shown[i])})" for i in indices)
            lines.append(f"jobs {named} are the same run" + (f": {why}" if why else "") +
                         "; each is trained and reported")
    return lines


def check_sweep(config: DictConfig, loader: Any, params: dict[str, Any], arguments: list[str]) -> None:
    """What jacdistill's sweeper (hydra_plugins/jacdistill_sweeper) does before the first job: every job
    composed by Hydra's config `loader` as the launcher will compose it and checked; a composition error or a
    refused setting ends the sweep in one line; jobs that would be the same run are named."""
    import sys

    from jacdistill_cli.config.keys import composition_message

    command = str(config.hydra.job.name)
    if command not in builders():
        return

    def compose(overrides: list[str]) -> DictConfig:
        try:
            return loader.load_sweep_config(config, overrides)
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors (an unknown option or key)
            raise UsageError(composition_message(command, overrides, err)) from None

    jobs = checked_jobs(command, expanded(params, arguments, loader), compose)
    for line in same_runs(jobs):
        print(f"jacdistill {command}: warning: {line}", file=sys.stderr, flush=True)
    print(f"jacdistill {command}: {len(jobs)} job{'s' if len(jobs) != 1 else ''} checked; sweep directory "
          f"{Path(str(config.hydra.sweep.dir)).resolve()}", flush=True)
