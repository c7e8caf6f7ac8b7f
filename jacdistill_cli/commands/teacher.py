"""`jacdistill teacher`: train a teacher (with cross-entropy, or adversarially: teacher.training) on the
dataset's full training split and save it in the run directory."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.entry import hydra_choices, one_line_errors
from jacdistill_cli.config.resolvers import register_resolvers

register_resolvers()


@one_line_errors("teacher")
def run(cfg: DictConfig) -> float:
    """Returns the teacher's validation accuracy."""
    import logging
    import sys

    import torch

    from jacdistill_cli.errors import Diverged
    from jacdistill_cli.loop.device import seed_everything, select_device
    from jacdistill_cli.loop.logger import RunLogger
    from jacdistill_cli.loop.teacher import TeacherJob, train_teacher, try_teacher
    from jacdistill_cli.records.directory import run_directory
    from jacdistill_cli.spec.build import teacher_run_spec
    from jacdistill_cli.storage import write_json, write_text, write_torch
    from jacdistill_cli.zoo.checkpoints import matching_overrides
    from jacdistill_cli.zoo.data import build_data

    log = logging.getLogger("jacdistill")
    spec = teacher_run_spec(cfg, hydra_choices())   # every setting checked once: a bad value is refused here
    device = select_device(spec.loop.device)
    if spec.loop.threads is not None:
        torch.set_num_threads(spec.loop.threads)
    seed_everything(spec.seed)
    data = build_data(OmegaConf.create(spec.data.node)).to(device)
    try_teacher(spec.teacher, data)                 # the model tried on the data before any epoch
    run_dir = run_directory()
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(spec.config)))
    log.info(f"run directory: {run_dir}")
    job = TeacherJob(spec.teacher, spec.data, spec.seed, spec.loop.eval_batch_size, spec.loop.num_workers)
    logger = RunLogger(run_dir)
    try:
        _, payload = train_teacher(job, data, device, logger, prefix="")
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
    dataset = "" if data.name == "digits" else f"dataset={data.name} "
    log.info(f"use it with: jacdistill train {dataset}{matching_overrides(payload['architecture'], 'teacher')} "
             f"teacher.checkpoint={path}")
    log.info(f"run directory: {run_dir}")
    return payload["metrics"]["val_accuracy"]


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="teacher")
def main(cfg: DictConfig) -> float:
    return run(cfg)
