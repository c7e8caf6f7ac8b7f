"""The teacher's lifecycle: loaded from a checkpoint, or trained with cross-entropy and cached.

The cache key is a hash of everything that determines the trained teacher: the dataset settings,
the architecture, the teacher's training settings and the seed. A teacher trained here sees the full
training split, as a pretrained teacher would: `dataset.samples_per_class` limits the student only,
so it is not part of the key; `teacher.samples_per_class` (when set) limits the teacher.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jacdistill_cli.errors import UsageError, WriteError
from jacdistill_cli.loop.callbacks import ProgressBar, TensorBoard, interactive
from jacdistill_cli.loop.distiller import Distiller
from jacdistill_cli.loop.distributed import World, broadcast
from jacdistill_cli.loop.evaluation import evaluate
from jacdistill_cli.loop.logger import RunLogger
from jacdistill_cli.loop.trainer import Trainer
from jacdistill_cli.records.signals import Interrupted
from jacdistill_cli.robustness.pixels import Pixels
from jacdistill_cli.robustness.settings import TeacherTraining
from jacdistill_cli.robustness.training import teacher_objective
from jacdistill_cli.spec.run import DataSpec, LoopSpec, OptimSpec, TeacherSpec
from jacdistill_cli.storage import write_torch
from jacdistill_cli.zoo.checkpoints import (
    check_fits,
    load_checkpoint,
    load_teacher_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
)
from jacdistill_cli.zoo.data import DataBundle
from jacdistill_cli.zoo.models import build_model, describe_architecture
from jacdistill_cli.zoo.probe import probe

log = logging.getLogger("jacdistill")

# Dataset settings that do not change what a teacher trained by the runner sees (max_memory_mb: held in
# memory or read by a DataLoader, the batches are the same).
NOT_TEACHER_DATA = ("samples_per_class", "download", "max_memory_mb")


@dataclass(frozen=True)
class TeacherJob:
    """A teacher to obtain: how (`teacher`), on which data (`data`: its node is part of the cache key), from
    which seed, evaluated `eval_batch_size` at a time, read by `num_workers` DataLoader workers."""

    teacher: TeacherSpec
    data: DataSpec
    seed: int
    eval_batch_size: int = 512
    num_workers: int = 0


def try_teacher(teacher: TeacherSpec, data: DataBundle) -> nn.Module:
    """The teacher's network built on the `meta` device and tried on two samples of the data (zoo/probe.py)
    before any epoch: a setting that does not fit is refused in one line (no memory, no random numbers
    drawn, no weights file read). Returns the meta network (feature matching's paths are resolved on it)."""
    shapes = {k: v for k, v in teacher.model.architecture.items() if k != "weights"}
    with torch.device("meta"):
        model = build_model(shapes, data.input_shape, data.num_classes, "teacher")
    probe(model, data.input_shape, data.num_classes, "teacher", teacher.model.selection)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """A teacher is never trained by distillation: eval mode, no parameter gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def teacher_identity(job: TeacherJob) -> dict[str, Any]:
    """Everything that determines a trained teacher."""
    plan = job.teacher.training
    training = {"epochs": plan.epochs, "batch_size": plan.batch_size, "lr": plan.lr, "weight_decay": plan.weight_decay,
                **plan.training.identity()}   # {} for standard training: the keys cached before stay
    if plan.samples_per_class is not None:
        training["samples_per_class"] = plan.samples_per_class
    return {
        "dataset": {k: v for k, v in job.data.node.items() if k not in NOT_TEACHER_DATA},
        # which output holds the logits is how the network is read, not what it learns
        "architecture": {k: v for k, v in job.teacher.model.architecture.items() if k != "output"},
        "training": training,
        "seed": job.seed,
        "format": 1,
    }


def cache_path(job: TeacherJob) -> Path:
    digest = hashlib.sha256(json.dumps(teacher_identity(job), sort_keys=True).encode()).hexdigest()[:16]
    return job.teacher.cache_dir / "teachers" / f"{job.teacher.name}-{job.data.node.get('name')}-{digest}.pt"


def train_teacher(job: TeacherJob, data: DataBundle, device: torch.device, logger: RunLogger,
                  prefix: str = "teacher/") -> tuple[nn.Module, dict[str, Any]]:
    """Train the configured teacher on the full training split (or on `samples_per_class` per class) with
    cross-entropy, or adversarially (`training.training`); returns it and its checkpoint payload."""
    plan, spec = job.teacher.training, job.teacher.model.architecture
    data = data.for_teacher(plan.samples_per_class, job.data.split_seed)
    torch.manual_seed(job.seed)
    model = build_model(spec, data.input_shape, data.num_classes, "teacher").to(device)
    optim = OptimSpec("adam", functools.partial(torch.optim.Adam, lr=plan.lr, weight_decay=plan.weight_decay),
                      "cosine")
    log.info(f"training teacher {describe_architecture(spec)} on {data.name} ({len(data.train)} training samples) "
             f"for {plan.epochs} epochs, {describe_training(plan.training)}")
    loop = LoopSpec(plan.epochs, plan.batch_size, job.eval_batch_size, num_workers=job.num_workers)
    callbacks = [TensorBoard(logger, prefix), *([ProgressBar(prefix)] if interactive() else [])]
    trainer = Trainer(loop, optim, device, callbacks=callbacks, prefix=prefix, seed=job.seed)
    try:
        trainer.fit(Distiller(model, None, teacher_objective(plan.training, Pixels.of(data), seed=job.seed)), data)
    except Interrupted as stop:
        stop.teacher = True
        raise
    metrics = {f"{split}_accuracy": evaluate(model, None, getattr(data, split), job.eval_batch_size,
                                             device)["accuracy"] for split in ("val", "test")}
    return model, make_checkpoint(model, "teacher", spec, data, metrics)


def describe_training(training: TeacherTraining) -> str:
    """How a teacher is trained, in words: `with cross-entropy`, `adversarially (PGD linf eps 0.2, 10 steps
    of 0.05 from a random start)`."""
    if training.kind == "standard":
        return "with cross-entropy"
    attack = training.attack
    start = ("x + 0.001 N(0, 1)" if training.kind == "trades" else "a random start" if attack.random_start
             else "the clean input")
    inner = f"PGD {attack.norm} eps {attack.eps:g}, {attack.steps} steps of {attack.step:g} from {start}"
    if training.kind == "trades":
        return f"with TRADES (beta {training.beta:g}; the KL maximised by {inner})"
    return f"adversarially (cross-entropy on {inner}; Madry et al.)"


def obtain_teacher(job: TeacherJob, data: DataBundle, device: torch.device, logger: RunLogger,
                   world: World, run_dir: Path, preloaded: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher and facts about it: source (weights|checkpoint|cache|trained), path, metrics. Under
    torch.distributed rank 0 obtains it (trains it at most once) and shares it with the other ranks. The
    model is built once in each process: the one trained or loaded here, or on other ranks from rank 0's.
    `preloaded`: teacher.checkpoint's content, read and checked before the run (checked_teacher_checkpoint)."""
    model, shared = teacher_model(job, data, device, logger, run_dir, preloaded) if world.main else (None, None)
    payload, source, path = broadcast(shared, world)
    if model is None:
        model = model_from_checkpoint(payload, "teacher.checkpoint", own_target(job.teacher))
    model = freeze(model.to(device))
    metrics = {f"teacher_{k}": v for k, v in payload.get("metrics", {}).items()}
    test = evaluate(model, None, data.test, job.eval_batch_size, device, world)["accuracy"]
    metrics["teacher_test_accuracy"] = test
    log.info(f"teacher ({source}: {path}) test accuracy {test:.4f}")
    return model, {"source": source, "path": str(path), **metrics}


def teacher_model(job: TeacherJob, data: DataBundle, device: torch.device, logger: RunLogger,
                  run_dir: Path, preloaded: dict[str, Any] | None = None) -> tuple[nn.Module, tuple[dict[str, Any], str, Path]]:
    """(the teacher, (its checkpoint payload, its source, its path)): loaded, cached, or trained and cached."""
    spec, checkpoint = job.teacher.model.architecture, job.teacher.checkpoint
    if checkpoint is None and spec.get("weights") is not None:
        # Published weights (torchvision's ImageNet teachers): used as they are, never trained or cached.
        model = build_model(spec, data.input_shape, data.num_classes, "teacher")
        log.info(f"teacher {spec['arch']} with weights {spec['weights']}")
        return model, (make_checkpoint(model, "teacher", spec, data, {}), "weights", spec["weights"])
    if checkpoint is not None:
        key = "teacher.checkpoint"
        payload = preloaded if preloaded is not None else checked_teacher_checkpoint(job.teacher, data)
        return (model_from_checkpoint(payload, key, own_target(job.teacher)),
                (payload, "checkpoint", Path(checkpoint).expanduser().resolve()))
    model, payload, source, path = cached_teacher(job, data, device, logger, run_dir)
    return model, (payload, source, path)


def checked_teacher_checkpoint(teacher: TeacherSpec, data: DataBundle) -> dict[str, Any] | None:
    """teacher.checkpoint's content (None: no checkpoint), refused in one line when it is not a teacher of the
    configured architecture that fits the data."""
    if teacher.checkpoint is None:
        return None
    key, spec = "teacher.checkpoint", teacher.model.architecture
    payload = load_teacher_checkpoint(teacher.checkpoint, key, spec, data)
    check_fits(payload, key, data, spec, group="teacher")
    return payload


def own_target(teacher: TeacherSpec) -> tuple[str, ...]:
    """The teacher's `_target_` as the user's configuration names it: a checkpoint of it may be imported."""
    return (str(teacher.model.architecture.get("_target_")),)


def reason(err: OSError) -> str:
    """An OSError in a few words: `Read-only file system`, `Not a directory: '/x'`."""
    if isinstance(err, WriteError):
        return str(err)
    where = f": {err.filename!r}" if err.filename else ""
    return f"{err.strerror or type(err).__name__}{where}"


def load_cached(path: Path, data: DataBundle, spec: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]] | None:
    """The cached teacher at `path` with its checkpoint payload, or None when there is none. An entry that
    cannot be used (unreadable, another architecture, weights that do not fit) is None after one warning."""
    if not path.is_file():
        return None
    try:
        payload = load_checkpoint(path, "cached teacher")
        check_fits(payload, "cached teacher", data, spec)
        return model_from_checkpoint(payload, "cached teacher", (str(spec.get("_target_")),)), payload
    except (UsageError, OSError) as err:
        log.warning(f"the cached teacher {path} cannot be used ({err}); training it anew")
        return None


