"""What the tests share: running a command in this process or through the console script, stopping runs
of it with signals, a method's and the train objective's construction, a TensorBoard session's status, and
crafted files. Each test module imports what it needs from here (never from another test module)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from jacdistill_cli.cli import main
from jacdistill_cli.config.registry import build, shipped_options
from jacdistill_cli.engine import losses
from jacdistill_cli.engine.objective import Objective, distillation_objective
from jacdistill_cli.records.directory import LAST

# Small, fast settings for end-to-end runs of the console script on digits.
FAST = ["trainer.epochs=1", "teacher.epochs=2"]


# ---------------------------------------------------------------------------------------------- commands


def run_command(command: str, overrides: list[str], run_dir: Path) -> Any:
    """Compose conf/<command>.yaml with `overrides`, make `run_dir` Hydra's run directory, call
    jacdistill_cli.commands.<command>.run and return what it returns."""
    module = importlib.import_module(f"jacdistill_cli.commands.{command}")
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        cfg = compose(config_name=command, overrides=list(overrides), return_hydra_config=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return module.run(cfg)


def run_in_process(args: list[str]) -> tuple[int, str]:
    """`jacdistill ARGS` through the console script's entry point: (exit status, stderr)."""
    err, out = io.StringIO(), io.StringIO()
    argv = sys.argv
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                status = main(args)
            except SystemExit as exit_:
                status = exit_.code
    finally:
        sys.argv = argv
    return status, err.getvalue()


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


def session_status(run_dir: Path) -> int:
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    content = events.summary_metadata[hparams_metadata.SESSION_END_INFO_TAG].plugin_data.content
    return hparams_metadata.parse_session_end_info_plugin_data(content).status


# ---------------------------------------------------------------------------------------------- objectives


LOSSES = {"kl": losses.kl, "mse": losses.mse, "ce": losses.ce, "none": losses.no_distillation}
COMMON = ("normalize", "squared", "batchnorm", "strategy", "of")
OWN = {"projected": ("num_projections", "distribution"), "noise": ("sigma", "samples", "antithetic", "form")}


def method(name: str, **settings):
    """The shipped method `name` with the given settings (keys other methods take are left out)."""
    keys = OWN.get(name, ()) + (COMMON if name not in ("noise", "none") else ())
    node = {"_target_": shipped_options("jacobian")[name], "name": name,
            **{k: v for k, v in settings.items() if k in keys}}
    return build("jacobian", OmegaConf.create(node))


def objective(loss: str, temperature: float, alpha: float, hard_weight: float, settings,
              generator: torch.Generator | None = None) -> Objective:
    """As training builds it: `settings` is a method's node (keys of other methods are ignored)."""
    plain = OmegaConf.to_container(settings) if OmegaConf.is_config(settings) else dict(settings)
    chosen = method(plain.pop("name"), **plain)
    return distillation_objective(functools.partial(LOSSES[loss], temperature=temperature), alpha, hard_weight,
                                  chosen, generator=generator)


# ---------------------------------------------------------------------------------------------- crafted files


