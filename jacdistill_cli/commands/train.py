"""`jacdistill train`: distil a student from a teacher, logging every loss term to TensorBoard."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.errors import one_line_errors
from jacdistill_cli.run.runtime import register_resolvers

register_resolvers()

# Custom-scalars layout: the loss terms in one chart (a term a run does not log is simply absent).
CHARTS = {"loss": {"loss terms": ["^loss/distill$", "^loss/jacobian$", "^loss/total$", "^loss/hard$",
                                  "^loss/features$"]},
          "validation": {"agreement and accuracy": ["^val/accuracy$", "^val/agreement$", "^val/jacobian_cosine$"]}}
NOT_HPARAMS = {"cache_dir"}


def compact(node: DictConfig) -> str:
    """A model node's architecture on one line: `mlp(hidden=[64], batchnorm=False)`."""
    from jacdistill_cli.zoo.models import architecture

    settings = architecture(node)
    name = settings.pop("name", "?")
    return f"{name}({', '.join(f'{k}={v}' for k, v in settings.items())})"


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The run's hyperparameters, flat, for TensorBoard's HPARAMS tab: every top-level setting (alpha,
    temperature, hard_weight, seed, ...), the distillation loss, the Jacobian method and each of its
    settings, teacher, student, dataset, samples_per_class (None: the whole training split), optimiser."""
    hparams: dict[str, Any] = {key: value for key, value in cfg.items()
                               if key not in NOT_HPARAMS and isinstance(value, (int, float, str, bool))}
    hparams["loss"] = cfg.loss.name
    hparams["jacobian"] = cfg.jacobian.name
    for key, value in cfg.jacobian.items():
        if key != "name" and isinstance(value, (int, float, str, bool)):
            hparams[f"jacobian.{key}"] = value
    hparams["teacher"] = str(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else compact(cfg.teacher)
    hparams["student"] = compact(cfg.student)
    hparams["dataset"] = cfg.dataset.name
    hparams["samples_per_class"] = OmegaConf.select(cfg, "dataset.samples_per_class", default=None)
    from jacdistill_cli.engine.features import parse_pairs

    hparams["features"] = OmegaConf.select(cfg, "features.name", default="none")
    if hparams["features"] != "none":
        for key, value in cfg.features.items():
            if key != "name":
                hparams[f"features.{key}"] = value if isinstance(value, (int, float, str, bool)) else (
                    "architecture defaults" if value is None else str([list(p) for p in parse_pairs(value)]))
    hparams["optim"] = cfg.optim.name
    hparams["optim.lr"] = cfg.optim.lr
    hparams["trainer.epochs"] = cfg.trainer.epochs
    hparams["trainer.batch_size"] = cfg.trainer.batch_size
    return hparams


@one_line_errors("train")
def run(cfg: DictConfig) -> float:
    """Returns the final validation accuracy, so Hydra sweepers can optimise it."""
    from jacdistill_cli.config import settings
    from jacdistill_cli.run import resume

    settings.validate_train(cfg)  # before any work: nothing is written for a bad value
    resume.validate(cfg)

    import torch

    from jacdistill_cli.run.runtime import run_directory, select_device

    device = select_device(cfg.trainer.device)
    if OmegaConf.select(cfg, "trainer.threads", default=None) is not None:
        torch.set_num_threads(cfg.trainer.threads)  # small models: threads that wait on each other cost more
    run_dir = run_directory()
    with resume.DirectoryLock(run_dir), resume.Signals() as signals:
        try:
            return train(cfg, run_dir, device, signals)
        except resume.Interrupted as stop:
            stopped(cfg, run_dir, stop)


def train(cfg: DictConfig, run_dir, device, signals) -> float:
    """The run in its directory: skipped when this configuration finished there, continued from
    last.pt when it was interrupted, otherwise from the start."""
    import logging

    import torch

    from jacdistill_cli.run import resume
    from jacdistill_cli.zoo.checkpoints import make_checkpoint, save_checkpoint
    from jacdistill_cli.zoo.data import build_data
    from jacdistill_cli.run.logger import RunLogger
    from jacdistill_cli.zoo.models import architecture, build_model, count_parameters
    from jacdistill_cli.engine.features import build_objective_with_features, check_feature_paths
    from jacdistill_cli.run.runtime import save_resolved_config, seed_everything, write_json
    from jacdistill_cli.run.saliency import fixed_inputs
    from jacdistill_cli.run.teacher import obtain_teacher
    from jacdistill_cli.run.trainer import evaluate, fit

    log = logging.getLogger("jacdistill")
    claim = resume.claim_directory(cfg, run_dir)  # another configuration's results: refused here
    log.info(f"run directory: {run_dir}")
    if claim.finished is not None:
        log.info(f"this configuration finished in {run_dir} already (trainer.resume=auto): nothing to do")
        return float(claim.finished.get("val_accuracy", float("nan")))
    resume.remove_stale_temporaries(run_dir)
    if claim.restart:
        for name in (resume.LAST, resume.BEST, "metrics.json"):
            (run_dir / name).unlink(missing_ok=True)
    resume.save_hydra_files(cfg, run_dir)
    save_resolved_config(cfg, run_dir)
    seed_everything(cfg.seed)

    data = build_data(cfg.dataset).to(device)
    spec = architecture(cfg.student)
    student = build_model(spec, data.input_shape, data.num_classes, "student")  # checks settings before the teacher
    check_feature_paths(cfg, student, data.input_shape, data.num_classes)  # a wrong module path stops here
    state = resume.load_state(claim.resume) if claim.resume is not None else None
    resumed_step = None if state is None else int(state["progress"]["step"])
    if resumed_step is not None or claim.restart:
        resume.drop_session_end(run_dir)  # the interrupted session's end; this one ends it again
    # Continued: earlier files' events after the saved step are dropped; started over: all of them.
    logger = RunLogger(run_dir, purge_step=resumed_step + 1 if resumed_step is not None else
                       0 if claim.restart else None)
    if resumed_step is None:
        logger.layout(CHARTS)
        logger.hparams_start(hparams_of(cfg))  # its metrics: the final test/..., val/... scalars
    else:
        logger.hparams_continue()
    succeeded = False
    feature_matching = checkpoint = None
    try:
        teacher, teacher_info = obtain_teacher(cfg, data, device, logger)
        if resumed_step is None:
            logger.scalars({"teacher/test_accuracy": teacher_info["teacher_test_accuracy"]}, 0)

        seed_everything(cfg.seed)
        student = build_model(spec, data.input_shape, data.num_classes, "student").to(device)
        log.info(f"student {spec}: {count_parameters(student)} parameters; teacher: {count_parameters(teacher)}")
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        objective, feature_matching = build_objective_with_features(cfg, teacher, student, data.input_shape, device,
                                                                    generator)
        if feature_matching is not None:
            log.info(f"features={feature_matching.method}: " + "; ".join(p.describe() for p in feature_matching.pairs))

        def student_payload(metrics: dict) -> dict:
            payload = make_checkpoint(student, "student", spec, data, metrics)
            if feature_matching is not None:
                payload["features"] = feature_matching.checkpoint_entry()  # the hint regressors
            return payload

        batch_generator = torch.Generator().manual_seed(cfg.seed)
        checkpoint = resume.Checkpointer(
            run_dir, every_steps=OmegaConf.select(cfg, "trainer.save_every_steps", default=None),
            generators={"batches": batch_generator, "objective": generator},
            modules={"features": feature_matching} if feature_matching is not None else {},
            best_payload=lambda val: student_payload({f"val_{k}": v for k, v in val.items()}),
            signals=signals, flush=logger.flush, state=state)
        history = fit(student, teacher, objective, data, epochs=cfg.trainer.epochs,
                      batch_size=cfg.trainer.batch_size, eval_batch_size=cfg.trainer.eval_batch_size,
                      optim=cfg.optim, device=device, logger=logger,
                      generator=batch_generator, num_workers=cfg.trainer.num_workers,
                      eval_every=cfg.trainer.eval_every, saliency_inputs=fixed_inputs(data.val, device),
                      objective_parameters=feature_matching.parameters() if feature_matching is not None else (),
                      checkpoint=checkpoint)
        selected = {"selected": cfg.trainer.select, "best_epoch": checkpoint.best["epoch"],
                    "best_step": checkpoint.best["step"], "best_val_accuracy": checkpoint.best["val_accuracy"]}
        val = {k: history[k] for k in ("accuracy", "agreement", "jacobian_cosine")}
        if cfg.trainer.select == "best":
            best = resume.load_best(run_dir / resume.BEST, student, feature_matching)
            val = {k: best["metrics"][f"val_{k}"] for k in val}
        test = evaluate(student, teacher, data.test, cfg.trainer.eval_batch_size, device)
        metrics = {
            "status": resume.FINISHED, **selected,
            "test_accuracy": test["accuracy"], "agreement": test["agreement"],
            "jacobian_cosine": test["jacobian_cosine"], "val_accuracy": val["accuracy"],
            "val_agreement": val["agreement"], "val_jacobian_cosine": val["jacobian_cosine"],
            "teacher_test_accuracy": teacher_info["teacher_test_accuracy"],
            "train_seconds": history["train_seconds"], "samples_per_second": history["samples_per_second"],
            "epochs": history["epochs"], "steps": history["steps"], "device": str(device),
            "teacher_source": teacher_info["source"], "teacher_checkpoint": teacher_info["path"],
            "student_parameters": count_parameters(student), "teacher_parameters": count_parameters(teacher),
        }
        with signals.deferring(raise_pending=False):  # the results are written whole, whatever arrives
            logger.scalars({"test/accuracy": test["accuracy"], "test/agreement": test["agreement"],
                            "test/jacobian_cosine": test["jacobian_cosine"]}, history["steps"])
            succeeded = True
            logger.hparams_end(succeeded)
            logger.close()
            save_checkpoint(student_payload({k: v for k, v in metrics.items() if isinstance(v, float)}),
                            run_dir / "student.pt")
            write_json(run_dir / "metrics.json", metrics)
    except resume.Interrupted as stop:
        logger.hparams_end(False)
        logger.close()
        if stop.progress is None and checkpoint is not None:
            stop.progress = checkpoint.progress
        raise
    except Exception as err:
        # In the run's train.log, where `jacdistill report` finds why a job of a sweep has no metrics.
        log.error(f"failed: {type(err).__name__}: {err}")
        logger.hparams_end(False)
        logger.close()
        raise
    log.info(f"test accuracy {metrics['test_accuracy']:.4f}  agreement {metrics['agreement']:.4f}  "
             f"jacobian_cosine {metrics['jacobian_cosine']:.4f}  (teacher {metrics['teacher_test_accuracy']:.4f})"
             + (f"  from the best epoch {selected['best_epoch']}" if cfg.trainer.select == "best" else ""))
    log.info(f"run directory: {run_dir}")
    if signals.pending is not None:
        raise resume.Interrupted(signals.pending, None, finished=True)
    return metrics["val_accuracy"]


def stopped(cfg: DictConfig, run_dir, stop) -> None:
    """After a signal: metrics.json says interrupted (unless the run had finished), one line says
    how to resume, SIGUSR1 under SLURM requeues the job; exit status 128 + the signal's number."""
    import logging
    import sys

    from jacdistill_cli.run import resume
    from jacdistill_cli.run.runtime import write_json

    log = logging.getLogger("jacdistill")
    name = resume.SIGNALS.get(stop.signum, str(stop.signum))
    command = resume.resume_command(run_dir)
    if stop.finished:
        line = f"stopped by {name} after the run finished; its results are in {run_dir}"
    else:
        at = stop.progress
        where = f"at epoch {at.epoch}, step {at.step}" if at is not None else "before training began"
        saved = (run_dir / resume.LAST).is_file()
        if (run_dir / "config.yaml").is_file():  # else stopped before the directory was claimed: no record
            write_json(run_dir / "metrics.json", {
                "status": resume.INTERRUPTED, "signal": name, "epoch": at.epoch if at else None,
                "step": at.step if at else None, "last_checkpoint": str(run_dir / resume.LAST) if saved else None,
                "resume": command})
        line = f"interrupted by {name} {where}{' (last.pt saved)' if saved else ''}; resume with: {command}"
    log.warning(line)
    warning = resume.requeue_under_slurm() if stop.signum == resume.signal.SIGUSR1 else None
    print(f"jacdistill train: {line}", file=sys.stderr)
    if warning:
        print(f"jacdistill train: warning: {warning}", file=sys.stderr)
    raise SystemExit(128 + int(stop.signum))


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)
