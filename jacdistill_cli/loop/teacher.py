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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jacdistill_cli.config.settings import OptimSettings
from jacdistill_cli.errors import UsageError, WriteError
from jacdistill_cli.loop.callbacks import Divergence, ProgressBar, TensorBoard, interactive
from jacdistill_cli.loop.distiller import Distiller
from jacdistill_cli.loop.distributed import World, broadcast
from jacdistill_cli.loop.logger import RunLogger
from jacdistill_cli.loop.trainer import LoopSettings, Trainer, evaluate
from jacdistill_cli.robustness.pixels import Pixels
from jacdistill_cli.robustness.settings import TeacherTraining
from jacdistill_cli.robustness.training import teacher_objective
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

log = logging.getLogger("jacdistill")

# Dataset settings that do not change what a teacher trained by the runner sees (max_memory_mb: held in
# memory or read by a DataLoader, the batches are the same).
NOT_TEACHER_DATA = ("samples_per_class", "download", "max_memory_mb")


@dataclass(frozen=True)
class TeacherSettings:
    """How the teacher is obtained (the `teacher` group, typed): `checkpoint` (a file), or the architecture
    `spec` trained by these settings (`training`: cross-entropy, or adversarially) and cached under
    `cache_dir`."""

    name: str
    spec: dict[str, Any]                 # the architecture (zoo/models.py `architecture`)
    checkpoint: str | None
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    samples_per_class: int | None        # the teacher's own subset (None: the full training split)
    seed: int
    split_seed: int
    dataset: dict[str, Any]              # the dataset node, resolved: part of the cache key
    cache_dir: Path | None               # None: a command that caches no teacher (`jacdistill teacher`)
    eval_batch_size: int = 512
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)   # other teacher keys that determine it (cache key)
    training: TeacherTraining = field(default_factory=TeacherTraining)   # standard, adversarial or trades


def freeze(model: nn.Module) -> nn.Module:
    """A teacher is never trained by distillation: eval mode, no parameter gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def teacher_identity(settings: TeacherSettings) -> dict[str, Any]:
    """Everything that determines a trained teacher."""
    training = {"epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr,
                "weight_decay": settings.weight_decay, **settings.options,
                **settings.training.identity()}   # {} for standard training: the keys cached before stay
    if settings.samples_per_class is not None:
        training["samples_per_class"] = settings.samples_per_class
    return {
        "dataset": {k: v for k, v in settings.dataset.items() if k not in NOT_TEACHER_DATA},
        "architecture": settings.spec,
        "training": training,
        "seed": settings.seed,
        "format": 1,
    }


def cache_path(settings: TeacherSettings) -> Path:
    digest = hashlib.sha256(json.dumps(teacher_identity(settings), sort_keys=True).encode()).hexdigest()[:16]
    return settings.cache_dir / "teachers" / f"{settings.name}-{settings.dataset.get('name')}-{digest}.pt"


def train_teacher(settings: TeacherSettings, data: DataBundle, device: torch.device, logger: RunLogger,
                  prefix: str = "teacher/") -> tuple[nn.Module, dict[str, Any]]:
    """Train the configured teacher on the full training split (or on `samples_per_class` per class) with
    cross-entropy, or adversarially (`settings.training`); returns it and its checkpoint payload."""
    data = data.for_teacher(settings.samples_per_class, settings.split_seed)
    torch.manual_seed(settings.seed)
    model = build_model(settings.spec, data.input_shape, data.num_classes, "teacher").to(device)
    optim = OptimSettings("adam", functools.partial(torch.optim.Adam, lr=settings.lr,
                                                    weight_decay=settings.weight_decay), "cosine")
    log.info(f"training teacher {describe_architecture(settings.spec)} on {data.name} ({len(data.train)} training "
             f"samples) for {settings.epochs} epochs, {describe_training(settings.training)}")
    loop = LoopSettings(settings.epochs, settings.batch_size, settings.eval_batch_size,
                        num_workers=settings.num_workers)
    callbacks = [Divergence(prefix), TensorBoard(logger, prefix), *([ProgressBar(prefix)] if interactive() else [])]
    Trainer(loop, optim, device, callbacks=callbacks, prefix=prefix).fit(
        Distiller(model, None, teacher_objective(settings.training, Pixels.of(data), seed=settings.seed)), data,
        torch.Generator().manual_seed(settings.seed))
    metrics = {f"{split}_accuracy": evaluate(model, None, getattr(data, split), settings.eval_batch_size,
                                             device)["accuracy"] for split in ("val", "test")}
    return model, make_checkpoint(model, "teacher", settings.spec, data, metrics)


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


def obtain_teacher(settings: TeacherSettings, data: DataBundle, device: torch.device, logger: RunLogger,
                   world: World, run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher and facts about it: source (weights|checkpoint|cache|trained), path, metrics. Under
    torch.distributed rank 0 obtains it (trains it at most once) and shares it with the other ranks. The
    model is built once in each process: the one trained or loaded here, or on other ranks from rank 0's."""
    model, shared = teacher_model(settings, data, device, logger, run_dir) if world.main else (None, None)
    payload, source, path = broadcast(shared, world)
    if model is None:
        model = model_from_checkpoint(payload, "teacher.checkpoint")
    model = freeze(model.to(device))
    metrics = {f"teacher_{k}": v for k, v in payload.get("metrics", {}).items()}
    test = evaluate(model, None, data.test, settings.eval_batch_size, device, world)["accuracy"]
    metrics["teacher_test_accuracy"] = test
    log.info(f"teacher ({source}: {path}) test accuracy {test:.4f}")
    return model, {"source": source, "path": str(path), **metrics}


