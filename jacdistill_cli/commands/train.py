"""`jacdistill train`: distil a student from a teacher, logging every loss term to TensorBoard."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.errors import one_line_errors
from jacdistill_cli.run.runtime import register_resolvers

register_resolvers()

# Custom-scalars layout: one chart per loss term the run logs and per validation metric, each drawn with
# every run of the sweep (TensorBoard merges the runs' layouts, so a term no run logs gets no chart).
VAL_METRICS = ("accuracy", "agreement", "jacobian_cosine")


def charts(terms: list[str]) -> dict[str, dict[str, list[str]]]:
    """The layout for a run whose objective returns `terms` (total first)."""
    ordered = sorted(terms, key=lambda term: term != "total")
    return {"loss terms (per step)": {f"loss/{term}": [f"^loss/{term}$"] for term in ordered},
            "validation (per evaluation)": {f"val/{name}": [f"^val/{name}$"] for name in VAL_METRICS}}


def with_layout(objective, logger):
    """`objective`, which writes the run's custom-scalars layout when its first step shows the terms."""
    written = False

    def first_step_writes_layout(student, teacher, inputs, labels):
        nonlocal written
        logits, terms = objective(student, teacher, inputs, labels)
        if not written:
            logger.layout(charts(list(terms)))
            written = True
        return logits, terms

    return first_step_writes_layout


NOT_HPARAMS = {"cache_dir"}


def compact(node: DictConfig) -> str:
    """A model node's architecture on one line: `mlp(hidden=[64], batchnorm=False)`."""
    from jacdistill_cli.zoo.models import architecture

    settings = architecture(node)
    name = settings.pop("name", "?")
    return f"{name}({', '.join(f'{k}={v}' for k, v in settings.items())})"


def choice_of(group: str) -> str | None:
    """The option chosen for a config group without keys of its own (recipe, experiment), or None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The run's hyperparameters, flat, for TensorBoard's HPARAMS tab: every top-level setting (alpha,
    temperature, hard_weight, seed, ...), the recipe and experiment preset, the distillation loss, the
    Jacobian method and each of its settings, teacher, student, dataset, samples_per_class (None: the whole
    training split), optimiser."""
    hparams: dict[str, Any] = {key: value for key, value in cfg.items()
                               if key not in NOT_HPARAMS and isinstance(value, (int, float, str, bool))}
    hparams["recipe"] = choice_of("recipe")
    hparams["experiment"] = choice_of("experiment")
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


