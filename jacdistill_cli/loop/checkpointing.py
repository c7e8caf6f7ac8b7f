"""The loop's progress and the Checkpointer that saves it in last.pt and best.pt."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from jacdistill_cli import storage
from jacdistill_cli.errors import UsageError
from jacdistill_cli.loop.distributed import SINGLE, World, reduce_max
from jacdistill_cli.records.directory import LAST
from jacdistill_cli.records.signals import Interrupted, Signals
from jacdistill_cli.records.state import STATE_VERSION, model_state, random_states, restore_random_states

log = logging.getLogger("jacdistill")
BEST = "best.pt"

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
