"""The training loop (`Trainer`): objective, backward, step, evaluate; the rest of a run is callbacks.

The Trainer owns the loop's state: its progress, the optimiser and schedule, the random generators of what it
runs (the batch order is its own; the objective's are the distiller's), and its callbacks' states
(`state_dict()` / `load_state_dict()`, as Lightning's). `fit(distiller, data, state)` continues from a
`state_dict()` when one is given.

A step never waits for the host: the loss terms are summed on the device (`Window`) and read every
`log_every_steps` steps, at each epoch's end, before each save and on a signal (`flush`); what is logged at a
step is the mean over the steps since the previous read. The total's finiteness is read at the same moments:
a non-finite total stops the run (`Diverged`, naming the step where it first appeared) before anything is
logged or saved from it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from jacdistill_cli.errors import Diverged, UsageError
from jacdistill_cli.loop.callbacks import Callback
from jacdistill_cli.loop.distiller import Distiller
from jacdistill_cli.loop.distributed import SINGLE, World, gather_rows, shard
from jacdistill_cli.loop.evaluation import evaluate
from jacdistill_cli.loop.precision import Precision
from jacdistill_cli.records.state import random_states, restore_random_states
from jacdistill_cli.spec.run import LoopSpec, OptimSpec
from jacdistill_cli.zoo.data import DataBundle, batches

log = logging.getLogger("jacdistill")


def make_optimizer(params, optim: OptimSpec, epochs: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimiser of the `optim` spec (its target called with the parameters), with a per-epoch cosine,
    constant or multi-step schedule."""
    optimizer = optim.build(params)
    if optim.schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    elif optim.schedule == "multistep":
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(optim.milestones),
                                                        gamma=optim.gamma)
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    return optimizer, schedule


@dataclass
class Progress:
    """Where training stands: the next batch is batch `batch` (0-based) of epoch `epoch` (1-based)."""

    epoch: int = 1
    batch: int = 0
    step: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    running: dict[str, float] = field(default_factory=dict)   # the epoch's loss sums so far, for its log line
    val: dict[str, float] = field(default_factory=dict)       # the last validation metrics
    epoch_start_generator: Tensor | None = None               # the batch generator as the epoch began

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "samples": self.samples,
                "train_seconds": self.train_seconds, "running": dict(self.running), "val": dict(self.val),
                "epoch_start_generator": self.epoch_start_generator}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Progress":
        return cls(**{**state, "running": dict(state["running"]), "val": dict(state["val"])})


