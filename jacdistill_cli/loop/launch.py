"""`trainer.devices=N` without torchrun or srun around it: N workers started through torch's elastic launcher,
the launching process holding the run directory's lock and waiting. A worker's interruption or divergence is
recorded by rank 0 and comes back to the launching process, which ends the run as one process would
(records/outcome.py); a worker's one-line error is the command's.
"""

from __future__ import annotations

import logging
import signal
import uuid
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from jacdistill_cli.errors import Diverged, UsageError
from jacdistill_cli.loop import distributed
from jacdistill_cli.loop.distill import distilled
from jacdistill_cli.records.directory import Claim, RunPlace, read_metrics
from jacdistill_cli.records.outcome import interruption_recorded, record_divergence, record_interruption
from jacdistill_cli.records.signals import Interrupted, Signals

# The signals the launching process passes on to its workers itself; torch's agent stops them with the others
# it gets (SIGINT, SIGTERM, SIGHUP, SIGQUIT). SIGUSR1 is SLURM's warning before a time limit: rank 0 saves at
# the next step, as one process does, and the run is requeued under SLURM.
FORWARDED = (signal.SIGUSR1,)


@dataclass(frozen=True)
class WorkerStopped:
    """What a worker returns when a signal stopped it (rank 0 has recorded it)."""

    signum: int
    epoch: int | None
    step: int | None


@dataclass(frozen=True)
class WorkerDiverged:
    """What a worker returns when the run diverged (every rank stops at the same step; rank 0 recorded it)."""

    value: float
    step: int
    epoch: int
    prefix: str = ""


def recorded(error: BaseException) -> BaseException:
    """The error, marked as recorded in metrics.json already (by a worker's rank 0)."""
    error.recorded = True
    return error


def launched(config_yaml: str, choices: dict[str, Any], place: RunPlace, claim: Claim | None, devices: int) -> float:
    """Run the train run in `devices` workers; their result (rank 0's), or their end as this process's."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launch = uuid.uuid4().hex
    try:
        result = distributed.launch(worker, (config_yaml, choices, place, claim, launch), devices, forward=FORWARDED)
    except SignalException as err:   # the agent stopped the workers with the signal this process got
        metrics = read_metrics(place.run_dir) or {}
        if interruption_recorded(place, launch):
            raise recorded(Interrupted(int(err.sigval), metrics.get("epoch"), metrics.get("step"))) from None
        raise Interrupted(int(err.sigval)) from None   # stopped before training began: recorded here
    except ChildFailedError as err:
        if interruption_recorded(place, launch):
            codes = [f.exitcode for f in err.failures.values() if f.exitcode and f.exitcode > 128]
            raise SystemExit(codes[0] if codes else 1) from None   # rank 0 said how to resume
        raise UsageError(f"trainer.devices={devices}: a worker failed: {worker_failure(err)}") from None
    if isinstance(result, WorkerStopped):
        raise recorded(Interrupted(result.signum, result.epoch, result.step))
    if isinstance(result, WorkerDiverged):
        raise recorded(Diverged(result.value, result.step, result.epoch, result.prefix))
    return result


def worker(config_yaml: str, choices: dict[str, Any], place: RunPlace, claim: Claim | None,
           launch: str) -> float | WorkerStopped | WorkerDiverged:
    """One process of `trainer.devices=N`, started by torch's elastic launcher (RANK, WORLD_SIZE, ... set): the
    run's spec built again from its config, then the run as every process of it runs it."""
    import sys

    from jacdistill_cli.spec.build import train_spec

    world = distributed.world_from_environment()
    logging.basicConfig(level=logging.INFO if world.main else logging.WARNING,
                        format=f"[%(asctime)s][rank {world.rank}][%(levelname)s] - %(message)s")
    spec = train_spec(OmegaConf.create(config_yaml), choices)
    with Signals() as signals:
        try:
            return distilled(spec, place, world, signals, claim)
        except Interrupted as stop:
            if world.main:
                record_interruption(place, stop, launch)
            if stop.signum in FORWARDED:
                # Passed on by the launching process, whose agent is waiting for the workers' results (and takes a
                # non-zero exit for a failure, which it reports at length).
                return WorkerStopped(int(stop.signum), stop.epoch, stop.step)
            raise SystemExit(128 + int(stop.signum)) from None   # the agent is stopping the workers: it waits for exits
        except Diverged as err:
            if world.main:
                record_divergence(place, err)
            return WorkerDiverged(err.value, err.step, err.epoch, err.prefix)
        except UsageError as err:
            print(f"jacdistill train: error: {err}", file=sys.stderr)
            raise


def worker_failure(err: Exception) -> str:
    """The first failed worker's error, in one line."""
    for failure in getattr(err, "failures", {}).values():
        message = failure.message if isinstance(failure.message, str) else str(failure.message)
        return (message.strip().splitlines() or ["unknown error"])[-1][:300]
    return str(err).strip().splitlines()[0]
