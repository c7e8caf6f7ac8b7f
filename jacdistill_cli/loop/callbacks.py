"""What the Trainer calls around its loop: each concern of a run besides the step itself is a callback.

    fitting(trainer)                    a context held for the whole fit (signals deferred to step boundaries)
    on_fit_start(trainer)               before the first epoch (a checkpoint restores the progress here)
    on_epoch_start(trainer, epoch)
    on_step_end(trainer, values)        after each optimiser step; values: {term: value of the global batch}
    on_train_epoch_end(trainer, epoch)  after the epoch's last step, before its evaluation
    on_evaluation_end(trainer, val)     after each validation pass; val: {metric: value}
    on_epoch_end(trainer, epoch, val)   the epoch done and counted (val None when it was not evaluated)
    on_fit_end(trainer)

Callbacks run in the order given; the order matters where one can stop the run: divergence is checked
before anything is logged or saved, the checkpoint (which stops on a signal) comes last.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from torch import Tensor

from jacdistill_cli.loop.checkpointing import Checkpointer
from jacdistill_cli.loop.logger import RunLogger

if TYPE_CHECKING:
    from jacdistill_cli.loop.trainer import Trainer

log = logging.getLogger("jacdistill")


class Callback:
    """Every hook does nothing; a callback overrides the ones it needs."""

    def fitting(self, trainer: "Trainer") -> ContextManager[Any]:
        return contextlib.nullcontext()

    def on_fit_start(self, trainer: "Trainer") -> None:
        pass

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def on_step_end(self, trainer: "Trainer", values: dict[str, float]) -> None:
        pass

    def on_train_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def on_evaluation_end(self, trainer: "Trainer", val: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", epoch: int, val: dict[str, float] | None) -> None:
        pass

    def on_fit_end(self, trainer: "Trainer") -> None:
        pass


class Diverged(Exception):
    """The total loss became non-finite: training cannot go on from these weights."""

    def __init__(self, value: float, step: int, epoch: int, prefix: str = ""):
        self.value, self.step, self.epoch = value, step, epoch
        super().__init__(f"{prefix}loss/total is {value} at step {step} (epoch {epoch}): training diverged; "
                         "lower optim.lr, or the weights of the terms (alpha, hard_weight)")


class Divergence(Callback):
    """Stops the run at the first non-finite total (the global batch's, so every rank stops at the same
    step). Under float16 the GradScaler skips such steps by design and lowers its scale: not a divergence."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def on_step_end(self, trainer: "Trainer", values: dict[str, float]) -> None:
        if not math.isfinite(values["total"]) and not trainer.scaler.is_enabled():
            raise Diverged(values["total"], trainer.progress.step, trainer.progress.epoch, self.prefix)


# Custom-scalars layout: one chart per loss term the run logs and per validation metric, each drawn with
# every run of the sweep (TensorBoard merges the runs' layouts, so a term no run logs gets no chart).
VAL_METRICS = ("accuracy", "agreement", "jacobian_cosine")


def charts(terms: list[str]) -> dict[str, dict[str, list[str]]]:
    """The layout for a run whose objective returns `terms` (total first)."""
    ordered = sorted(terms, key=lambda term: term != "total")
    return {"loss terms (per step)": {f"loss/{term}": [f"^loss/{term}$"] for term in ordered},
            "validation (per evaluation)": {f"val/{name}": [f"^val/{name}$"] for name in VAL_METRICS}}


class TensorBoard(Callback):
    """Every loss term per step (`{prefix}loss/<term>`) and the validation metrics per evaluation
    (`{prefix}val/<metric>`); with `layout`, the custom-scalars layout once the first step shows the terms."""

    def __init__(self, logger: RunLogger, prefix: str = "", layout: bool = False):
        self.logger, self.prefix, self.layout = logger, prefix, layout

    def on_step_end(self, trainer: "Trainer", values: dict[str, float]) -> None:
        if self.layout:
            self.logger.layout(charts(list(values)))
            self.layout = False
        self.logger.scalars({f"{self.prefix}loss/{name}": v for name, v in values.items()}, trainer.progress.step)

    def on_evaluation_end(self, trainer: "Trainer", val: dict[str, float]) -> None:
        self.logger.scalars({f"{self.prefix}val/{name}": v for name, v in val.items()}, trainer.progress.step)