def teacher_model(settings: TeacherSettings, data: DataBundle, device: torch.device, logger: RunLogger,
                  run_dir: Path) -> tuple[nn.Module, tuple[dict[str, Any], str, Path]]:
    """(the teacher, (its checkpoint payload, its source, its path)): loaded, cached, or trained and cached."""
    spec = settings.spec
    if settings.checkpoint is None and spec.get("weights") is not None:
        # Published weights (torchvision's ImageNet teachers): used as they are, never trained or cached.
        model = build_model(spec, data.input_shape, data.num_classes, "teacher")
        log.info(f"teacher {spec['arch']} with weights {spec['weights']}")
        return model, (make_checkpoint(model, "teacher", spec, data, {}), "weights", spec["weights"])
    if settings.checkpoint is not None:
        key = "teacher.checkpoint"
        payload = load_teacher_checkpoint(settings.checkpoint, key, spec, data)
        check_fits(payload, key, data, spec, group="teacher")
        return (model_from_checkpoint(payload, key),
                (payload, "checkpoint", Path(str(settings.checkpoint)).expanduser().resolve()))
    model, payload, source, path = cached_teacher(settings, data, device, logger, run_dir)
    return model, (payload, source, path)


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
        return model_from_checkpoint(payload, "cached teacher"), payload
    except (UsageError, OSError) as err:
        log.warning(f"the cached teacher {path} cannot be used ({err}); training it anew")
        return None


def cached_teacher(settings: TeacherSettings, data: DataBundle, device: torch.device, logger: RunLogger,
                   run_dir: Path) -> tuple[nn.Module, dict[str, Any], str, Path]:
    """The teacher from the cache, or trained and cached: (model, payload, source, path).

    A file lock next to the entry makes runs that need the same teacher at the same time train it
    once: the first trains and writes it, the others wait and then load it. flock-based, so a run
    killed while holding it releases it. A cache that cannot be written (read-only, full, a file
    where the directory should be) costs one warning: the run trains the teacher and keeps it in
    its run directory as teacher.pt.
    """
    from filelock import FileLock, Timeout

    path = cache_path(settings)
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
        found = load_cached(path, data, settings.spec)
        if found is not None:
            return found[0], found[1], "cache", path
        if unwritable is not None:
            log.warning(f"the teacher cache {path.parent} cannot be written ({unwritable}); the teacher is "
                        "trained in this run and kept in its run directory as teacher.pt")
        model, payload = train_teacher(settings, data, device, logger)
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
