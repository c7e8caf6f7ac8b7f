"""After a signal: the command that continues the run, SLURM's requeue, and the TensorBoard files made ready
for the continued session."""

from __future__ import annotations

import io
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from jacdistill_cli import storage

log = logging.getLogger("jacdistill")


def resume_command(run_dir: Path, multirun: bool) -> str:
    """The command line that continues this run: the same overrides plus its directory (a sweep's job: the
    whole sweep again, in its sweep directory)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    if multirun:
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