class TeacherLevel(Callback):
    """`teacher/test_accuracy` at the first and the last step: a level line to read the student's curves
    against (the first point only when the run starts, not when it continues)."""

    def __init__(self, logger: RunLogger, accuracy: float, continued: bool = False):
        self.logger, self.accuracy, self.continued = logger, accuracy, continued

    def on_fit_start(self, trainer: "Trainer") -> None:
        if not self.continued:
            self.logger.scalars({"teacher/test_accuracy": self.accuracy}, 0)

    def on_fit_end(self, trainer: "Trainer") -> None:
        self.logger.scalars({"teacher/test_accuracy": self.accuracy}, trainer.progress.step)


class Saliency(Callback):
    """At each evaluation, the input-gradients of fixed validation inputs for teacher and student, side by
    side (run/saliency.py), drawn as `mode` (abs or signed)."""

    def __init__(self, logger: RunLogger, inputs: Tensor, mode: str = "abs"):
        self.logger, self.inputs, self.mode = logger, inputs, mode

    def on_evaluation_end(self, trainer: "Trainer", val: dict[str, float]) -> None:
        from jacdistill_cli.loop.saliency import saliency_image

        distiller = trainer.distiller
        if trainer.world.main and distiller.teacher is not None:
            self.logger.image("saliency/input_teacher_student",
                              saliency_image(distiller.student, distiller.teacher, self.inputs, self.mode),
                              trainer.progress.step)


class Checkpointing(Callback):
    """last.pt and best.pt through resume.Checkpointer: restores the progress when the run continues, saves
    on its policy, keeps the best weights, and stops at a step boundary when a signal arrives (signals are
    deferred for the whole fit)."""

    def __init__(self, checkpointer: Checkpointer, flush: Callable[[], None] = lambda: None):
        self.checkpointer, self.flush = checkpointer, flush

    def fitting(self, trainer: "Trainer") -> ContextManager[Any]:
        return self.checkpointer.signals.deferring()

    def on_fit_start(self, trainer: "Trainer") -> None:
        trainer.progress = self.checkpointer.restore(trainer.distiller, trainer.optimizer, trainer.schedule)

    def on_step_end(self, trainer: "Trainer", values: dict[str, float]) -> None:
        end_of_epoch = trainer.progress.batch == trainer.batches_per_epoch
        self.checkpointer.after_step(trainer.distiller, trainer.optimizer, trainer.schedule, end_of_epoch, self.flush)

    def on_epoch_end(self, trainer: "Trainer", epoch: int, val: dict[str, float] | None) -> None:
        self.checkpointer.after_epoch(trainer.distiller, trainer.optimizer, trainer.schedule, val, self.flush)


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
    """One tqdm bar per epoch on stderr with the running means of the loss terms (rank 0 only)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.bar: Any = None

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        from tqdm import tqdm

        self.desc = f"{self.prefix}epoch {epoch}/{trainer.loop.epochs}"
        self.bar = tqdm(total=trainer.batches_per_epoch, initial=trainer.progress.batch, desc=self.desc, leave=False,
                        disable=not trainer.world.main, file=sys.stderr, dynamic_ncols=True, bar_format=BAR_FORMAT)

    def on_step_end(self, trainer: "Trainer", values: dict[str, float]) -> None:
        self.bar.update()
        if self.bar.n:
            room = progress_room(self.desc, trainer.batches_per_epoch)
            means = {name: v / self.bar.n for name, v in trainer.progress.running.items()}
            self.bar.set_postfix_str(progress_postfix(means, room), refresh=False)

    def on_train_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        self.bar.refresh()  # the epoch's final counts and running means, however fast it ran
        self.bar.close()
