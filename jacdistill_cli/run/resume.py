"""Runs that survive: one run per directory, `last.pt` and `best.pt`, resuming, and signals.

A train run's directory holds one configuration's results. While a run trains, `last.pt` holds
everything the rest of the run depends on: student, optimiser, schedule, the position (epoch,
batches done in it, global step), every random state, the objective's parameters (hint
regressors), the best validation accuracy so far. It is rewritten atomically every epoch (and every
`trainer.save_every_steps` steps), so a run killed at any point and started again with the same
command and directory continues from it and ends with the results of a run never interrupted.

SIGINT, SIGTERM and SIGUSR1 let the step in progress finish, save `last.pt`, and stop the run with
`"status": "interrupted"` in metrics.json and one line on stderr giving the command that resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import OmegaConf

from jacdistill_cli import storage
from jacdistill_cli.errors import ReadError, UsageError
from jacdistill_cli.run.distributed import SINGLE, World, reduce_max

log = logging.getLogger("jacdistill")

LAST, BEST, LOCK = "last.pt", "best.pt", ".run.lock"
FINISHED, INTERRUPTED = "finished", "interrupted"
RESUME_MODES = ("auto", "never")
SELECT_MODES = ("last", "best")
# Settings that cannot change a run's results: a directory's run continues (or is skipped as
# finished) when only these differ. The device is not among them: a GPU's random streams and
# arithmetic differ from a CPU's, so a run moved to another device is another run.
NEUTRAL_KEYS = ("cache_dir", "trainer.resume", "trainer.save_every_steps", "trainer.save_every_epochs",
                "trainer.threads", "trainer.num_workers")
SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}
STATE_VERSION = 2


# ----------------------------------------------------------------------------------------------
# One run per directory


def run_dir_key() -> str:
    """The setting that names a run's directory: hydra.run.dir, or hydra.sweep.dir for a sweep's job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        multirun = False
    return "hydra.sweep.dir" if multirun else "hydra.run.dir"


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


def claim_directory(config: dict[str, Any], run_dir: Path) -> Claim:
    """Refuse a directory holding another configuration's results (one line naming what differs);
    for this configuration's (`config`: the run's, resolved, as plain containers): whether it finished, or a
    last.pt to resume from (`trainer.resume=auto`)."""
    stored_file = run_dir / "config.yaml"
    if stored_file.is_file():
        try:
            stored = OmegaConf.to_container(OmegaConf.load(stored_file), resolve=False)
        except Exception as err:  # noqa: BLE001 - any unreadable config.yaml means the same
            raise UsageError(f"{run_dir_key()}={str(run_dir)!r} is not allowed: its config.yaml cannot be read "
                             f"({type(err).__name__}); give this run a directory of its own") from None
        differ = differences(stored, config)
        if differ:
            more = f"; and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise UsageError(f"{run_dir_key()}={str(run_dir)!r} is not allowed: it holds the results of another "
                             f"configuration ({'; '.join(differ[:3])}{more}); give this run a directory of its own")
    elif any(run_dir.glob("events.out.tfevents.*")) or (run_dir / "metrics.json").is_file():
        raise UsageError(f"{run_dir_key()}={str(run_dir)!r} is not allowed: it holds results without the "
                         "config.yaml that says whose; give this run a directory of its own")
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


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


class DirectoryLock:
    """An exclusive lock on the run directory for this process's lifetime (released by the kernel
    however the process ends): a second run started in the same directory is refused in one line."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.handle: Any = None

    def __enter__(self) -> "DirectoryLock":
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "?"
            self.handle.close()
            raise UsageError(f"{run_dir_key()}={str(self.path.parent)!r} is not allowed: another jacdistill run "
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


# ----------------------------------------------------------------------------------------------
# Random states


def random_states() -> dict[str, Any]:
    """torch (CPU and every CUDA device), python and numpy global random states, weights_only-safe."""
    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------------------------
# Training progress and the checkpointer


@dataclass
class Progress:
    """Where training stands: the next batch is batch `batch` (0-based) of epoch `epoch` (1-based)."""
    epoch: int = 1
    batch: int = 0
    step: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    running: dict[str, float] = field(default_factory=dict)   # the epoch's loss sums, for its log line
    val: dict[str, float] = field(default_factory=dict)       # the last validation metrics
    epoch_start_generator: torch.Tensor | None = None         # the batch generator as the epoch began

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "samples": self.samples,
                "train_seconds": self.train_seconds, "running": dict(self.running), "val": dict(self.val),
                "epoch_start_generator": self.epoch_start_generator}


class Interrupted(BaseException):
    """A signal stopped the run (a BaseException, like KeyboardInterrupt: no `except Exception` takes it)."""

    def __init__(self, signum: int, progress: Progress | None = None, finished: bool = False):
        super().__init__(SIGNALS.get(signum, str(signum)))
        self.signum = signum
        self.progress = progress
        self.finished = finished   # the signal came while the finished run's results were written


class Signals:
    """SIGINT, SIGTERM and SIGUSR1 while a run is in progress. Outside training steps a signal stops
    the run at once (raises Interrupted); while `deferred` it is noted and the training loop stops
    at the next step boundary, after saving last.pt."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.deferred = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending is not None:
            return  # the first signal is being acted on; kill -9 stops at once
        self.pending = signum
        if not self.deferred:
            raise Interrupted(self.pending)

    def __enter__(self) -> "Signals":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may handle signals (a launcher running jobs in threads)
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def deferring(self, raise_pending: bool = True) -> Iterator[None]:
        """Signals are noted, not raised, inside; a pending one is raised on leaving (if asked)."""
        previous, self.deferred = self.deferred, True
        try:
            yield
        finally:
            self.deferred = previous
        if self.pending is not None and not previous and raise_pending:
            raise Interrupted(self.pending)


