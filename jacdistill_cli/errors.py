"""One clear line for what stops a command: the error types every command turns into a non-zero exit.

A leaf: it imports nothing of the package, and every part imports it.
"""

from __future__ import annotations

import errno
import os
from typing import Any

# errno values that mean a file cannot be written where it is asked for: the environment, not the input.
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}
# The causes a user meets when a write fails, in their own words (others: the system's words).
CAUSES = {errno.ENOSPC: "disk full", errno.EFBIG: "file too large", errno.EDQUOT: "disk quota exceeded",
          errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
          errno.EPERM: "operation not permitted"}


class UsageError(Exception):
    """Bad input from the user: a setting, a path or a file. Printed as one line, exit status 2."""


class Diverged(Exception):
    """The total loss became non-finite: training cannot go on from these weights. One line, exit status 1;
    a job of a sweep ends alone."""

    def __init__(self, value: float, step: int, epoch: int, prefix: str = ""):
        self.value, self.step, self.epoch, self.prefix = value, step, epoch, prefix
        super().__init__(f"{prefix}loss/total is {value} at step {step} (epoch {epoch}): training diverged; "
                         "lower optim.lr, or the weights of the terms (alpha, hard_weight)")


class WriteError(OSError):
    """A file could not be written (disk full, file too large, quota, read-only, permission): one line
    naming the file and the cause, exit status 1. The file's previous content is whole."""

    def __init__(self, path: Any, err: OSError):
        super().__init__(err.errno, f"cannot write {path}: {cause(err)}", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


class ReadError(UsageError):
    """A file that cannot be loaded (unreadable, not written by torch.save, or holding objects a safe load
    refuses): one line naming the file and why, exit status 2."""

    def __init__(self, path: Any, reason: str):
        super().__init__(f"{path} cannot be loaded: {reason}")
        self.path = path
        self.reason = reason


def cause(err: OSError) -> str:
    """An OSError's cause in a few words with its errno's name: `file too large (EFBIG)`."""
    if err.errno is None:
        return str(err) or type(err).__name__
    words = CAUSES.get(err.errno) or os.strerror(err.errno).lower()
    return f"{words} ({errno.errorcode.get(err.errno, err.errno)})"


def describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def setting_error(key: str, value: Any, allowed: str) -> UsageError:
    return UsageError(f"{key}={describe(value)} is not allowed: {allowed}")
