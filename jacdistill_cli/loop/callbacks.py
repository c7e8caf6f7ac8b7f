"""What the Trainer calls around its loop: each concern of a run besides the step itself is a callback.

    fitting(trainer)                    a context held for the whole fit (signals deferred to step boundaries)
    on_fit_start(trainer)               before the first epoch (or the first continued one)
    on_epoch_start(trainer, epoch)
    on_step_end(trainer)                after each optimiser step (no loss value: the step is not read)
    on_log(trainer, values)             each time the loss terms are read: {term: mean over the steps since
                                        the previous read, of the global batch}
    on_train_epoch_end(trainer, epoch)  after the epoch's last step, before its evaluation
    on_evaluation_end(trainer, val)     after each validation pass; val: {metric: value}
    on_epoch_end(trainer, epoch, val)   the epoch done and counted (val None when it was not evaluated)
    on_fit_end(trainer)
    on_exception(trainer, error)        the fit stopped by an exception (a signal, a divergence, a failure)

A callback with state keeps it through `state_dict()` / `load_state_dict()` (saved in last.pt under its
`state_key`, restored by the Trainer when the run continues). Callbacks run in the order given; the
checkpoint (which stops the run on a signal) comes last.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from torch import Tensor

from jacdistill_cli import storage
from jacdistill_cli.loop.distributed import reduce_max
from jacdistill_cli.loop.logger import RunLogger
from jacdistill_cli.records.directory import BEST, LAST
from jacdistill_cli.records.signals import Interrupted, Signals
from jacdistill_cli.records.state import write_state

if TYPE_CHECKING:
    from jacdistill_cli.loop.trainer import Trainer

log = logging.getLogger("jacdistill")


class Callback:
    """Every hook does nothing; a callback overrides the ones it needs."""

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any] | None:
        """This callback's state to keep in last.pt (None: it has none)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """The state it kept, when the run continues (None: the saved run had none for it)."""

    def fitting(self, trainer: "Trainer") -> ContextManager[Any]:
        return contextlib.nullcontext()

    def on_fit_start(self, trainer: "Trainer") -> None:
        pass

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def on_step_end(self, trainer: "Trainer") -> None:
        pass

    def on_log(self, trainer: "Trainer", values: dict[str, float]) -> None:
        pass

    def on_train_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def on_evaluation_end(self, trainer: "Trainer", val: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", epoch: int, val: dict[str, float] | None) -> None:
        pass

    def on_fit_end(self, trainer: "Trainer") -> None:
        pass

    def on_exception(self, trainer: "Trainer", error: BaseException) -> None:
        pass


def charts(terms: list[str], val_metrics: tuple[str, ...]) -> dict[str, dict[str, list[str]]]:
    """The custom-scalars layout for a run whose objective returns `terms` (total first): one chart per loss
    term and per validation metric, each drawn with every run of the sweep (TensorBoard merges the runs'
    layouts, so a term no run logs gets no chart)."""
    ordered = sorted(terms, key=lambda term: term != "total")
    return {"loss terms (per step)": {f"loss/{term}": [f"^loss/{term}$"] for term in ordered},
            "validation (per evaluation)": {f"val/{name}": [f"^val/{name}$"] for name in val_metrics}}


class TensorBoard(Callback):
    """Every loss term at each read (`{prefix}loss/<term>`: the mean since the previous read) and the
    validation metrics per evaluation (`{prefix}val/<metric>`); with `layout`, the custom-scalars layout once
    the first read shows the terms."""

    def __init__(self, logger: RunLogger, prefix: str = "", layout: bool = False):
        self.logger, self.prefix, self.layout = logger, prefix, layout

    def on_log(self, trainer: "Trainer", values: dict[str, float]) -> None:
        if self.layout:
            from jacdistill_cli.loop.evaluation import METRICS

            self.logger.layout(charts(list(values), METRICS))
            self.layout = False
        self.logger.scalars({f"{self.prefix}loss/{name}": v for name, v in values.items()}, trainer.progress.step)

    def on_evaluation_end(self, trainer: "Trainer", val: dict[str, float]) -> None:
        self.logger.scalars({f"{self.prefix}val/{name}": v for name, v in val.items()}, trainer.progress.step)


class TeacherLevel(Callback):
    """`teacher/test_accuracy` at the first and the last step: a level line to read the student's curves
    against (the first point once: a continued run has it already)."""

    def __init__(self, logger: RunLogger, accuracy: float):
        self.logger, self.accuracy, self.started = logger, accuracy, False

    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.started = bool(state and state.get("started"))

    def on_fit_start(self, trainer: "Trainer") -> None:
        if not self.started:
            self.logger.scalars({"teacher/test_accuracy": self.accuracy}, 0)
            self.started = True

    def on_fit_end(self, trainer: "Trainer") -> None:
        self.logger.scalars({"teacher/test_accuracy": self.accuracy}, trainer.progress.step)


class Saliency(Callback):
    """At each evaluation, the input-gradients of fixed validation inputs for teacher and student, side by
    side (loop/saliency.py), drawn as `mode` (abs or signed)."""

    def __init__(self, logger: RunLogger, inputs: Tensor, mode: str = "abs"):
        self.logger, self.inputs, self.mode = logger, inputs, mode

    def on_evaluation_end(self, trainer: "Trainer", val: dict[str, float]) -> None:
        from jacdistill_cli.loop.saliency import saliency_image

        distiller = trainer.distiller
        if trainer.world.main and distiller.teacher is not None:
            self.logger.image("saliency/input_teacher_student",
                              saliency_image(distiller.student, distiller.teacher, self.inputs, self.mode),
                              trainer.progress.step)


@dataclass(frozen=True)
class SavePolicy:
    """When last.pt is written: after every `every_epochs`-th epoch and the last (`epochs`), and every
    `every_steps` steps when set; a signal saves at the next step whatever the policy."""

    every_steps: int | None = None
    every_epochs: int = 1
    epochs: int | None = None

    def saves_after(self, epoch: int) -> bool:
        """Whether last.pt is written when epoch `epoch` (1-based) ends."""
        return epoch % self.every_epochs == 0 or epoch == self.epochs


class Checkpointing(Callback):
    """last.pt (the Trainer's state_dict) and best.pt: saved after every `every_epochs`-th epoch and the last,
    every `every_steps` steps when set, and at the step a signal arrives, after which the run stops there
    (signals are deferred for the whole fit). The loss terms are read before each save, so a non-finite
    total stops the run before its weights are saved. best.pt holds `best_payload(val)` of the best
    validation accuracy so far. Under torch.distributed every rank stops at the same step (the ranks'
    signals are reduced at each read of the terms and at each epoch's end); rank 0 writes."""

    def __init__(self, run_dir: Path, policy: SavePolicy, signals: Signals,
                 best_payload: Callable[[dict[str, float]], dict[str, Any]], flush: Callable[[], None] = lambda: None):
        self.path, self.best_path = Path(run_dir) / LAST, Path(run_dir) / BEST
        self.policy, self.signals, self.best_payload, self.flush = policy, signals, best_payload, flush
        self.best: dict[str, Any] = {"val_accuracy": None, "epoch": None, "step": None}

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.best = dict(state["best"])

    def fitting(self, trainer: "Trainer") -> ContextManager[Any]:
        return self.signals.deferring()

    def on_step_end(self, trainer: "Trainer") -> None:
        at, every = trainer.progress, self.policy.every_steps
        end_of_epoch = at.batch == trainer.batches_per_epoch
        due = every is not None and at.step % every == 0 and not (end_of_epoch and self.policy.saves_after(at.epoch))
        pending = self.pending(trainer, at.step % trainer.loop.log_every_steps == 0)
        if due or pending is not None:
            self.save(trainer)
        if pending is not None:
            raise Interrupted(pending, trainer.progress.epoch, trainer.progress.step)

    def on_epoch_end(self, trainer: "Trainer", epoch: int, val: dict[str, float] | None) -> None:
        """Keep best.pt when the validation accuracy improved, then save last.pt when this epoch saves (or a
        signal is pending)."""
        if val is not None and (self.best["val_accuracy"] is None or val["accuracy"] > self.best["val_accuracy"]):
            if trainer.world.main:
                storage.write_torch(self.best_path, self.best_payload(val))
            self.best = {"val_accuracy": val["accuracy"], "epoch": epoch, "step": trainer.progress.step}
        pending = self.pending(trainer, True)
        if self.policy.saves_after(epoch) or pending is not None:
            self.save(trainer)
        if pending is not None:
            raise Interrupted(pending, trainer.progress.epoch, trainer.progress.step)

    def pending(self, trainer: "Trainer", collective: bool) -> int | None:
        """The signal to stop on: this process's; under torch.distributed any rank's, asked of all ranks
        together where they all read (so that no rank waits in a collective for the others)."""
        if not trainer.world.distributed:
            return self.signals.pending
        if not collective:
            return None
        return reduce_max(self.signals.pending or 0, trainer.world, trainer.device) or None

    def save(self, trainer: "Trainer") -> None:
        trainer.flush()   # read first: a non-finite total stops the run here, before its weights are saved
        state = trainer.state_dict()
        if trainer.world.main:
            self.flush()  # every event up to this step is on disk before last.pt says the run got here
            write_state(self.path, state)


# The progress bar: "epoch 3/20  45%|████     | 8/17 00:01, total 0.8490  distill 0.0230  jacobian 1.0556",
# the loss terms' running means shortened (names, then digits) until the line fits the terminal.
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {remaining}{postfix}"
SHORT_NAMES = {"total": "tot", "distill": "dist", "jacobian": "jac", "features": "feat"}
MIN_BAR = 5  # characters of the bar itself that the line keeps


def progress_postfix(means: dict[str, float], room: int) -> str:
    """The running means as `total 0.8490  distill 0.0230 ...` (total first), shortened to fit in `room`
    characters: full names with 4 decimals, short names (tot, dist, jac, feat), then 3 and 2 decimals."""
    ordered = sorted(means.items(), key=lambda item: item[0] != "total")
    text = ""
    for short, digits in ((False, 4), (True, 4), (True, 3), (True, 2)):
        text = "  ".join(f"{SHORT_NAMES.get(n, n) if short else n} {v:.{digits}f}" for n, v in ordered)
        if len(text) <= room:
            break
    return text


def progress_room(desc: str, total: int, file=None) -> int:
    """Characters left for the loss terms on a BAR_FORMAT line as wide as the terminal of `file` (default
    stderr; COLUMNS or 80 when it is none), less what tqdm puts before them (`, `) and the last column,
    which tqdm keeps free. The rest of a line too long for the terminal is cut by tqdm: it never wraps."""
    import os
    import shutil

    try:
        columns = os.get_terminal_size((file or sys.stderr).fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = shutil.get_terminal_size((80, 24)).columns
    return columns - 1 - len(f"{desc} 100%|{' ' * MIN_BAR}| {total}/{total} 00:00, ")


def interactive() -> bool:
    """Progress bars only when a person watches: stderr is a terminal."""
    return sys.stderr.isatty()


class ProgressBar(Callback):
    """One tqdm bar per epoch on stderr with the running means of the loss terms at each read (rank 0 only)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.bar: Any = None

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        from tqdm import tqdm

        self.desc = f"{self.prefix}epoch {epoch}/{trainer.loop.epochs}"
        self.bar = tqdm(total=trainer.batches_per_epoch, initial=trainer.progress.batch, desc=self.desc, leave=False,
                        disable=not trainer.world.main, file=sys.stderr, dynamic_ncols=True, bar_format=BAR_FORMAT)

    def on_step_end(self, trainer: "Trainer") -> None:
        self.bar.update()

    def on_log(self, trainer: "Trainer", values: dict[str, float]) -> None:
        if self.bar is not None and trainer.progress.batch:
            room = progress_room(self.desc, trainer.batches_per_epoch)
            means = {name: v / trainer.progress.batch for name, v in trainer.progress.running.items()}
            self.bar.set_postfix_str(progress_postfix(means, room), refresh=False)

    def on_train_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        self.bar.refresh()  # the epoch's final counts and running means, however fast it ran
        self.close()

    def on_exception(self, trainer: "Trainer", error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
