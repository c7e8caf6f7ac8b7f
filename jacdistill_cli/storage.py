"""One atomic write and one safe load, for every file the project writes or reads.

Writing: the content is serialised in memory first (torch.save into a buffer, json.dumps, YAML or CSV
text), then written with Python's file I/O, which reports the errno (torch.save to a path reports a
full disk as `[enforce fail at inline_container.cc]`), to a temporary file beside the target
(`.NAME.PID.tmp`), flushed, fsynced and put in place with os.replace. A reader, or a run resumed after a
kill, sees the old file or the new one, never half of one. A failed write leaves the old file whole,
removes its temporary file and raises errors.WriteError: one line naming the file and the cause (disk
full, file too large, quota, read-only, permission), exit status 1.

Loading: torch.load(weights_only=True) from a file opened here: no arbitrary code is unpickled, and
the numbers and arrays of numpy that files written elsewhere may hold are allowed by name
(`numpy_globals`). A file that cannot be loaded raises errors.ReadError, one line saying why.

A leaf below errors.py: the standard library, torch imported when needed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

from jacdistill_cli.errors import ReadError, UsageError, WriteError, cause

TEMPORARY_PATTERN = ".*.tmp"   # what temporary() names, for removing those of a killed process


def temporary(path: Path) -> Path:
    """The temporary file a write of `path` goes through: beside it (os.replace stays on one file system)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically (see the module's docstring); WriteError when it fails."""
    path = Path(path)
    tmp = temporary(path)
    try:
        with contextlib.suppress(FileExistsError):   # a file in the directory's place: open() says ENOTDIR
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb", buffering=0) as handle:   # unbuffered: the failing write() raises, not close()
            view = memoryview(data).cast("B")
            while view:
                view = view[handle.write(view):]
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        remove(tmp)
        raise WriteError(path, err) from None
    except BaseException:   # a signal's exception mid-write: no temporary file stays behind
        remove(tmp)
        raise
    sync_directory(path.parent)


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def sync_directory(folder: Path) -> None:
    """fsync the directory, so that the rename survives a power loss. Some file systems refuse to sync
    a directory; the file is in place in any case."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_text(path: str | Path, text: str) -> None:
    """UTF-8 text, written as given (no newline translation: a CSV's \\r\\n stays)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_torch(path: str | Path, payload: Any) -> None:
    """torch.save of `payload` (tensors, plain containers) to `path`, atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(path, buffer.getbuffer())


def numpy_globals() -> list:
    """What unpickling numpy scalars and numeric arrays needs (a file's `accuracy` may be a numpy float):
    the scalar and array constructors and the dtypes of numbers, under numpy 2's module names and under
    numpy 1's (`numpy.core`), as files written with either name them. Nothing that runs other code."""
    import numpy as np

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        function = getattr(core, name)
        allowed += [function, (function, f"numpy.core.multiarray.{name}"),
                    (function, f"numpy._core.multiarray.{name}")]
    for kind in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                 np.float16, np.float32, np.float64):
        allowed.append(type(np.dtype(kind)))  # numpy.dtypes.Float64DType, ...
    return allowed


def unpickling_reason(handle: Any, err: Exception) -> str:
    """Why torch.load(weights_only=True) refused the open file `handle`, in a few words."""
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if unsafe:
        return (f"it would need arbitrary code to unpickle ({unsafe.group(1)}); only tensors and plain containers "
                "are loaded (weights_only=True)")
    handle.seek(0)
    start = handle.read(2)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol marker 0x80)
    if not zipfile.is_zipfile(handle) and not start.startswith(b"\x80"):
        return "it is not a file written by torch.save"
    if "Weights only load failed" in str(err):
        return "it holds objects that weights_only=True does not load (only tensors and plain containers)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"torch.load fails on it ({type(err).__name__}: {first})"


def load_torch(path: str | Path) -> Any:
    """torch.load(weights_only=True), numpy's numbers allowed, onto the CPU; ReadError when the file
    cannot be opened or read, or holds what a safe load refuses."""
    import torch

    try:
        with open(path, "rb") as handle:
            try:
                with torch.serialization.safe_globals(numpy_globals()):
                    return torch.load(handle, map_location="cpu", weights_only=True)
            except OSError:
                raise
            except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
                raise ReadError(path, unpickling_reason(handle, err)) from None
    except OSError as err:
        raise ReadError(path, f"it cannot be read: {cause(err)}") from None


def read_torch(path: str | Path, key: str, what: str = "a jacdistill checkpoint") -> Any:
    """load_torch of the file a setting `key` names; one line naming the setting when it fails."""
    try:
        return load_torch(path)
    except ReadError as err:
        raise UsageError(f"{key}={str(path)!r} is not {what}: {err.reason}") from None
