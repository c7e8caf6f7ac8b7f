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

from jacdistill_cli.zoo.checkpoints import (check_fits, load_checkpoint, make_checkpoint, model_from_checkpoint,
                                        save_checkpoint)
from jacdistill_cli.zoo.data import DataBundle
from jacdistill_cli.errors import UsageError
from jacdistill_cli.run.logger import RunLogger
from jacdistill_cli.zoo.models import architecture, build_model
from jacdistill_cli.config.settings import OptimSettings
from jacdistill_cli.engine.objective import cross_entropy_objective
from jacdistill_cli.run.runtime import cache_directory
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


def train_teacher(cfg: DictConfig, data: DataBundle, device: torch.device, logger: RunLogger,
                  prefix: str = "teacher/") -> tuple[nn.Module, dict[str, Any]]:
    """Train the configured teacher with cross-entropy on the full training split (or on
    `teacher.samples_per_class` per class); returns it and its checkpoint payload."""
    spec = architecture(cfg.teacher)
    samples = cfg.teacher.get("samples_per_class")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise UsageError(f"teacher.samples_per_class={samples} is not allowed: it must be null (the full "
                         "training split) or an integer >= 1")
    data = data.for_teacher(samples, int(cfg.dataset.get("split_seed", cfg.seed)))
    torch.manual_seed(cfg.seed)
    model = build_model(spec, data.input_shape, data.num_classes, "teacher").to(device)
    optim = OptimSettings("adam", functools.partial(torch.optim.Adam, lr=cfg.teacher.lr,
                                                    weight_decay=cfg.teacher.weight_decay), "cosine")
    generator = torch.Generator().manual_seed(cfg.seed)
    log.info(f"training teacher {spec} on {data.name} ({len(data.train)} training samples) "
             f"for {cfg.teacher.epochs} epochs")
    fit(model, None, cross_entropy_objective, data, epochs=cfg.teacher.epochs, batch_size=cfg.teacher.batch_size,
        eval_batch_size=cfg.trainer.eval_batch_size, optim=optim, device=device, logger=logger,
        generator=generator, num_workers=cfg.trainer.num_workers, prefix=prefix)
    metrics = {f"{split}_accuracy": evaluate(model, None, getattr(data, split), cfg.trainer.eval_batch_size,
                                             device)["accuracy"] for split in ("val", "test")}
    return model, make_checkpoint(model, "teacher", spec, data, metrics)


def obtain_teacher(cfg: DictConfig, data: DataBundle, device: torch.device,
                   logger: RunLogger) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher and facts about it: source (checkpoint|cache|trained), path, metrics."""
    spec = architecture(cfg.teacher)
    if cfg.teacher.checkpoint is not None:
        key = "teacher.checkpoint"
        payload = load_checkpoint(cfg.teacher.checkpoint, key)
        check_fits(payload, key, data, spec, group="teacher")
        source, path = "checkpoint", Path(str(cfg.teacher.checkpoint)).expanduser().resolve()
    else:
        path = cache_path(cfg)
        payload = None
        if path.is_file():
            try:
                payload = load_checkpoint(path, "cached teacher")
                check_fits(payload, "cached teacher", data, spec)
                source = "cache"
            except UsageError as err:
                log.warning(f"ignoring the cached teacher at {path} and training anew: {err}")
                payload = None
        if payload is None:
            model, payload = train_teacher(cfg, data, device, logger)
            save_checkpoint(payload, path)
            source = "trained"
    model = freeze(model_from_checkpoint(payload, "teacher.checkpoint").to(device))
    metrics = {f"teacher_{k}": v for k, v in payload.get("metrics", {}).items()}
    test = evaluate(model, None, data.test, cfg.trainer.eval_batch_size, device)["accuracy"]
    metrics["teacher_test_accuracy"] = test
    log.info(f"teacher ({source}: {path}) test accuracy {test:.4f}")
    return model, {"source": source, "path": str(path), **metrics}
