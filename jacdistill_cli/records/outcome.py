"""How a train run ends when it does not finish, recorded in one place: a signal (metrics.json says
interrupted, one line says how to resume, SLURM's SIGUSR1 requeues, exit status 128 + the signal's number), a
divergence (metrics.json says diverged, one line, exit status 1; a job of a sweep ends alone) and a refusal
after the directory was claimed (metrics.json says refused, with the reason, for `report`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
from dataclasses import dataclass
from typing import Iterator

from jacdistill_cli.errors import Diverged, UsageError
from jacdistill_cli.records.directory import LAST, RunPlace, read_metrics
from jacdistill_cli.records.resume import requeue_under_slurm
from jacdistill_cli.records.signals import SIGNALS, Interrupted
from jacdistill_cli.records.status import DIVERGED, INTERRUPTED, REFUSED
from jacdistill_cli.storage import write_json

log = logging.getLogger("jacdistill")


@dataclass
class Ended:
    """What a run that ended without finishing returns to Hydra: a sweep's diverged job gives NaN."""

    result: float = math.nan
    claimed: bool = False   # this process claimed the run directory (a refusal after that is recorded there)


def record_divergence(place: RunPlace, err: Diverged) -> None:
    write_json(place.run_dir / "metrics.json", {"status": DIVERGED, "step": err.step, "epoch": err.epoch,
                                                "loss_total": str(err.value), "error": str(err)})


def record_interruption(place: RunPlace, stop: Interrupted, launch: str | None = None) -> None:
    """metrics.json of an interrupted run (unless it finished, or its directory was never claimed); `launch`
    names the launch of trainer.devices=N whose workers were stopped, so that its launching process knows."""
    if stop.finished or not (place.run_dir / "config.yaml").is_file():
        return
    saved = (place.run_dir / LAST).is_file()
    write_json(place.run_dir / "metrics.json", {
        "status": INTERRUPTED, "signal": SIGNALS.get(stop.signum, str(stop.signum)), "epoch": stop.epoch,
        "step": stop.step, "last_checkpoint": str(place.run_dir / LAST) if saved else None,
        "resume": place.command, "launch": launch})


def interruption_recorded(place: RunPlace, launch: str) -> bool:
    """Whether a worker of this launch recorded an interruption of the run."""
    metrics = read_metrics(place.run_dir) or {}
    return metrics.get("status") == INTERRUPTED and metrics.get("launch") == launch


def interruption_line(place: RunPlace, stop: Interrupted) -> str:
    name = SIGNALS.get(stop.signum, str(stop.signum))
    if stop.finished:
        return f"stopped by {name} after the run finished; its results are in {place.run_dir}"
    if stop.step is not None:
        where = f"at epoch {stop.epoch}, step {stop.step}"
    else:
        where = "before the student's first epoch" + (" (while the teacher trained)" if stop.teacher else "")
    saved = " (last.pt saved)" if (place.run_dir / LAST).is_file() else ""
    return f"interrupted by {name} {where}{saved}; resume with: {place.command}"


@contextlib.contextmanager
def outcome(place: RunPlace, main: bool) -> Iterator[Ended]:
    """The run's end, whatever it is: a signal, a divergence or a refusal in the block is recorded (by rank 0,
    unless the error is marked `recorded`: the workers of trainer.devices=N did) and said in one line."""
    ended = Ended()
    try:
        yield ended
    except Interrupted as stop:
        if main and not getattr(stop, "recorded", False):
            record_interruption(place, stop)
        line = interruption_line(place, stop)
        log.warning(line)
        warning = requeue_under_slurm() if stop.signum == signal.SIGUSR1 else None
        print(f"jacdistill train: {line}", file=sys.stderr)
        if warning:
            print(f"jacdistill train: warning: {warning}", file=sys.stderr)
        raise SystemExit(128 + int(stop.signum)) from None
    except Diverged as err:
        if main:
            if not getattr(err, "recorded", False):
                record_divergence(place, err)
            print(f"jacdistill train: error: {err}", file=sys.stderr)
        log.error(f"failed: {err}")
        if not place.multirun:
            raise SystemExit(1) from None
    except UsageError as err:
        if ended.claimed and read_metrics(place.run_dir) is None:
            write_json(place.run_dir / "metrics.json", {"status": REFUSED, "error": str(err)})
        raise
