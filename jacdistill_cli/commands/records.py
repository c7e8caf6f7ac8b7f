"""What a train run records about itself: its hyperparameters (TensorBoard's HPARAMS tab) and the summary
table a single run ends with."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.registry import label

NOT_HPARAMS = {"cache_dir"}


def compact(node: DictConfig) -> str:
    """A model node's architecture on one line: `mlp(hidden=[64], batchnorm=False)`."""
    from jacdistill_cli.zoo.models import architecture, describe_architecture

    return describe_architecture(architecture(node))


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
    hparams["loss"] = label("loss", cfg.loss)
    hparams["jacobian"] = label("jacobian", cfg.jacobian)
    for key, value in cfg.jacobian.items():
        if key not in ("name", "_target_") and isinstance(value, (int, float, str, bool)):
            hparams[f"jacobian.{key}"] = value
    hparams["teacher"] = str(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else compact(cfg.teacher)
    hparams["student"] = compact(cfg.student)
    hparams["dataset"] = label("dataset", cfg.dataset)
    hparams["samples_per_class"] = OmegaConf.select(cfg, "dataset.samples_per_class", default=None)
    from jacdistill_cli.engine.pairs import parse_pairs

    hparams["features"] = label("features", cfg.features) if OmegaConf.select(cfg, "features") else "none"
    if hparams["features"] != "none":
        for key, value in cfg.features.items():
            if key not in ("name", "_target_"):
                hparams[f"features.{key}"] = value if isinstance(value, (int, float, str, bool)) else (
                    "architecture defaults" if value is None else str([list(p) for p in parse_pairs(value)]))
    hparams["optim"] = label("optim", cfg.optim)
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
    """What a single run ends with on stdout: the student's test metrics beside the teacher's accuracy (and
    each attack's robust accuracy of both, with robustness=), then time, device and where the run is."""
    rows = [("test accuracy", f"{metrics['test_accuracy']:.4f}", f"{metrics['teacher_test_accuracy']:.4f}"),
            ("agreement with the teacher", f"{metrics['agreement']:.4f}", ""),
            ("input-gradient cosine", f"{metrics['jacobian_cosine']:.4f}", ""),
            ("val accuracy", f"{metrics['val_accuracy']:.4f}", "")]
    teacher = metrics.get("teacher_robust_accuracy", {})
    rows += [(f"robust {key}", f"{value:.4f}", f"{teacher[key]:.4f}" if key in teacher else "")
             for key, value in metrics.get("robust_accuracy", {}).items() if key != "clean"]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'':{width}}  student  teacher", *(f"{n:{width}}  {s:>7}  {t:>7}".rstrip() for n, s, t in rows),
             f"{metrics['epochs']} epoch{'s' if metrics['epochs'] != 1 else ''}, {metrics['steps']} steps in "
             f"{metrics['train_seconds']:.1f} s "
             f"({metrics['samples_per_second']:.0f} samples/s) on {metrics['device']}, seed {metrics['seed']}",
             *([f"robust accuracy on the first {metrics['robust_samples']} test samples (epsilon in pixel scale), "
                f"{metrics['robust_seconds']:.1f} s"] if "robust_samples" in metrics else []),
             f"run directory: {run_dir}"]
    return "\n".join(lines)
