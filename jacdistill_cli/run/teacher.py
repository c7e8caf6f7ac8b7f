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
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from jacdistill_cli.storage import write_torch
from jacdistill_cli.zoo.checkpoints import (check_fits, load_checkpoint, load_teacher_checkpoint, make_checkpoint,
                                            model_from_checkpoint)
from jacdistill_cli.zoo.data import DataBundle, split_seed
from jacdistill_cli.errors import UsageError, WriteError
from jacdistill_cli.run.logger import RunLogger
from jacdistill_cli.zoo.models import architecture, build_model, describe_architecture
from jacdistill_cli.config.settings import OptimSettings
from jacdistill_cli.engine.objective import cross_entropy_objective
from jacdistill_cli.run.distributed import SINGLE, World, broadcast
from jacdistill_cli.run.runtime import cache_directory, run_directory
from jacdistill_cli.run.trainer import evaluate, fit

log = logging.getLogger("jacdistill")

TRAINING_KEYS = ("epochs", "batch_size", "lr", "weight_decay")
# Dataset settings that do not change what a teacher trained by the runner sees (max_memory_mb: held in
# memory or read by a DataLoader, the batches are the same).
NOT_TEACHER_DATA = ("samples_per_class", "download", "max_memory_mb")


def freeze(model: nn.Module) -> nn.Module:
    """A teacher is never trained by distillation: eval mode, no parameter gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def teacher_identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that determines a trained teacher."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    training = {k: cfg.teacher[k] for k in TRAINING_KEYS}
    if cfg.teacher.get("samples_per_class") is not None:
        training["samples_per_class"] = cfg.teacher.samples_per_class
    return {
        "dataset": {k: v for k, v in dataset.items() if k not in NOT_TEACHER_DATA},
        "architecture": architecture(cfg.teacher),
        "training": training,
        "seed": cfg.seed,
        "format": 1,
    }


def cache_path(cfg: DictConfig) -> Path:
    identity = teacher_identity(cfg)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_directory(cfg) / "teachers" / f"{cfg.teacher.name}-{cfg.dataset.name}-{digest}.pt"


def check_teacher_settings(cfg: DictConfig, data: DataBundle) -> int | None:
    """Stop on a bad teacher setting before anything is trained or locked; returns teacher.samples_per_class."""
    samples = cfg.teacher.get("samples_per_class")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise UsageError(f"teacher.samples_per_class={samples} is not allowed: it must be null (the full "
                         "training split) or an integer >= 1")
    build_model(architecture(cfg.teacher), data.input_shape, data.num_classes, "teacher")
    return samples


def train_teacher(cfg: DictConfig, data: DataBundle, device: torch.device, logger: RunLogger,
                  prefix: str = "teacher/") -> tuple[nn.Module, dict[str, Any]]:
    """Train the configured teacher with cross-entropy on the full training split (or on
    `teacher.samples_per_class` per class); returns it and its checkpoint payload."""
    spec = architecture(cfg.teacher)
    samples = check_teacher_settings(cfg, data)
    data = data.for_teacher(samples, split_seed(cfg.dataset) if "split_seed" in cfg.dataset else cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(spec, data.input_shape, data.num_classes, "teacher").to(device)
    optim = OptimSettings("adam", functools.partial(torch.optim.Adam, lr=cfg.teacher.lr,
                                                    weight_decay=cfg.teacher.weight_decay), "cosine")
    generator = torch.Generator().manual_seed(cfg.seed)
    log.info(f"training teacher {describe_architecture(spec)} on {data.name} ({len(data.train)} training samples) "
             f"for {cfg.teacher.epochs} epochs")
    fit(model, None, cross_entropy_objective, data, epochs=cfg.teacher.epochs, batch_size=cfg.teacher.batch_size,
        eval_batch_size=cfg.trainer.eval_batch_size, optim=optim, device=device, logger=logger,
        generator=generator, num_workers=cfg.trainer.num_workers, prefix=prefix)
    metrics = {f"{split}_accuracy": evaluate(model, None, getattr(data, split), cfg.trainer.eval_batch_size,
                                             device)["accuracy"] for split in ("val", "test")}
    return model, make_checkpoint(model, "teacher", spec, data, metrics)


def obtain_teacher(cfg: DictConfig, data: DataBundle, device: torch.device, logger: RunLogger,
                   world: World = SINGLE, run_dir: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher and facts about it: source (weights|checkpoint|cache|trained), path, metrics. Under
    torch.distributed rank 0 obtains it (trains it at most once) and shares it with the other ranks."""
    shared = teacher_payload(cfg, data, device, logger, run_dir) if world.main else None
    payload, source, path = broadcast(shared, world)
    model = freeze(model_from_checkpoint(payload, "teacher.checkpoint").to(device))
    metrics = {f"teacher_{k}": v for k, v in payload.get("metrics", {}).items()}
    test = evaluate(model, None, data.test, cfg.trainer.eval_batch_size, device, world)["accuracy"]
    metrics["teacher_test_accuracy"] = test
    log.info(f"teacher ({source}: {path}) test accuracy {test:.4f}")
    return model, {"source": source, "path": str(path), **metrics}