@dataclass(frozen=True)
class SavePolicy:
    """When last.pt is written: after every `every_epochs`-th epoch and the last (`epochs`), and every
    `every_steps` steps when set; a signal saves at the next step whatever the policy."""

    every_steps: int | None = None
    every_epochs: int = 1
    epochs: int | None = None


class Checkpointer:
    """Saves and restores a run's training in `run_dir/last.pt` (and the best weights in best.pt).

    What it saves is the distiller's state (run/distiller.py: the student and the objective's own
    parameters), the optimiser's and the schedule's; `generators`: the named torch generators the run
    draws from (batch order, the objective's projections and noise); `best_payload`: the student
    checkpoint to keep as best.pt, given its validation metrics.
    """

    def __init__(self, run_dir: Path, policy: SavePolicy, signals: Signals, *,
                 generators: dict[str, torch.Generator], best_payload: Callable[[dict[str, float]], dict[str, Any]],
                 state: dict[str, Any] | None = None, world: World = SINGLE,
                 device: torch.device = torch.device("cpu")):
        self.path = run_dir / LAST
        self.best_path = run_dir / BEST
        self.policy = policy
        self.generators = generators
        self.best_payload = best_payload
        self.signals = signals
        self.best: dict[str, Any] = {"val_accuracy": None, "epoch": None, "step": None}
        self.state = state   # last.pt's content, to continue from
        self.progress = Progress()
        self.world = world   # under torch.distributed every rank restores and stops together; rank 0 writes
        self.device = device   # the training device, where the ranks' pending signals are reduced

    def restore(self, distiller: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any) -> Progress:
        """The progress to continue from: the start, or last.pt's with every state put back."""
        if self.state is None:
            return self.progress
        state = self.state
        try:
            distiller.load_state_dict(model_state(state))
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise UsageError(f"trainer.resume='auto' is not allowed: {self.path} does not fit this run "
                             f"({str(err).splitlines()[0]}); start over with trainer.resume=never") from None
        for name, generator in self.generators.items():
            generator.set_state(state["generators"][name])
        restore_random_states(state["random"])
        self.best = dict(state["best"])
        p = state["progress"]
        self.progress = Progress(epoch=p["epoch"], batch=p["batch"], step=p["step"], samples=p["samples"],
                                 train_seconds=p["train_seconds"], running=dict(p["running"]), val=dict(p["val"]),
                                 epoch_start_generator=p["epoch_start_generator"])
        log.info(f"resuming from {self.path}: epoch {p['epoch']}, {p['batch']} batches into it, step {p['step']}")
        return self.progress

    def save(self, distiller: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any,
             flush: Callable[[], None] = lambda: None) -> None:
        if not self.world.main:
            return
        flush()  # every event up to this step is on disk before last.pt says the run got here
        storage.write_torch(self.path, {
            "format": "jacdistill-state", "version": STATE_VERSION, "progress": self.progress.state(),
            "model": {k: v.detach().cpu() for k, v in distiller.state_dict().items()},
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "generators": {name: g.get_state() for name, g in self.generators.items()},
            "random": random_states(), "best": dict(self.best),
        })

    def saves_after(self, epoch: int) -> bool:
        """Whether last.pt is written when epoch `epoch` (1-based) ends."""
        return epoch % self.policy.every_epochs == 0 or epoch == self.policy.epochs

    def after_step(self, distiller, optimizer, schedule, end_of_epoch: bool,
                   flush: Callable[[], None] = lambda: None) -> None:
        """Save every `every_steps` steps (unless the epoch's end is about to); stop on a pending signal."""
        every = self.policy.every_steps
        due = (every is not None and self.progress.step % every == 0
               and not (end_of_epoch and self.saves_after(self.progress.epoch)))
        pending = self.pending()
        if due or pending is not None:
            self.save(distiller, optimizer, schedule, flush)
        self.check(pending)

    def after_epoch(self, distiller, optimizer, schedule, val: dict[str, float] | None,
                    flush: Callable[[], None] = lambda: None) -> None:
        """Keep best.pt when the validation accuracy improved, then save last.pt (when this epoch saves, or a
        signal is pending)."""
        if val is not None and (self.best["val_accuracy"] is None or val["accuracy"] > self.best["val_accuracy"]):
            if self.world.main:
                storage.write_torch(self.best_path, self.best_payload(val))
            self.best = {"val_accuracy": val["accuracy"], "epoch": self.progress.epoch - 1,
                         "step": self.progress.step}
        pending = self.pending()
        if self.saves_after(self.progress.epoch - 1) or pending is not None:
            self.save(distiller, optimizer, schedule, flush)
        self.check(pending)

    def pending(self) -> int | None:
        """The signal to stop on: this process's, or under torch.distributed any rank's (all stop at the
        same step, so that no rank waits in a collective for the others)."""
        return reduce_max(self.signals.pending or 0, self.world, self.device) or None

    def check(self, pending: int | None) -> None:
        if pending is not None:
            raise Interrupted(pending, self.progress)


