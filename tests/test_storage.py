"""storage.py: one atomic write and one safe load.

Writes fail here for real: a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored the write gets EFBIG,
as a full disk gives ENOSPC), a full tmpfs where one can be mounted, a file where the directory should
be. Each leaves the previous file whole and no temporary file, and says so in one line; the console
script ends a run whose last.pt or student.pt cannot be written in that one line, exit status 1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import stop_after_a_save

from jacdistill_cli import storage
from jacdistill_cli.config.entry import one_line_errors
from jacdistill_cli.errors import ReadError, WriteError
from jacdistill_cli.records.directory import LAST, remove_stale_temporaries

LIMIT = 64 * 1024
# (writer, a small content, a content larger than LIMIT, how to read the file back)
WRITERS = {
    "torch": (storage.write_torch, {"w": torch.arange(10.0)}, {"w": torch.arange(50_000.0)}, storage.load_torch),
    "json": (storage.write_json, {"values": [1, 2]}, {"values": list(range(30_000))},
             lambda path: json.loads(Path(path).read_text())),
    "text": (storage.write_text, "small\n", "x" * 200_000 + "\r\n", lambda path: Path(path).read_bytes().decode()),
}


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE for this process, SIGXFSZ ignored (so that a write past the limit fails with EFBIG
    instead of killing the process); both restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def limited_child(limit: int):
    """A preexec_fn: the console script runs under RLIMIT_FSIZE=limit with SIGXFSZ ignored."""
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return set_limit


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


@pytest.mark.parametrize("kind", WRITERS)
def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path, kind):
    write, small, large, read = WRITERS[kind]
    path = tmp_path / "deeper" / f"file.{kind}"   # the directory is made
    write(path, large)
    write(path, small)
    back = read(path)
    assert (back["w"].tolist() == small["w"].tolist()) if kind == "torch" else back == small
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("kind", WRITERS)
def test_a_write_past_the_file_size_limit_keeps_the_old_file_and_says_why_in_one_line(tmp_path, kind):
    write, small, large, _ = WRITERS[kind]
    path = tmp_path / f"file.{kind}"
    write(path, small)
    before = path.read_bytes()
    with file_size_limit(LIMIT), pytest.raises(WriteError) as caught:
        write(path, large)
    assert caught.value.errno == errno.EFBIG
    assert str(caught.value) == f"cannot write {path}: file too large (EFBIG)"
    assert path.read_bytes() == before
    assert temporaries(tmp_path) == []


@pytest.mark.slow   # mounts a tmpfs: a process
def test_a_full_file_system_keeps_the_old_file_and_frees_the_temporary(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here: {mounted.stderr.strip()}")
    try:
        path = folder / "last.pt"
        storage.write_torch(path, {"w": torch.arange(10.0)})
        before, free = path.read_bytes(), shutil.disk_usage(folder).free
        with pytest.raises(WriteError) as caught:
            storage.write_torch(path, {"w": torch.arange(50_000.0)})
        assert str(caught.value) == f"cannot write {path}: disk full (ENOSPC)"
        assert path.read_bytes() == before and temporaries(folder) == []
        assert shutil.disk_usage(folder).free == free   # the temporary's blocks are given back
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_file_where_the_directory_should_be_is_named_by_its_errno(tmp_path):
    (tmp_path / "run").write_text("a file\n")
    with pytest.raises(WriteError) as caught:
        storage.write_json(tmp_path / "run" / "metrics.json", {"a": 1})
    assert str(caught.value) == f"cannot write {tmp_path / 'run' / 'metrics.json'}: not a directory (ENOTDIR)"
    assert (tmp_path / "run").read_text() == "a file\n"


def test_a_command_that_cannot_write_ends_in_one_line_with_exit_status_1(tmp_path, capsys):
    path = tmp_path / "student.pt"
    storage.write_torch(path, {"w": torch.zeros(3)})

    @one_line_errors("train")
    def command() -> None:
        with file_size_limit(LIMIT):
            storage.write_torch(path, {"w": torch.zeros(50_000)})

    with pytest.raises(SystemExit) as stop:
        command()
    assert stop.value.code == 1
    assert capsys.readouterr().err == f"jacdistill train: error: cannot write {path}: file too large (EFBIG)\n"


class Custom:
    """Unpickling this needs this module's code: a safe load refuses it."""


