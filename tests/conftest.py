"""Shared fixtures: an isolated teacher cache, running the real console script, and stopping runs of it
with signals; a test not marked slow that starts a process fails."""

from __future__ import annotations

import _posixsubprocess
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from jacdistill_cli.records.directory import LAST

REPO = Path(__file__).resolve().parents[1]
# Small, fast settings for end-to-end runs of the console script on digits.
FAST = ["trainer.epochs=1", "teacher.epochs=2"]


# What starts a process: subprocess (its own reference to fork_exec, or posix_spawn), multiprocessing's spawn
# (fork_exec), fork, system.
PROCESS_STARTERS = [(module, name) for module, name in
                    [(subprocess, "_fork_exec"), (_posixsubprocess, "fork_exec"), (os, "fork"), (os, "forkpty"),
                     (os, "posix_spawn"), (os, "posix_spawnp"), (os, "system")] if hasattr(module, name)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The fast set (`-m "not slow"`) starts no process: outside tests marked slow, what starts one fails the
    test, in its fixtures too."""
    if item.get_closest_marker("slow") is not None:
        yield
        return

    def refuse(*args, **kwargs):
        stack = traceback.extract_stack()[:-1]
        starter = next(f for f in reversed(stack) if not f.filename.endswith(("subprocess.py", "os.py")))
        ours = next((f for f in reversed(stack)
                     if f.filename.startswith(str(REPO)) and "site-packages" not in f.filename), starter)
        pytest.fail(f"{item.nodeid} starts a process ({starter.filename}:{starter.lineno}, from "
                    f"{ours.filename}:{ours.lineno}): mark it @pytest.mark.slow", pytrace=False)

    originals = [(module, name, getattr(module, name)) for module, name in PROCESS_STARTERS]
    for module, name, _ in originals:
        setattr(module, name, refuse)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    """One teacher cache for the whole session, so each teacher config is trained once."""
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture(autouse=True)
def isolated_cache(teacher_cache, monkeypatch):
    monkeypatch.setenv("JACDISTILL_CACHE", str(teacher_cache))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
            preexec_fn=None) -> subprocess.CompletedProcess:
    """Run the installed `jacdistill` console script and capture its output (`preexec_fn`: run in the
    child before the script starts, e.g. to set a resource limit)."""
    script = Path(sys.executable).with_name("jacdistill")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jacdistill_cli"]
    # One torch thread per run: the models are tiny, and threads that wait on a busy CPU cost more.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*command, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: their tensors are tiny, and threads that wait on a busy CPU
    make them slower. A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def float64_one_thread():
    """float64 everywhere in a module, so that comparisons can be tight; one thread, as its
    tensors are tiny and threads that wait on a busy CPU make them 10-100x slower.
    A module opts in with `pytestmark = pytest.mark.usefixtures("float64_one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(threads)


def stop_after_a_save(runs: list[tuple[subprocess.Popen, Path, int]], timeout: float = 120,
                      new: bool = False) -> list[tuple[int, str]]:
    """Send each run its signal a random moment (under 0.1 s) after it (re)writes its last.pt (after it
    writes one at all, for `new` directories), each run watched on its own: the signal lands mid-training,
    whatever the other run is doing."""
    deadline = time.monotonic() + timeout
    lasts = [d / LAST for _, d, _ in runs]
    before = [0 if new or not last.exists() else last.stat().st_mtime_ns for last in lasts]
    due: list[float | None] = [None] * len(runs)
    signalled = [False] * len(runs)
    while not all(signalled):
        assert time.monotonic() < deadline, "no last.pt written"
        for i, ((process, _, signum), last) in enumerate(zip(runs, lasts)):
            if due[i] is None:
                assert process.poll() is None, process.communicate()
                if last.exists() and last.stat().st_mtime_ns > before[i]:
                    due[i] = time.monotonic() + random.uniform(0, 0.1)
            elif not signalled[i] and time.monotonic() >= due[i]:
                process.send_signal(signum)
                signalled[i] = True
        time.sleep(0.005)
    return [(process.communicate(timeout=timeout)[1], process.returncode)[::-1] for process, _, _ in runs]
