"""The entry of every command's Hydra job: added keys checked first, and whatever stops the command said
in one line (bad input: exit status 2; a file that cannot be written: exit status 1)."""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, Callable

from jacdistill_cli.errors import UNWRITABLE, UsageError, WriteError, cause

# Set by the console script while Hydra composes the config with HYDRA_FULL_ERROR=1, so that a composition
# error reaches it (to be said in one line); the job unsets both, so that its own errors get Hydra's usual report.
hydra_full_error_for_composition = False


def composition_done() -> None:
    global hydra_full_error_for_composition
    if hydra_full_error_for_composition:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        hydra_full_error_for_composition = False


STARTED = time.time()
# What a refused run's directory may hold, all of it written by this process: Hydra's log of the job, the lock.
REFUSED_RUN_FILES = (".run.lock",)


def remove_refused_run_directory() -> None:
    """A run refused before it wrote anything leaves no directory: the one Hydra made for it is removed when it
    holds only what this process wrote there at its start (the job's log, the directory lock)."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    if run_dir == Path.cwd().resolve() or not run_dir.is_dir():
        return
    allowed = {f"{hydra_cfg.job.name}.log", *REFUSED_RUN_FILES}
    entries = list(run_dir.iterdir())
    if any(e.name not in allowed or not e.is_file() or e.stat().st_mtime < STARTED - 1 for e in entries):
        return
    for entry in entries:
        entry.unlink(missing_ok=True)
    run_dir.rmdir()


def hydra_choices() -> dict[str, Any]:
    """The option chosen for each config group of this job (`teacher: cnn`, `recipe: kd`, ...); {} outside
    Hydra. A user's model is named by its option, HPARAMS name the recipe and preset."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {group: option for group, option in HydraConfig.get().runtime.choices.items()
            if not group.startswith("hydra/")}


def one_line_errors(command: str) -> Callable:
    """Turn a UsageError raised by a command into one line on stderr and exit status 2, and a file the
    command cannot write (errors.WriteError, or an OSError of a full, read-only or forbidden place) into
    one line and exit status 1.

    SystemExit passes through Hydra's own error handler, so no traceback is printed.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            composition_done()
            try:
                from jacdistill_cli.config.keys import check_added_keys

                check_added_keys()  # `+trainer.epoch=2` would otherwise be ignored in silence
                return fn(*args, **kwargs)
            except UsageError as err:
                print(f"jacdistill {command}: error: {err}", file=sys.stderr)
                remove_refused_run_directory()
                raise SystemExit(2) from None
            except WriteError as err:
                print(f"jacdistill {command}: error: {err}", file=sys.stderr)
                raise SystemExit(1) from None
            except OSError as err:
                if err.errno not in UNWRITABLE:
                    raise
                # a full disk or a read-only file system met outside the writer: the environment, not the input
                where = f"{err.filename}: " if err.filename else ""
                print(f"jacdistill {command}: error: {where}{cause(err)}", file=sys.stderr)
                raise SystemExit(1) from None

        return run

    return wrap
