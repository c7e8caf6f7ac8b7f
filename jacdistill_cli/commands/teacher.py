"""`jacdistill teacher`: train a teacher (with cross-entropy, or adversarially: teacher.training) and save it in
the run directory."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jacdistill_cli.config.entry import one_line_errors
from jacdistill_cli.config.resolvers import register_resolvers

register_resolvers()


@one_line_errors("teacher")
def run(cfg: DictConfig) -> float:
    """Returns the teacher's validation accuracy."""
    from jacdistill_cli.config import settings
    from jacdistill_cli.robustness.settings import robustness_settings, teacher_training

    settings.validate_trainer(cfg)
    settings.validate_teacher_training(cfg)
    teacher_training(cfg.teacher)
    robustness_settings(cfg.get("robustness"), seed=cfg.seed)

    import logging
    import sys

    from jacdistill_cli.commands.startup import check_models, data, start, teacher_settings
    from jacdistill_cli.loop.callbacks import Diverged
    from jacdistill_cli.loop.logger import RunLogger
    from jacdistill_cli.loop.teacher import train_teacher
    from jacdistill_cli.storage import write_json, write_torch
    from jacdistill_cli.zoo.checkpoints import matching_overrides

    log = logging.getLogger("jacdistill")
    typed = teacher_settings(cfg)
    startup = start(cfg)
    run_dir = startup.run_dir
    log.info(f"run directory: {run_dir}")
    bundle = data(cfg.dataset, startup.device)
    check_models(cfg, bundle)
    logger = RunLogger(run_dir)
    try:
        _, payload = train_teacher(typed, bundle, startup.device, logger, prefix="")
        logger.scalars({"test/accuracy": payload["metrics"]["test_accuracy"]}, 0)
    except Diverged as err:   # one line, exit status 1, no teacher.pt
        print(f"jacdistill teacher: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        logger.close()
    path = run_dir / "teacher.pt"
    write_torch(path, payload)
    write_json(run_dir / "metrics.json", payload["metrics"])
    log.info(f"teacher test accuracy {payload['metrics']['test_accuracy']:.4f}; checkpoint: {path}")
    dataset = "" if bundle.name == "digits" else f"dataset={bundle.name} "
    log.info(f"use it with: jacdistill train {dataset}{matching_overrides(payload['architecture'], 'teacher')} "
             f"teacher.checkpoint={path}")
    log.info(f"run directory: {run_dir}")
    return payload["metrics"]["val_accuracy"]


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="teacher")
def main(cfg: DictConfig) -> float:
    return run(cfg)
