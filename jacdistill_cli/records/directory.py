"""One run per directory: the directory Hydra gives a run, its claim (another configuration's results are
refused; this configuration's are finished, continued from last.pt, or started over) and its lock."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from jacdistill_cli import storage
from jacdistill_cli.errors import UsageError
from jacdistill_cli.records.status import FINISHED

log = logging.getLogger("jacdistill")

LAST, BEST, LOCK = "last.pt", "best.pt", ".run.lock"

# Settings that cannot change a run's results: a directory's run continues (or is skipped as
# finished) when only these differ. The device is not among them: a GPU's random streams and
# arithmetic differ from a CPU's, so a run moved to another device is another run.
# The logging cadence and what is measured after training (explain) change no weight either; `published`
# held the CRD pairs' published loss settings, which the loss node itself now holds (and compares).
NEUTRAL_KEYS = ("cache_dir", "trainer.resume", "trainer.save_every_steps", "trainer.save_every_epochs",
                "trainer.threads", "trainer.num_workers", "trainer.log_every_steps", "explain", "published",
                "crd_pair")


def multirun() -> bool:
    """Whether this process runs a job of a multirun (a sweep), as Hydra says; False outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@dataclass(frozen=True)

class RunPlace:
    """Where a run writes and how it is continued: its directory, whether it is a job of a sweep, the command
    line that resumes it, and Hydra's record of how it was composed (written once the directory is claimed)."""

    run_dir: Path
    multirun: bool = False
    command: str = ""
    hydra_files: tuple[tuple[str, str], ...] = ()   # (.hydra/ file name, its YAML)

    @property
    def key(self) -> str:
        """The setting that names the directory: hydra.run.dir, or hydra.sweep.dir for a sweep's job."""
        return "hydra.sweep.dir" if self.multirun else "hydra.run.dir"

    @classmethod
    def of_hydra(cls, cfg: Any) -> "RunPlace":
        from hydra.core.hydra_config import HydraConfig

        from jacdistill_cli.records.resume import resume_command

        run_dir = run_directory()
        hydra_cfg = HydraConfig.instance().cfg
        files = (("config.yaml", OmegaConf.to_yaml(cfg)), ("hydra.yaml", OmegaConf.to_yaml(hydra_cfg)),
                 ("overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)))
        return cls(run_dir, multirun(), resume_command(run_dir, multirun()), files)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config (resolved, as plain containers) as flat key -> value, without the settings that cannot change
    results."""
    return {key: value for key, value in _flat(config or {}).items()
            if not any(key == k or key.startswith(k + ".") for k in NEUTRAL_KEYS)}


def differences(stored: Any, current: Any) -> list[str]:
    """`key: A there, B here` for each setting that differs (results-changing settings only)."""
    there, here = comparable(stored), comparable(current)
    missing = object()
    return [f"{key}: {there.get(key, 'unset')!r} there, {here.get(key, 'unset')!r} here"
            for key in sorted(set(there) | set(here)) if there.get(key, missing) != here.get(key, missing)]


@dataclass

class Claim:
    """What a run's directory holds for this configuration."""
    finished: dict[str, Any] | None = None   # metrics.json of a finished run of this configuration
    resume: Path | None = None               # last.pt to continue from
    restart: bool = False                    # earlier output of this configuration, started over


def claim_directory(config: dict[str, Any], place: RunPlace) -> Claim:
    """Refuse a directory holding another configuration's results (one line naming what differs);
    for this configuration's (`config`: the run's, resolved, as plain containers): whether it finished, or a
    last.pt to resume from (`trainer.resume=auto`)."""
    run_dir, where = place.run_dir, f"{place.key}={str(place.run_dir)!r} is not allowed"
    stored_file = run_dir / "config.yaml"
    if stored_file.is_file():
        try:
            stored = OmegaConf.to_container(OmegaConf.load(stored_file), resolve=False)
        except Exception as err:  # noqa: BLE001 - any unreadable config.yaml means the same
            raise UsageError(f"{where}: its config.yaml cannot be read ({type(err).__name__}); give this run a "
                             "directory of its own") from None
        differ = differences(stored, config)
        if differ:
            more = f"; and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise UsageError(f"{where}: it holds the results of another configuration ({'; '.join(differ[:3])}"
                             f"{more}); give this run a directory of its own")
    elif any(run_dir.glob("events.out.tfevents.*")) or (run_dir / "metrics.json").is_file():
        raise UsageError(f"{where}: it holds results without the config.yaml that says whose; give this run a "
                         "directory of its own")
    claim = Claim()
    metrics = read_metrics(run_dir)
    mode = config["trainer"]["resume"]
    if mode == "auto" and metrics is not None and metrics.get("status", FINISHED) == FINISHED:
        claim.finished = metrics
    elif mode == "auto" and (run_dir / LAST).is_file():
        claim.resume = run_dir / LAST
    claim.restart = claim.finished is None and claim.resume is None and (
        any(run_dir.glob("events.out.tfevents.*")) or (run_dir / "metrics.json").is_file()
        or (run_dir / LAST).is_file())
    return claim


def claimed(config: dict[str, Any], place: RunPlace) -> Claim:
    """The run directory claimed for this configuration, its records written: left as it is when this
    configuration finished there, cleared of the last run's results when started over."""
    claim = claim_directory(config, place)
    if claim.finished is not None:
        log.info(f"this configuration finished in {place.run_dir} already (trainer.resume=auto): nothing to do")
        return claim
    remove_stale_temporaries(place.run_dir)
    if claim.restart:
        for name in (LAST, BEST, "metrics.json"):
            (place.run_dir / name).unlink(missing_ok=True)
    for name, text in place.hydra_files:   # Hydra's own record, once the directory is known to be this run's
        storage.write_text(place.run_dir / ".hydra" / name, text)
    storage.write_text(place.run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    return claim


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


class DirectoryLock:
    """An exclusive lock on the run directory for this process's lifetime (released by the kernel
    however the process ends): a second run started in the same directory is refused in one line."""

    def __init__(self, place: RunPlace):
        self.path, self.key = place.run_dir / LOCK, place.key
        self.handle: Any = None

    def __enter__(self) -> "DirectoryLock":
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "?"
            self.handle.close()
            raise UsageError(f"{self.key}={str(self.path.parent)!r} is not allowed: another jacdistill run "
                             f"(process {owner}) is running in it") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of storage's writes left by a process killed while writing (kill -9 runs no
    clean-up). The directory is this run's alone (DirectoryLock): no other process writes there."""
    for path in [*run_dir.glob(storage.TEMPORARY_PATTERN), *(run_dir / ".hydra").glob(storage.TEMPORARY_PATTERN)]:
        path.unlink(missing_ok=True)


def run_directory() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir).resolve()
