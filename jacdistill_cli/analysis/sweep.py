"""What a multirun does around its jobs: says where its sweep directory is when it ends, and leaves the
sweep's report and its TensorBoard experiment summary there (jacdistill's sweeper, which checks every job
first, says where it is when it starts).

A Hydra callback (conf/train.yaml, `hydra.callbacks.sweep`), called in the process that launches the
jobs, whichever launcher runs them. When a job fails (Hydra then stops the sweep with an error) or the
sweep is interrupted, the same is done as the process exits, for the jobs that ran. A job whose training
diverged ends alone (the others go on); the sweep then exits with status 1 after its report.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from jacdistill_cli.records.status import DIVERGED


class SweepReport(Callback):
    def __init__(self, report: bool = True) -> None:
        self.report = report
        self.sweep_dir: Path | None = None
        self.finished = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.finished = False   # (jacdistill's sweeper says where the sweep is once every job is checked)
        atexit.register(self.finish, config.hydra.job.name, ended="the sweep ended early")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.finish(config.hydra.job.name)
        atexit.unregister(self.finish)

    def finish(self, command: str, ended: str = "") -> None:
        """Write the sweep's report and experiment summary, then say where they are (once)."""
        if self.finished or self.sweep_dir is None or not self.sweep_dir.is_dir():
            return
        self.finished = True
        prefix = f"jacdistill {command}:"
        diverged = 0
        if self.report:
            from jacdistill_cli.analysis.report import write_report
            from jacdistill_cli.errors import UsageError

            try:
                report, text, written = write_report(self.sweep_dir)
                diverged = sum(run.status == DIVERGED for run in report.runs)
                print(f"\n{text}\n{prefix} written: {', '.join(str(path) for path in written)}", flush=True)
            except UsageError as err:  # no run of the sweep got as far as its directory
                print(f"{prefix} no report: {err}", file=sys.stderr, flush=True)
        try:
            from jacdistill_cli.loop.logger import write_sweep_experiment

            write_sweep_experiment(self.sweep_dir)
        except Exception as err:  # noqa: BLE001 - TensorBoard then builds the experiment from the runs
            print(f"{prefix} no TensorBoard experiment summary: {type(err).__name__}: {err}", file=sys.stderr)
        print(f"{prefix} sweep directory {self.sweep_dir}" + (f" ({ended})" if ended else ""), flush=True)
        if diverged and not ended:
            raise SystemExit(1)