class Marker:
    """A pickle that would create a file when unpickled: what a crafted data file does."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def write_crafted_cifar(root: Path, marker: Path) -> Path:
    """CIFAR-10 in its published layout: real batches, but data_batch_3 holds a crafted object."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {"data": np.zeros((10, 3072), dtype=np.uint8), "labels": list(range(10))}
    for name in ("data_batch_1", "data_batch_2", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Marker(str(marker)), "labels": [0]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root


def write_student(path: Path, cifar_root: Path) -> None:
    """A student checkpoint whose stored dataset settings point at `cifar_root` (as a crafted one would)."""
    import torch

    from jacdistill_cli.storage import write_torch
    from jacdistill_cli.zoo.models import build_model

    spec = {"name": "mlp", "hidden": [8], "batchnorm": False}
    model = build_model(spec, (3, 32, 32), 10)
    write_torch(path, {"format": "jacdistill", "version": 1, "role": "student", "architecture": spec,
                     "num_classes": 10, "input_shape": [3, 32, 32], "dataset": "cifar10",
                     "dataset_config": {"name": "cifar10", "root": str(cifar_root), "download": False,
                                        "verify": False, "val_fraction": 0.1, "split_seed": 0, "augment": False,
                                        "mean": [0.5] * 3, "std": [0.25] * 3},
                     "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "metrics": {},
                     "state_dict": {k: v.detach() for k, v in model.state_dict().items()}})
    assert torch.load(path, weights_only=True)["dataset"] == "cifar10"


def hydra_run(directory: Path) -> Path:
    """A directory that looks like a finished train run to `jacdistill report`."""
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "overrides.yaml").write_text("- alpha=0.1\n")
    (directory / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: train\n")
    return directory


def pattern(n: int, channels: int, height: int, width: int, offset: int) -> np.ndarray:
    """uint8 images [n, C, H, W] whose every pixel says where it is: (offset + 7n + 3c + 5y + 11x) mod 256."""
    k, c, y, x = np.meshgrid(np.arange(n), np.arange(channels), np.arange(height), np.arange(width), indexing="ij")
    return ((offset + 7 * k + 3 * c + 5 * y + 11 * x) % 256).astype(np.uint8)


def balanced_labels(n: int, classes: int) -> np.ndarray:
    return (np.arange(n) % classes).astype(np.uint8)


def write_cifar(root: Path, num_classes: int, train_per_class: int, test_per_class: int) -> None:
    """CIFAR python batches as published: dicts of data [n, 3072] (R, G, B planes) and labels."""
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    label_key = "labels" if num_classes == 10 else "fine_labels"

    def batch(n: int, offset: int) -> dict:
        return {"data": pattern(n, 3, 32, 32, offset).reshape(n, 3072),
                label_key: balanced_labels(n, num_classes).tolist()}

    train_n, test_n = num_classes * train_per_class, num_classes * test_per_class
    if num_classes == 10:
        # five training batches, as published; together they hold train_n images
        images = batch(train_n, 0)
        for i in range(5):
            part = {k: v[i::5] for k, v in images.items()}
            (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(part))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(test_n, 50)))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    else:
        (folder / "train").write_bytes(pickle.dumps(batch(train_n, 0)))
        (folder / "test").write_bytes(pickle.dumps(batch(test_n, 50)))
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))


# ---------------------------------------------------------------------------------------------- configs


def dataset_cfg(name: str, *overrides: str):
    """The `dataset` node of the train config with dataset=name and the given dataset.* overrides."""
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"dataset={name}", *overrides])
    return cfg.dataset


def grid(experiment: str) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper makes them from the preset's sweeper params."""
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN  # a sweep without -m
    assert "experiment" in cfg.hydra.job.config.override_dirname.exclude_keys
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides([*params, f"experiment={experiment}"])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def compose_job(job: list[str]):
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        return compose("train", overrides=job)


def one_job_per_seed_group(jobs: list[list[str]]) -> list[list[str]]:
    """Jobs that differ in more than their seed (composing each of them is the check that matters)."""
    first: dict[tuple, list[str]] = {}
    for job in jobs:
        first.setdefault(tuple(sorted(o for o in job if not o.startswith("seed="))), job)
    return list(first.values())


def teacher_cache_path(cfg) -> Path:
    """Where a train config's teacher is cached (loop/teacher.py cache_path of the spec's teacher)."""
    from jacdistill_cli.loop.teacher import TeacherJob, cache_path
    from jacdistill_cli.spec.build import train_spec

    spec = train_spec(cfg)
    return cache_path(TeacherJob(spec.teacher, spec.data, spec.seed))


def teacher_job(cfg):
    """The teacher a train config obtains (loop/teacher.py TeacherJob)."""
    from jacdistill_cli.loop.teacher import TeacherJob
    from jacdistill_cli.spec.build import train_spec

    spec = train_spec(cfg)
    return TeacherJob(spec.teacher, spec.data, spec.seed, spec.loop.eval_batch_size, spec.loop.num_workers)
