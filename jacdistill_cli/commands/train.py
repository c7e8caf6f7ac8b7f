"""`jacdistill train`: distil a student from a teacher, logging every loss term to TensorBoard."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jacdistill_cli.errors import one_line_errors
from jacdistill_cli.runtime import register_resolvers

register_resolvers()


@one_line_errors("train")
def run(cfg: DictConfig) -> float:
    """Returns the final validation accuracy, so Hydra sweepers can optimise it."""
    from jacdistill_cli import settings

    settings.validate_train(cfg)  # before any work: nothing is written for a bad value

    import logging

    import torch

    from jacdistill_cli.checkpoints import make_checkpoint, save_checkpoint
    from jacdistill_cli.data import build_data
    from jacdistill_cli.logger import RunLogger
    from jacdistill_cli.models import architecture, build_model, count_parameters
    from jacdistill_cli.objective import build_objective
    from jacdistill_cli.runtime import run_directory, save_resolved_config, seed_everything, select_device, write_json
    from jacdistill_cli.teacher import obtain_teacher
    from jacdistill_cli.trainer import evaluate, fit

    log = logging.getLogger("jacdistill")
    device = select_device(cfg.trainer.device)
    run_dir = run_directory()
    log.info(f"run directory: {run_dir}")
    save_resolved_config(cfg, run_dir)
    seed_everything(cfg.seed)

    data = build_data(cfg.dataset).to(device)
    spec = architecture(cfg.student)
    student = build_model(spec, data.input_shape, data.num_classes, "student")  # checks settings before the teacher
    logger = RunLogger(run_dir)
    try:
        teacher, teacher_info = obtain_teacher(cfg, data, device, logger)
        logger.scalars({"teacher/test_accuracy": teacher_info["teacher_test_accuracy"]}, 0)

        seed_everything(cfg.seed)
        student = build_model(spec, data.input_shape, data.num_classes, "student").to(device)
        log.info(f"student {spec}: {count_parameters(student)} parameters; teacher: {count_parameters(teacher)}")
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        objective = build_objective(cfg, generator)
        history = fit(student, teacher, objective, data, epochs=cfg.trainer.epochs,
                      batch_size=cfg.trainer.batch_size, eval_batch_size=cfg.trainer.eval_batch_size,
                      optim=cfg.optim, device=device, logger=logger,
                      generator=torch.Generator().manual_seed(cfg.seed), num_workers=cfg.trainer.num_workers)
        test = evaluate(student, teacher, data.test, cfg.trainer.eval_batch_size, device)
        metrics = {
            "test_accuracy": test["accuracy"], "agreement": test["agreement"],
            "jacobian_cosine": test["jacobian_cosine"], "val_accuracy": history["accuracy"],
            "val_agreement": history["agreement"], "val_jacobian_cosine": history["jacobian_cosine"],
            "teacher_test_accuracy": teacher_info["teacher_test_accuracy"],
            "train_seconds": history["train_seconds"], "samples_per_second": history["samples_per_second"],
            "epochs": history["epochs"], "steps": history["steps"], "device": str(device),
            "teacher_source": teacher_info["source"], "teacher_checkpoint": teacher_info["path"],
            "student_parameters": count_parameters(student), "teacher_parameters": count_parameters(teacher),
        }
        logger.scalars({"test/accuracy": test["accuracy"], "test/agreement": test["agreement"],
                        "test/jacobian_cosine": test["jacobian_cosine"]}, history["steps"])
    finally:
        logger.close()
    save_checkpoint(make_checkpoint(student, "student", spec, data, {k: v for k, v in metrics.items()
                                                                     if isinstance(v, float)}),
                    run_dir / "student.pt")
    write_json(run_dir / "metrics.json", metrics)
    log.info(f"test accuracy {metrics['test_accuracy']:.4f}  agreement {metrics['agreement']:.4f}  "
             f"jacobian_cosine {metrics['jacobian_cosine']:.4f}  (teacher {metrics['teacher_test_accuracy']:.4f})")
    log.info(f"run directory: {run_dir}")
    return metrics["val_accuracy"]


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)