def single_run() -> bool:
    """Whether this is a single run (not a job of a multirun, whose sweep ends with its report)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN


def summary_table(metrics: dict[str, Any], run_dir) -> str:
    """What a single run ends with on stdout: the student's test metrics beside the teacher's accuracy,
    then time, device and where the run is."""
    rows = [("test accuracy", f"{metrics['test_accuracy']:.4f}", f"{metrics['teacher_test_accuracy']:.4f}"),
            ("agreement with the teacher", f"{metrics['agreement']:.4f}", ""),
            ("input-gradient cosine", f"{metrics['jacobian_cosine']:.4f}", ""),
            ("val accuracy", f"{metrics['val_accuracy']:.4f}", "")]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'':{width}}  student  teacher", *(f"{n:{width}}  {s:>7}  {t:>7}".rstrip() for n, s, t in rows),
             f"{metrics['epochs']} epochs, {metrics['steps']} steps in {metrics['train_seconds']:.1f} s "
             f"({metrics['samples_per_second']:.0f} samples/s) on {metrics['device']}, seed {metrics['seed']}",
             f"run directory: {run_dir}"]
    return "\n".join(lines)


@one_line_errors("train")
def run(cfg: DictConfig) -> float:
    """Returns the final validation accuracy, so Hydra sweepers can optimise it."""
    from jacdistill_cli.config import settings
    from jacdistill_cli.errors import setting_error
    from jacdistill_cli.run.runtime import SALIENCY_MODES

    if OmegaConf.select(cfg, "trainer.saliency", default="abs") not in SALIENCY_MODES:
        raise setting_error("trainer.saliency", cfg.trainer.saliency,
                            f"it must be one of {', '.join(SALIENCY_MODES)}")
    settings.validate_train(cfg)  # before any work: nothing is written for a bad value

    import logging

    import torch

    from jacdistill_cli.zoo.checkpoints import make_checkpoint, save_checkpoint
    from jacdistill_cli.zoo.data import build_data
    from jacdistill_cli.run.logger import RunLogger
    from jacdistill_cli.zoo.models import architecture, build_model, count_parameters
    from jacdistill_cli.engine.features import build_objective_with_features, check_feature_paths
    from jacdistill_cli.run.runtime import (describe_device, run_directory, save_resolved_config, seed_everything,
                                            select_device, write_json)
    from jacdistill_cli.run.saliency import fixed_inputs
    from jacdistill_cli.run.teacher import obtain_teacher
    from jacdistill_cli.run.trainer import evaluate, fit

    log = logging.getLogger("jacdistill")
    device = select_device(cfg.trainer.device)
    if OmegaConf.select(cfg, "trainer.threads", default=None) is not None:
        torch.set_num_threads(cfg.trainer.threads)  # small models: threads that wait on each other cost more
    run_dir = run_directory()
    log.info(f"run directory: {run_dir}")
    save_resolved_config(cfg, run_dir)
    seed_everything(cfg.seed)

    data = build_data(cfg.dataset).to(device)
    spec = architecture(cfg.student)
    student = build_model(spec, data.input_shape, data.num_classes, "student")  # checks settings before the teacher
    check_feature_paths(cfg, student, data.input_shape, data.num_classes)  # a wrong module path stops here
    logger = RunLogger(run_dir)
    logger.hparams_start(hparams_of(cfg))  # its metrics: the final test/..., val/... scalars
    succeeded = False
    feature_matching = None
    try:
        teacher, teacher_info = obtain_teacher(cfg, data, device, logger)
        logger.scalars({"teacher/test_accuracy": teacher_info["teacher_test_accuracy"]}, 0)

        seed_everything(cfg.seed)
        student = build_model(spec, data.input_shape, data.num_classes, "student").to(device)
        log.info(f"student {spec}: {count_parameters(student)} parameters; teacher: {count_parameters(teacher)}")
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        objective, feature_matching = build_objective_with_features(cfg, teacher, student, data.input_shape, device,
                                                                    generator)
        if feature_matching is not None:
            log.info(f"features={feature_matching.method}: " + "; ".join(p.describe() for p in feature_matching.pairs))
        history = fit(student, teacher, with_layout(objective, logger), data, epochs=cfg.trainer.epochs,
                      batch_size=cfg.trainer.batch_size, eval_batch_size=cfg.trainer.eval_batch_size,
                      optim=cfg.optim, device=device, logger=logger,
                      generator=torch.Generator().manual_seed(cfg.seed), num_workers=cfg.trainer.num_workers,
                      eval_every=cfg.trainer.eval_every, saliency_inputs=fixed_inputs(data.val, device),
                      saliency=OmegaConf.select(cfg, "trainer.saliency", default="abs"),
                      objective_parameters=feature_matching.parameters() if feature_matching is not None else ())
        test = evaluate(student, teacher, data.test, cfg.trainer.eval_batch_size, device)
        metrics = {
            "test_accuracy": test["accuracy"], "agreement": test["agreement"],
            "jacobian_cosine": test["jacobian_cosine"], "val_accuracy": history["accuracy"],
            "val_agreement": history["agreement"], "val_jacobian_cosine": history["jacobian_cosine"],
            "teacher_test_accuracy": teacher_info["teacher_test_accuracy"],
            "train_seconds": history["train_seconds"], "samples_per_second": history["samples_per_second"],
            "epochs": history["epochs"], "steps": history["steps"], "seed": cfg.seed, "status": "finished",
            "device": describe_device(device), "torch": torch.__version__,
            "teacher_source": teacher_info["source"], "teacher_checkpoint": teacher_info["path"],
            "student_parameters": count_parameters(student), "teacher_parameters": count_parameters(teacher),
        }
        logger.scalars({"test/accuracy": test["accuracy"], "test/agreement": test["agreement"],
                        "test/jacobian_cosine": test["jacobian_cosine"],
                        # at the first and the last step: a level line to read the student's curves against
                        "teacher/test_accuracy": teacher_info["teacher_test_accuracy"]}, history["steps"])
        succeeded = True
    except Exception as err:
        # In the run's train.log, where `jacdistill report` finds why a job of a sweep has no metrics.
        log.error(f"failed: {type(err).__name__}: {err}")
        raise
    finally:
        logger.hparams_end(succeeded)
        logger.close()
    payload = make_checkpoint(student, "student", spec, data, {k: v for k, v in metrics.items() if isinstance(v, float)})
    if feature_matching is not None:
        payload["features"] = feature_matching.checkpoint_entry()  # the hint regressors, trained with the student
    save_checkpoint(payload, run_dir / "student.pt")
    write_json(run_dir / "metrics.json", metrics)
    log.info(f"test accuracy {metrics['test_accuracy']:.4f}  agreement {metrics['agreement']:.4f}  "
             f"jacobian_cosine {metrics['jacobian_cosine']:.4f}  (teacher {metrics['teacher_test_accuracy']:.4f})")
    log.info(f"run directory: {run_dir}")
    if single_run():
        print(summary_table(metrics, run_dir))
    return metrics["val_accuracy"]


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)