def model_state(state: dict[str, Any]) -> dict[str, Any]:
    """The distiller's state_dict in last.pt; the first layout (version 1) kept the student's and the hint
    regressors' apart."""
    if "model" in state:
        return state["model"]
    features = state.get("modules", {}).get("features", {})
    return {**{f"student.{k}": v for k, v in state["student"].items()},
            **{f"matching.{k}": v for k, v in features.items()}}


def load_best(path: Path, distiller: Any) -> dict[str, Any]:
    """Put best.pt's weights (the student's and the hint regressors') into the distiller; returns its payload."""
    payload = storage.load_torch(path)
    distiller.student.load_state_dict(payload["state_dict"])
    distiller.load_checkpoint_entries(payload)
    return payload


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = storage.load_torch(path)
    except ReadError as err:   # a file that does not load is one the run cannot continue from
        raise UsageError(f"trainer.resume='auto' is not allowed: {path} cannot be read ({err.reason}); "
                         "start over with trainer.resume=never") from None
    if not isinstance(state, dict) or state.get("format") != "jacdistill-state":
        raise UsageError(f"trainer.resume='auto' is not allowed: {path} is not a jacdistill training state; "
                         "start over with trainer.resume=never")
    return state


# ----------------------------------------------------------------------------------------------
# After a signal


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run: the same overrides plus its directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # The whole sweep again, in the same sweep directory: finished jobs are skipped.
        args = [a for a in sys.argv[1:] if not a.startswith(("hydra.sweep.dir=", "hydra.run.dir="))]
        sweep_dir = Path(str(hydra_cfg.sweep.dir)).resolve()
        multirun = [] if {"-m", "--multirun"} & set(args) else ["-m"]
        return shlex.join(["jacdistill", "train", *multirun, *args, f"hydra.sweep.dir={sweep_dir}"])
    overrides = [o for o in [*hydra_cfg.overrides.hydra, *hydra_cfg.overrides.task]
                 if not o.startswith(("hydra.run.dir=", "hydra.mode="))]
    return shlex.join(["jacdistill", "train", *overrides, f"hydra.run.dir={run_dir}"])


def requeue_under_slurm() -> str | None:
    """`scontrol requeue $SLURM_JOB_ID` when SLURM_JOB_ID is set; a warning when that fails."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    if shutil.which("scontrol") is None:
        return f"SLURM_JOB_ID={job} is set but scontrol is not on PATH: the job is not requeued"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()
        return f"scontrol requeue {job} failed: {reason[-1] if reason else f'exit status {result.returncode}'}"
    log.info(f"SLURM job {job} requeued")
    return None


def drop_session_end(run_dir: Path) -> None:
    """Remove an earlier hparams session end (an interrupted run's) from the run's event files.

    TensorBoard takes a tag's first summary metadata, so the status of an interrupted session would
    stay `failure` after the resumed run finishes; each file keeps every other record as it was.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.hparams.metadata import SESSION_END_INFO_TAG
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in records
                if not any(v.tag == SESSION_END_INFO_TAG for v in Event.FromString(r).summary.value)]
        if len(kept) == len(records):
            continue
        buffer = io.BytesIO()
        writer = RecordWriter(buffer)
        for record in kept:
            writer.write(record)
        storage.write_bytes(path, buffer.getbuffer())
