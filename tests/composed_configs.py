"""The composed configs of the shipped commands, presets and options, as test data: what each job composes
to (resolved, without the `hydra` node), stored compactly in tests/data/composed_configs.json so that a
change of conf/'s layout can be proven to compose the same configs.

The jobs: `train`, `teacher` and `check` as shipped, `bench` with each bench_pair, `train` with each teacher
and each student option, the first job of the experiments digits_fewshot, vit_fewshot, robust_transfer and
paper_cifar100, and every job of crd_cifar100; a job's overrides are those Hydra's basic sweeper gives it.

Each config is stored as its top-level keys in order, each pointing into a table of distinct nodes (the
jobs share most of their nodes): key order is kept, and the file stays small.

Written once from the conf/ of commit a0ce62f (before conf/arch/ and the teacher_training group):
    python tests/composed_configs.py CONF_DIR tests/data/composed_configs.json
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

DATA = Path(__file__).resolve().parent / "data" / "composed_configs.json"
FIRST_JOB_EXPERIMENTS = ("digits_fewshot", "vit_fewshot", "robust_transfer", "paper_cifar100")
ALL_JOBS_EXPERIMENTS = ("crd_cifar100",)
# Resolved under no environment of the user's (cache_dir and dataset.root read these).
ENVIRONMENT = ("JACDISTILL_CACHE", "JACDISTILL_DATA")


def job_name(command: str, overrides: list[str]) -> str:
    return " ".join([command, *overrides])


def sweep_jobs(experiment: str) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper makes them from the preset's sweeper params."""
    cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides([*params, f"experiment={experiment}"])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def options(group: str) -> list[str]:
    return sorted(GlobalHydra.instance().config_loader().get_group_options(group, ObjectType.CONFIG))


def jobs() -> list[tuple[str, list[str]]]:
    """(command, overrides) of every job, read from the conf/ Hydra is initialised with."""
    listed: list[tuple[str, list[str]]] = [("train", []), ("teacher", []), ("check", [])]
    listed += [("bench", [f"bench_pair={pair}"]) for pair in options("bench_pair")]
    listed += [("train", [f"{role}={option}"]) for role in ("teacher", "student") for option in options(role)]
    listed += [("train", sweep_jobs(experiment)[0]) for experiment in FIRST_JOB_EXPERIMENTS]
    listed += [("train", job) for experiment in ALL_JOBS_EXPERIMENTS for job in sweep_jobs(experiment)]
    return listed


@contextlib.contextmanager
def no_user_environment() -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in ENVIRONMENT if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def composed(command: str, overrides: list[str]) -> dict[str, Any]:
    """The job's config as plain containers, resolved, in the order Hydra composed it."""
    with no_user_environment():
        return OmegaConf.to_container(compose(command, overrides=overrides), resolve=True)


def _index(table: list[Any], seen: dict[str, int], item: Any) -> int:
    text = json.dumps(item)
    if text not in seen:
        seen[text] = len(table)
        table.append(item)
    return seen[text]


def pack(configs: list[tuple[str, list[str], dict[str, Any]]]) -> dict[str, Any]:
    """{"layouts": the distinct lists of top-level keys, "nodes": the distinct nodes, "jobs": [[command,
    overrides, layout index, a node index per key], ...]}."""
    layouts: list[list[str]] = []
    nodes: list[Any] = []
    seen_layouts: dict[str, int] = {}
    seen_nodes: dict[str, int] = {}
    packed = [[command, overrides, _index(layouts, seen_layouts, list(config)),
               [_index(nodes, seen_nodes, node) for node in config.values()]] for command, overrides, config in configs]
    return {"layouts": layouts, "nodes": nodes, "jobs": packed}


def stored_jobs(data: dict[str, Any]) -> dict[str, tuple[str, list[str], dict[str, Any]]]:
    """{job name: (command, overrides, the stored config, its keys in their stored order)}."""
    return {job_name(command, overrides): (command, overrides, {
                key: data["nodes"][i] for key, i in zip(data["layouts"][layout], indices, strict=True)})
            for command, overrides, layout, indices in data["jobs"]}


def load() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def write(initialize: Callable[[], ContextManager[Any]], path: Path) -> None:
    with initialize():
        configs = [(command, overrides, composed(command, overrides)) for command, overrides in jobs()]
    path.write_text(json.dumps(pack(configs), separators=(",", ":")) + "\n")


if __name__ == "__main__":
    conf_dir, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    write(lambda: initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"), out)
    print(f"{out}: {out.stat().st_size} bytes")