class Window:
    """The loss terms of the steps since the last read, summed on the device, and the first step whose total
    was not finite (with its value)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.clear()

    def clear(self) -> None:
        self.names: list[str] = []
        self.sums: Tensor | None = None
        self.steps = 0
        self.bad_step = torch.full((), -1.0, dtype=torch.float64, device=self.device)
        self.bad_value = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, terms: dict[str, Tensor], share: float, step: int, check_finite: bool) -> None:
        self.names = list(terms)
        values = torch.stack([terms[name].detach().to(torch.float64) for name in self.names]) * share
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1
        if check_finite:
            total = values[self.names.index("total")]
            first = ~torch.isfinite(total) & (self.bad_step < 0)
            self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)
            self.bad_value = torch.where(first, total, self.bad_value)

    def read(self, world: World) -> tuple[dict[str, float], int | None, float]:
        """(each term's sum over the window, of the global batch), the first non-finite step or None, and the
        total there; one read of the device (one gather under torch.distributed)."""
        rows = gather_rows(torch.cat([self.sums, self.bad_step.view(1), self.bad_value.view(1)]), world).tolist()
        sums = [sum(row[i] for row in rows) for i in range(len(self.names))]
        bad = [(row[-2], row[-1]) for row in rows if row[-2] >= 0]
        step, value = min(bad) if bad else (None, math.nan)
        return dict(zip(self.names, sums)), None if step is None else int(step), value


class Trainer:
    """The loop: steps, epochs, evaluation, precision and the process group; everything else a run does
    around it (checkpoints, signals, TensorBoard, saliency, the progress bar) is a callback
    (loop/callbacks.py).

    `fit(distiller, data, state=None)` trains the distiller (loop/distiller.py) on data.train and returns the
    last validation metrics with steps, epochs, train_seconds and samples_per_second. The batch order and
    augmentation are drawn from the Trainer's generator (seeded by `seed`): the one stream a resumed epoch
    replays (the batches before the saved position are drawn again, not trained on). Under
    torch.distributed (`world`) each rank steps on its shard of every batch and the logged terms are those
    of the global batch; `precision` runs the objective under autocast (and a GradScaler for float16)."""

    def __init__(self, loop: LoopSpec, optim: OptimSpec, device: torch.device, *, world: World = SINGLE,
                 precision: Precision | None = None, callbacks: Iterable[Callback] = (), prefix: str = "",
                 seed: int = 0):
        self.loop, self.optim, self.device, self.world = loop, optim, device, world
        self.precision = precision or Precision("32", device.type)
        self.callbacks = list(callbacks)
        self.prefix = prefix   # of the epoch log lines and the divergence message ("teacher/" while a teacher trains)
        self.scaler = self.precision.scaler()
        self.progress = Progress()
        self.batches = torch.Generator().manual_seed(seed)
        self.window = Window(device)

    def emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ---------------------------------------------------------------------------- state

    def generators(self) -> dict[str, torch.Generator]:
        """Every random generator the loop draws from, by the name its owner registered it under."""
        return {"batches": self.batches, **self.distiller.generators()}

    def state_dict(self) -> dict[str, Any]:
        """Everything the rest of the run depends on; the window is read (empty) first."""
        return {"progress": self.progress.state_dict(),
                "model": {k: v.detach().cpu() for k, v in self.distiller.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "generators": {name: g.get_state() for name, g in self.generators().items()},
                "random": random_states(),
                "callbacks": {c.state_key: c.state_dict() for c in self.callbacks if c.state_dict() is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.distiller.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            for name, generator in self.generators().items():
                generator.set_state(state["generators"][name])
            progress = Progress.from_state(state["progress"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            source = state.get("source", "the saved state")
            raise UsageError(f"trainer.resume='auto' is not allowed: {source} does not fit this run "
                             f"({str(err).splitlines()[0]}); start over with trainer.resume=never") from None
        restore_random_states(state["random"])
        for callback in self.callbacks:
            callback.load_state_dict(state.get("callbacks", {}).get(callback.state_key))
        self.progress = progress
        p = self.progress
        log.info(f"resuming from {state.get('source', 'a saved state')}: epoch {p.epoch}, {p.batch} batches into "
                 f"it, step {p.step}")

    # ---------------------------------------------------------------------------- the loop

    def fit(self, distiller: Distiller, data: DataBundle, state: dict[str, Any] | None = None) -> dict[str, Any]:
        self.distiller, self.data = distiller, data
        self.optimizer, self.schedule = make_optimizer(list(distiller.parameters()), self.optim, self.loop.epochs)
        self.batches_per_epoch = max(1, math.ceil(len(data.train) / self.loop.batch_size))
        if state is not None:
            self.load_state_dict(state)
        try:
            with contextlib.ExitStack() as stack:
                for callback in self.callbacks:
                    stack.enter_context(callback.fitting(self))
                self.emit("on_fit_start")
                for epoch in range(self.progress.epoch, self.loop.epochs + 1):
                    self.train_epoch(epoch)
                    self.end_epoch(epoch)
                self.emit("on_fit_end")
        except BaseException as err:
            self.emit("on_exception", err)
            raise
        at = self.progress
        return {**at.val, "steps": at.step, "epochs": self.loop.epochs, "train_seconds": at.train_seconds,
                "samples_per_second": at.samples / max(at.train_seconds, 1e-9)}

    def train_epoch(self, epoch: int) -> None:
        at = self.progress
        self.distiller.train()
        started = time.perf_counter()
        skip = at.batch
        if skip and at.epoch_start_generator is not None:
            self.batches.set_state(at.epoch_start_generator)  # replays the epoch's order up to the position
        else:
            at.running = {}
        at.epoch_start_generator = self.batches.get_state()
        self.emit("on_epoch_start", epoch)
        for index, (inputs, labels, *samples) in enumerate(batches(
                self.data.train, self.loop.batch_size, True, self.batches, self.device, self.loop.num_workers,
                indices=self.distiller.reads_indices)):
            if index < skip:
                continue
            global_size = self.step(inputs, labels, samples)
            at.step, at.batch, at.samples = at.step + 1, index + 1, at.samples + global_size
            at.train_seconds += time.perf_counter() - started
            if at.step % self.loop.log_every_steps == 0:
                self.flush()
            self.emit("on_step_end")
            started = time.perf_counter()
        self.flush()
        self.emit("on_train_epoch_end", epoch)
        self.schedule.step()
        at.train_seconds += time.perf_counter() - started

    def step(self, inputs: Tensor, labels: Tensor, samples: list[Tensor]) -> int:
        """One optimiser step on this rank's shard of the batch; returns the global batch's size."""
        global_size = len(labels)
        inputs, labels, *samples = shard(inputs, labels, *samples, world=self.world)
        options: dict[str, Any] = {"epoch": self.progress.epoch}   # a loss with a warm-up reads it (DKD)
        if self.scaler.is_enabled():
            options["gradient_scale"] = self.scaler._get_scale_async()   # a tensor: no read of its value
        with self.precision.autocast():
            _, terms = self.distiller(inputs, labels, samples[0] if samples else None, **options)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients: weighting by the shard's share makes it the global batch's.
        share = len(labels) / global_size
        total = terms["total"] * (share * self.world.size) if self.world.distributed else terms["total"]
        self.scaler.scale(total).backward()
        self.distiller.after_backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # Under float16 the GradScaler skips a step whose gradients overflow, by design: not a divergence.
        self.window.add(terms, share, self.progress.step + 1, check_finite=not self.scaler.is_enabled())
        return global_size

    def flush(self) -> None:
        """Read the window: stop at a non-finite total, else log its means (`on_log`) and count them into the
        epoch's sums. Nothing to read: nothing done."""
        if self.window.steps == 0:
            return
        sums, bad_step, bad_value = self.window.read(self.world)
        steps = self.window.steps
        self.window.clear()
        if bad_step is not None:
            raise Diverged(bad_value, bad_step, self.progress.epoch, self.prefix)
        at = self.progress
        for name, value in sums.items():
            at.running[name] = at.running.get(name, 0.0) + value
        self.emit("on_log", {name: value / steps for name, value in sums.items()})

    def end_epoch(self, epoch: int) -> None:
        """Evaluate when due (every `eval_every` epochs and after the last), log the epoch's line, count it."""
        at = self.progress
        summary = "  ".join(f"{name} {v / self.batches_per_epoch:.4f}" for name, v in at.running.items())
        val = None
        if epoch % self.loop.eval_every == 0 or epoch == self.loop.epochs:
            val = at.val = evaluate(self.distiller.student, self.distiller.teacher, self.data.val,
                                    self.loop.eval_batch_size, self.device, self.world)
            self.emit("on_evaluation_end", val)
            summary += "  " + "  ".join(f"val_{name} {v:.4f}" for name, v in val.items())
        log.info(f"{self.prefix}epoch {epoch}/{self.loop.epochs}  {summary}")
        at.epoch, at.batch = epoch + 1, 0
        at.epoch_start_generator = self.batches.get_state()
        self.emit("on_epoch_end", epoch, val)
