"""One clear line for bad input: the error type every command turns into a non-zero exit."""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Any, Callable


# errno values that mean a file cannot be written: disk full, quota exceeded, read-only file system, too large.
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


# Set by the console script while Hydra composes the config with HYDRA_FULL_ERROR=1, so that a composition
# error reaches it (to be said in one line); the job unsets both, so that its own errors get Hydra's usual report.
hydra_full_error_for_composition = False


def composition_done() -> None:
    global hydra_full_error_for_composition
    if hydra_full_error_for_composition:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        hydra_full_error_for_composition = False


class UsageError(Exception):
    """Bad input from the user: a setting, a path or a file. Printed as one line, exit status 2."""


def describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def setting_error(key: str, value: Any, allowed: str) -> UsageError:
    return UsageError(f"{key}={describe(value)} is not allowed: {allowed}")


def one_line_errors(command: str) -> Callable:
    """Turn a UsageError raised by a command into one line on stderr and exit status 2.

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
                raise SystemExit(2) from None
            except OSError as err:
                if err.errno not in UNWRITABLE and type(err).__name__ != "CheckpointWriteError":
                    raise
                # a full disk or a read-only file system: the environment, not the input
                where = f" ({err.filename})" if err.filename else ""
                print(f"jacdistill {command}: error: {err.strerror or err}{where}", file=sys.stderr)
                raise SystemExit(1) from None

        return run

    return wrap
