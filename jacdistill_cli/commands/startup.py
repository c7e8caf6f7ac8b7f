"""What every command does first, one way: the device, the run directory with its resolved config, the
seed, the data; and the config's groups turned into the typed settings that run/ and zoo/ take (the
raw config stops in commands/)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.errors import setting_error


@dataclass
class Startup:
    device: Any        # torch.device
    run_dir: Path


def start(cfg: DictConfig, device_key: str = "trainer.device", write_config: bool = True,
          local_rank: int | None = None, run_dir: Path | None = None) -> Startup:
    """The device of `device_key` (one line for a GPU torch does not see; under torch.distributed the rank's
    `local_rank` GPU), the run directory (Hydra's, unless given; its resolved config.yaml written unless the
    command writes it later), every random stream seeded."""
    from jacdistill_cli.loop.device import seed_everything, select_device
    from jacdistill_cli.records.directory import run_directory

    device = select_device(OmegaConf.select(cfg, device_key), local_rank, key=device_key)
    run_dir = run_dir or run_directory()
    if write_config:
        save_resolved_config(cfg, run_dir)
    seed_everything(cfg.seed)
    return Startup(device, run_dir)


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra saves the config as composed (.hydra/config.yaml); this is the one with values filled in."""
    from jacdistill_cli.storage import write_text

    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def save_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra's `.hydra/` record of the run (config.yaml, hydra.yaml, overrides.yaml), written once the
    directory is known to be this configuration's: train sets `hydra.output_subdir: null`, because
    Hydra would write them before the run could refuse a directory holding another run's record."""
    from hydra.core.hydra_config import HydraConfig

    from jacdistill_cli.storage import write_text

    hydra_cfg = HydraConfig.instance().cfg
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        write_text(run_dir / ".hydra" / name, OmegaConf.to_yaml(node))


def cache_directory(cfg: DictConfig) -> Path:
    """Where teachers trained by the runner are cached (`cache_dir`, default $JACDISTILL_CACHE)."""
    import os

    return Path(os.path.expanduser(str(cfg.cache_dir)))


def data(node: DictConfig, device: Any):
    """The dataset node's bundle (zoo/data.py), its in-memory splits on the device."""
    from jacdistill_cli.zoo.data import build_data

    return build_data(node).to(device)


def loop_settings(cfg: DictConfig):
    """The trainer group's loop settings (run/trainer.py LoopSettings)."""
    from jacdistill_cli.loop.trainer import LoopSettings

    trainer = cfg.trainer
    return LoopSettings(trainer.epochs, trainer.batch_size, trainer.eval_batch_size, trainer.eval_every,
                        trainer.num_workers)


def teacher_settings(cfg: DictConfig):
    """The teacher group, typed (run/teacher.py TeacherSettings); teacher.samples_per_class, teacher.training
    and teacher.adversarial checked here."""
    from jacdistill_cli.loop.teacher import TeacherSettings
    from jacdistill_cli.robustness.settings import teacher_training
    from jacdistill_cli.zoo.data import split_seed
    from jacdistill_cli.zoo.models import architecture

    teacher = cfg.teacher
    samples = teacher.get("samples_per_class")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise setting_error("teacher.samples_per_class", samples, "it must be null (the full training split) or an "
                            "integer >= 1")
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    seed = split_seed(cfg.dataset) if "split_seed" in cfg.dataset else cfg.seed
    checkpoint = teacher.get("checkpoint")
    return TeacherSettings(
        name=teacher.name, spec=architecture(teacher), checkpoint=None if checkpoint is None else str(checkpoint),
        epochs=teacher.epochs, batch_size=teacher.batch_size, lr=teacher.lr, weight_decay=teacher.weight_decay,
        samples_per_class=samples, seed=cfg.seed, split_seed=seed, dataset=dataset,
        cache_dir=cache_directory(cfg) if "cache_dir" in cfg else None, eval_batch_size=cfg.trainer.eval_batch_size,
        num_workers=cfg.trainer.num_workers, training=teacher_training(teacher))


def check_models(cfg: DictConfig, data: Any, objective: Any = None) -> None:
    """Every model setting checked before any work: teacher and student built on the `meta` device (no
    memory, no random numbers drawn); with the objective's settings (config/settings.py ObjectiveSettings),
    a student BatchNorm whose per-sample Jacobian would be wrong refused, and feature matching's module paths
    resolved on them (a wrong path stops the run before a teacher is trained)."""
    import torch

    from jacdistill_cli.engine.batchnorm import refuse_unconverted
    from jacdistill_cli.zoo.models import architecture, build_model

    meta = torch.device("meta")
    features = None if objective is None else objective.features
    matching = features is not None and features.name != "none"
    with meta:
        student = (build_model(architecture(cfg.student), data.input_shape, data.num_classes, "student")
                   if "student" in cfg else None)   # `jacdistill teacher` has none
        if objective is not None and objective.method.uses_gradients:
            refuse_unconverted(student, None, objective.method.batchnorm)
        if cfg.teacher.get("checkpoint") is not None and not matching:
            return   # the checkpoint's own architecture is checked when it is read
        spec = {k: v for k, v in architecture(cfg.teacher).items() if k != "weights"}   # shapes only: no file read
        teacher = build_model(spec, data.input_shape, data.num_classes, "teacher")
    if matching:
        features.matching(teacher, student, data.input_shape, meta)