def cached_teacher(job: TeacherJob, data: DataBundle, device: torch.device, logger: RunLogger,
                   run_dir: Path) -> tuple[nn.Module, dict[str, Any], str, Path]:
    """The teacher from the cache, or trained and cached: (model, payload, source, path).

    A file lock next to the entry makes runs that need the same teacher at the same time train it
    once: the first trains and writes it, the others wait and then load it. flock-based, so a run
    killed while holding it releases it. A cache that cannot be written (read-only, full, a file
    where the directory should be) costs one warning: the run trains the teacher and keeps it in
    its run directory as teacher.pt.
    """
    from filelock import FileLock, Timeout

    path = cache_path(job)
    lock = None
    unwritable = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info(f"waiting for another run that is training this teacher ({lock.lock_file})")
            lock.acquire()
    except OSError as err:
        lock, unwritable = None, reason(err)
    try:
        found = load_cached(path, data, job.teacher.model.architecture)
        if found is not None:
            return found[0], found[1], "cache", path
        if unwritable is not None:
            log.warning(f"the teacher cache {path.parent} cannot be written ({unwritable}); the teacher is "
                        "trained in this run and kept in its run directory as teacher.pt")
        model, payload = train_teacher(job, data, device, logger)
        if unwritable is None:
            try:
                write_torch(path, payload)
                return model, payload, "trained", path
            except WriteError as err:
                log.warning(f"the teacher cache {path.parent} cannot be written ({err}); the teacher trained "
                            "in this run is kept in its run directory as teacher.pt")
        kept = run_dir / "teacher.pt"
        write_torch(kept, payload)
        return model, payload, "trained", kept
    finally:
        if lock is not None:
            lock.release()
