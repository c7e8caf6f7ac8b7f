"""Shared fixtures: an isolated teacher cache, and running the real console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Small, fast settings for end-to-end runs of the console script on digits.
FAST = ["trainer.epochs=1", "teacher.epochs=2"]


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    """One teacher cache for the whole session, so each teacher config is trained once."""
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture(autouse=True)
def isolated_cache(teacher_cache, monkeypatch):
    monkeypatch.setenv("JACDISTILL_CACHE", str(teacher_cache))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `jacdistill` console script and capture its output."""
    script = Path(sys.executable).with_name("jacdistill")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jacdistill_cli"]
    # One torch thread per run: the models are tiny, and threads that wait on a busy CPU cost more.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*command, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


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
