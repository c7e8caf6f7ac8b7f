"""`jacdistill teacher`: train a teacher with cross-entropy and save it in the run directory."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jacdistill_cli.config.entry import one_line_errors
from jacdistill_cli.run.runtime import register_resolvers

register_resolvers()


@one_line_errors("teacher")
def run(cfg: DictConfig) -> float:
    """Returns the teacher's validation accuracy."""
    from jacdistill_cli.config import settings

    settings.validate_trainer(cfg)
    settings.validate_teacher_training(cfg)

    import logging

    from jacdistill_cli.zoo.data import build_data
    from jacdistill_cli.run.logger import RunLogger
    from jacdistill_cli.zoo.models import architecture, build_model
    from jacdistill_cli.run.runtime import run_directory, save_resolved_config, seed_everything, select_device
    from jacdistill_cli.storage import write_json, write_torch
    from jacdistill_cli.run.teacher import train_teacher

    log = logging.getLogger("jacdistill")
    device = select_device(cfg.trainer.device)
    run_dir = run_directory()
    log.info(f"run directory: {run_dir}")
    save_resolved_config(cfg, run_dir)
    seed_everything(cfg.seed)
    data = build_data(cfg.dataset).to(device)
    build_model(architecture(cfg.teacher), data.input_shape, data.num_classes, "teacher")  # settings check
    logger = RunLogger(run_dir)
    try:
        _, payload = train_teacher(cfg, data, device, logger, prefix="")
        logger.scalars({"test/accuracy": payload["metrics"]["test_accuracy"]}, 0)
    finally:
        logger.close()
    path = run_dir / "teacher.pt"
    write_torch(path, payload)
    write_json(run_dir / "metrics.json", payload["metrics"])
    log.info(f"teacher test accuracy {payload['metrics']['test_accuracy']:.4f}; checkpoint: {path}")
    from jacdistill_cli.zoo.checkpoints import matching_overrides

    dataset = "" if data.name == "digits" else f"dataset={data.name} "
    log.info(f"use it with: jacdistill train {dataset}{matching_overrides(payload['architecture'], 'teacher')} "
             f"teacher.checkpoint={path}")
    log.info(f"run directory: {run_dir}")
    return payload["metrics"]["val_accuracy"]


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="teacher")
def main(cfg: DictConfig) -> float:
    return run(cfg)
