"""Shared fixtures: an isolated teacher cache, running the real console script, and stopping runs of it
with signals; a test not marked slow that starts a process fails."""

from __future__ import annotations

import _posixsubprocess
import os
import subprocess
import traceback
from pathlib import Path

import pytest
from helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


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