def test_the_safe_load_reads_numpy_numbers_and_refuses_code_and_other_files_in_one_line(tmp_path):
    torch.save({"accuracy": np.float64(0.5), "counts": np.arange(3)}, tmp_path / "numpy.pt")
    loaded = storage.load_torch(tmp_path / "numpy.pt")
    assert loaded["accuracy"] == 0.5 and loaded["counts"].tolist() == [0, 1, 2]
    torch.save({"x": Custom()}, tmp_path / "code.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "folder.pt").mkdir()
    reasons = {}
    for name in ("code.pt", "notes.txt", "folder.pt"):
        with pytest.raises(ReadError) as caught:
            storage.load_torch(tmp_path / name)
        assert str(caught.value) == f"{tmp_path / name} cannot be loaded: {caught.value.reason}"
        reasons[name] = caught.value.reason
    assert reasons == {
        "code.pt": "it would need arbitrary code to unpickle (test_storage.Custom); only tensors and plain "
                   "containers are loaded (weights_only=True)",
        "notes.txt": "it is not a file written by torch.save",
        "folder.pt": "it cannot be read: is a directory (EISDIR)"}


def test_the_temporaries_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".hydra").mkdir()
    stale = [tmp_path / ".last.pt.123.tmp", tmp_path / ".metrics.json.77.tmp", tmp_path / ".hydra" / ".config.yaml.5.tmp"]
    kept = [tmp_path / LAST, tmp_path / "metrics.json", tmp_path / ".run.lock", tmp_path / ".hydra" / "config.yaml"]
    for path in stale + kept:
        path.write_text("x")
    assert storage.temporary(tmp_path / LAST).name == f".{LAST}.{os.getpid()}.tmp"
    remove_stale_temporaries(tmp_path)
    assert [p.exists() for p in stale] == [False] * 3 and all(p.exists() for p in kept)


# ----------------------------------------------------------------------------------------------
# The console script: a run whose checkpoint cannot be written

# A student large enough that last.pt and student.pt are the largest files a run writes (the event
# files, best.pt, the configs and the log stay under the limits below).
WIDE = "student.hidden=[512]"


def files_below(folder: Path, limit: int, but: tuple[str, ...]) -> list[str]:
    """The run's files, other than `but`, that are not below `limit` (each must be, or the limit would
    fail another write than the one under test)."""
    return [p.name for p in folder.rglob("*") if p.is_file() and p.name not in but and p.stat().st_size >= limit]


@pytest.mark.slow
def test_a_run_whose_last_pt_cannot_be_written_ends_in_one_line_and_keeps_the_earlier_one(tmp_path, cli):
    run_dir = tmp_path / "run"
    args = ["train", "trainer.epochs=10", "teacher.epochs=2", WIDE, f"hydra.run.dir={run_dir}"]
    script = Path(sys.executable).with_name("jacdistill")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jacdistill_cli"]
    earlier = subprocess.Popen([*command, *args], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    [(code, stderr)] = stop_after_a_save([(earlier, run_dir, signal.SIGINT)], new=True)
    assert code == 128 + signal.SIGINT, stderr
    before = (run_dir / LAST).read_bytes()
    limit = len(before) * 3 // 4   # the next last.pt (the same tensors) does not fit; best.pt, events do
    assert files_below(run_dir, limit, but=(LAST,)) == []
    result = cli(*args, cwd=tmp_path, preexec_fn=limited_child(limit))
    assert "resuming from" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"jacdistill train: error: cannot write {run_dir / LAST}: file too large (EFBIG)"]
    assert (run_dir / LAST).read_bytes() == before
    assert temporaries(run_dir) == []


@pytest.mark.slow
def test_a_run_whose_student_pt_cannot_be_written_ends_in_one_line_and_keeps_the_earlier_one(tmp_path, cli):
    run_dir = tmp_path / "run"
    args = ["train", "trainer.epochs=2", "teacher.epochs=2", WIDE, f"hydra.run.dir={run_dir}"]
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = (run_dir / "student.pt").read_bytes()
    # As a run killed after its last epoch's last.pt and before its results: the same command continues
    # from last.pt with no step left, and writes student.pt and metrics.json.
    (run_dir / "metrics.json").unlink()
    limit = len(before) * 3 // 4
    assert files_below(run_dir, limit, but=("student.pt", "best.pt", LAST)) == []
    result = cli(*args, cwd=tmp_path, preexec_fn=limited_child(limit))
    assert "resuming from" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"jacdistill train: error: cannot write {run_dir / 'student.pt'}: file too large (EFBIG)"]
    assert (run_dir / "student.pt").read_bytes() == before
    assert not (run_dir / "metrics.json").exists()
    assert temporaries(run_dir) == []