def teacher_payload(cfg: DictConfig, data: DataBundle, device: torch.device, logger: RunLogger,
                    run_dir: Path | None = None) -> tuple[dict[str, Any], str, Path]:
    """(the teacher's checkpoint payload, its source, its path): loaded, cached, or trained and cached."""
    spec = architecture(cfg.teacher)
    if cfg.teacher.checkpoint is None and spec.get("weights") is not None:
        # Published weights (torchvision's ImageNet teachers): used as they are, never trained or cached.
        model = build_model(spec, data.input_shape, data.num_classes, "teacher")
        payload = make_checkpoint(model, "teacher", spec, data, {})
        source, path = "weights", spec["weights"]
        log.info(f"teacher {spec['arch']} with weights {path}")
    elif cfg.teacher.checkpoint is not None:
        key = "teacher.checkpoint"
        payload = load_teacher_checkpoint(cfg.teacher.checkpoint, key, spec, data)
        check_fits(payload, key, data, spec, group="teacher")
        model = model_from_checkpoint(payload, key)
        source, path = "checkpoint", Path(str(cfg.teacher.checkpoint)).expanduser().resolve()
    else:
        _, payload, source, path = cached_teacher(cfg, data, device, logger, run_dir)
    return payload, source, path


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


def cached_teacher(cfg: DictConfig, data: DataBundle, device: torch.device, logger: RunLogger,
                   run_dir: Path | None = None) -> tuple[nn.Module, dict[str, Any], str, Path]:
    """The teacher from the cache, or trained and cached: (model, payload, source, path).

    A file lock next to the entry makes runs that need the same teacher at the same time train it
    once: the first trains and writes it, the others wait and then load it. flock-based, so a run
    killed while holding it releases it. A cache that cannot be written (read-only, full, a file
    where the directory should be) costs one warning: the run trains the teacher and keeps it in
    its run directory as teacher.pt.
    """
    from filelock import FileLock, Timeout

    spec = architecture(cfg.teacher)
    check_teacher_settings(cfg, data)
    path = cache_path(cfg)
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
        found = load_cached(path, data, spec)
        if found is not None:
            return found[0], found[1], "cache", path
        if unwritable is not None:
            log.warning(f"the teacher cache {path.parent} cannot be written ({unwritable}); the teacher is "
                        "trained in this run and kept in its run directory as teacher.pt")
        model, payload = train_teacher(cfg, data, device, logger)
        if unwritable is None:
            try:
                write_torch(path, payload)
                return model, payload, "trained", path
            except WriteError as err:
                log.warning(f"the teacher cache {path.parent} cannot be written ({err}); the teacher trained "
                            "in this run is kept in its run directory as teacher.pt")
        kept = (run_dir or run_directory()) / "teacher.pt"
        write_torch(kept, payload)
        return model, payload, "trained", kept
    finally:
        if lock is not None:
            lock.release()
