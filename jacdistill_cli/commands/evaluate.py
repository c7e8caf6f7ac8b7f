"""`jacdistill evaluate checkpoint=PATH [teacher.checkpoint=PATH]`: a checkpoint on the test split."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.entry import one_line_errors
from jacdistill_cli.config.resolvers import register_resolvers
from jacdistill_cli.errors import UsageError, setting_error

register_resolvers()

# Dataset settings that may differ between training and evaluation without changing the test split.
SPLIT_NEUTRAL = {"samples_per_class", "augment", "download", "root", "verify", "max_memory_mb"}


def validate(cfg: DictConfig) -> list[float]:
    """Check the settings before any work (the robustness node too); returns the sigmas."""
    from jacdistill_cli.config import settings

    if cfg.checkpoint is None or str(cfg.checkpoint).strip() == "":
        raise UsageError("checkpoint=null is not allowed: give a checkpoint written by `jacdistill train` or "
                         "`jacdistill teacher`, e.g. checkpoint=outputs/train/DATE/TIME/student.pt")
    settings.integer(cfg, "seed", low=0, allowed="it must be an integer >= 0")
    settings.integer(cfg, "trainer.eval_batch_size", low=1, allowed="it must be an integer >= 1")
    settings.choice(cfg, "trainer.device", settings.DEVICES)
    sigmas = OmegaConf.to_container(cfg.sigmas, resolve=True) if OmegaConf.is_list(cfg.sigmas) else cfg.sigmas
    if not isinstance(sigmas, list) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0 for s in sigmas):
        raise setting_error("sigmas", sigmas, "it must be a list of numbers >= 0, e.g. sigmas=[0.1,0.5]")
    robustness(cfg)
    return [float(s) for s in sigmas]


def robustness(cfg: DictConfig):
    """The attacks of the `robustness` node (robustness/settings.py), seeded by `seed`."""
    from jacdistill_cli.robustness.settings import robustness_settings

    return robustness_settings(cfg.get("robustness"), seed=cfg.seed)


def robust_metrics(models: dict[str, Any], data, device, cfg: DictConfig) -> dict[str, dict[str, float]]:
    """{model name: robust_accuracy(...)} on the test split ({} without attacks); the model is attacked
    with the teacher as the source of transfer attacks, the teacher without any."""
    from jacdistill_cli.robustness.measure import robust_accuracy
    from jacdistill_cli.robustness.pixels import Pixels

    settings = robustness(cfg)
    if not settings.enabled:
        return {}
    pixels = Pixels.of(data)
    return {name: robust_accuracy(model, data.test, pixels, device, settings,
                                  teacher=models.get("teacher") if name == "model" else None)
            for name, model in models.items()}


def with_dataset_target(stored: dict, cfg: DictConfig) -> dict:
    """The stored dataset settings with a `_target_` of jacdistill's own: a checkpoint names no code to import
    (a stored target outside the package, or none in an older checkpoint, is replaced by the shipped option's)."""
    from jacdistill_cli.config.registry import shipped_options

    if str(stored.get("_target_", "")).startswith("jacdistill_cli."):
        return stored
    shipped = shipped_options("dataset").get(str(stored.get("name")))
    if shipped is None:
        raise UsageError(f"checkpoint={str(cfg.checkpoint)!r} was trained on a dataset jacdistill does not ship "
                         f"({stored.get('_target_') or stored.get('name')!r}); name the dataset to evaluate on, "
                         "e.g. dataset=NAME with --config-dir for your own")
    return {**stored, "_target_": shipped}


def dataset_node(cfg: DictConfig, payload: dict[str, Any]) -> DictConfig:
    """The dataset to evaluate on: the one given, else the one stored in the checkpoint."""
    import logging

    stored = payload.get("dataset_config")
    if cfg.get("dataset") is None:
        if not stored:
            raise UsageError(f"checkpoint={str(cfg.checkpoint)!r} does not record its dataset settings; "
                             "name the dataset, e.g. dataset=digits")
        stored = dict(stored)
        if stored.get("root") is not None:
            # A checkpoint is a file from anywhere: where data files are read from is the user's word.
            root = cfg.get("dataset_root")
            if root is None or str(root).strip() == "":
                raise UsageError(
                    f"dataset_root=null is not allowed: checkpoint={str(cfg.checkpoint)!r} was trained on "
                    f"{stored.get('name')} read from {stored['root']}, and files are read only from a directory "
                    f"you name: add dataset_root={stored['root']} if you trust it, or name the dataset, e.g. "
                    f"dataset={stored.get('name')} dataset.root=DIR")
            stored["root"] = str(root)
        return OmegaConf.create(with_dataset_target(stored, cfg))
    if cfg.get("dataset_root") is not None:
        raise setting_error("dataset_root", str(cfg.dataset_root), "it applies to the dataset settings stored in "
                            "the checkpoint; with dataset=... give dataset.root=DIR instead")
    given = OmegaConf.to_container(cfg.dataset, resolve=True)
    if stored and stored.get("name") == given.get("name"):
        differing = sorted(k for k in set(given) | set(stored)
                           if k not in SPLIT_NEUTRAL and given.get(k) != stored.get(k))
        if differing:
            logging.getLogger("jacdistill").warning(
                f"the dataset settings differ from those the checkpoint was trained with "
                f"({', '.join(f'{k}: {stored.get(k)} -> {given.get(k)}' for k in differing)}); the test split may "
                "not be the one it was measured on")
    return cfg.dataset


def noise_accuracy(models: dict[str, Any], split, sigmas: list[float], batch_size: int, device,
                   seed: int) -> dict[str, dict[str, float]]:
    """{model name: {str(sigma): accuracy on inputs + sigma * N(0, 1)}}; every model sees the same noise,
    drawn on the CPU from `seed` so that it does not depend on the device."""
    import torch

    from jacdistill_cli.zoo.data import batches, derived_seed

    results: dict[str, dict[str, float]] = {name: {} for name in models}
    for sigma in sigmas:
        generator = torch.Generator().manual_seed(derived_seed(seed, f"noise sigma={sigma}"))
        correct = {name: 0 for name in models}
        count = 0
        with torch.no_grad():
            for inputs, labels in batches(split, batch_size, False, None, device):
                noise = torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype).to(device)
                noisy = inputs + sigma * noise
                for name, model in models.items():
                    correct[name] += (model(noisy).argmax(1) == labels).sum().item()
                count += len(labels)
        for name in models:
            results[name][str(sigma)] = correct[name] / max(count, 1)
    return results


def table(rows: dict[str, dict[str, float | None]], columns: list[str]) -> str:
    """Rows of numbers under column headings; a missing value prints as '-'."""
    widths = [max(len(c), 6) + 2 for c in columns]
    lines = ["".ljust(10) + "".join(c.rjust(w) for c, w in zip(columns, widths))]
    for name, values in rows.items():
        cells = [("-" if values.get(c) is None else f"{values[c]:.4f}").rjust(w) for c, w in zip(columns, widths)]
        lines.append(name.ljust(10) + "".join(cells))
    return "\n".join(lines)


def print_results(result: dict[str, Any], payload: dict, teacher_payload: dict | None, cfg: DictConfig,
                  samples: int) -> None:
    """The table of evaluation.json's numbers: one row per network, then its robust accuracy."""
    from jacdistill_cli.zoo.models import describe_architecture

    sigmas = result["sigmas"]
    teacher = teacher_payload is not None
    columns = ["accuracy"] + (["agreement", "jacobian_cosine"] if teacher else []) + [f"sigma={s:g}" for s in sigmas]
    rows = {"model": {"accuracy": result["accuracy"], "agreement": result.get("agreement"),
                      "jacobian_cosine": result.get("jacobian_cosine"),
                      **{f"sigma={s:g}": result["noise_accuracy"][str(s)] for s in sigmas}}}
    if teacher:
        rows["teacher"] = {"accuracy": result["teacher_accuracy"],
                           **{f"sigma={s:g}": result["teacher_noise_accuracy"][str(s)] for s in sigmas}}
    print(f"model     {cfg.checkpoint}: {describe_architecture(payload['architecture'])}")
    if teacher:
        print(f"teacher   {cfg.teacher.checkpoint}: {describe_architecture(teacher_payload['architecture'])}")
    print(f"dataset   {result['dataset']}, test split, {samples} samples; sigma: std of Gaussian noise on the "
          "normalised inputs\n")
    print(table(rows, columns))
    robust = {name: result[key] for name, key in (("model", "robust_accuracy"), ("teacher", "teacher_robust_accuracy"))
              if key in result}
    if robust:
        keys = [k for k in robust["model"] if k not in ("samples", "robust_seconds")]
        print(f"\nrobust accuracy on the first {robust['model']['samples']} test samples (epsilon and noise sigma in "
              f"pixel scale [0, 1]); {sum(r['robust_seconds'] for r in robust.values()):.1f} s")
        print(table({name: {k: r.get(k) for k in keys} for name, r in robust.items()}, keys))


@one_line_errors("evaluate")
def run(cfg: DictConfig) -> dict[str, Any]:
    """Returns what evaluation.json holds."""
    sigmas = validate(cfg)

    import logging

    from jacdistill_cli.commands.startup import save_resolved_config
    from jacdistill_cli.loop.device import seed_everything, select_device
    from jacdistill_cli.loop.teacher import freeze
    from jacdistill_cli.loop.trainer import evaluate
    from jacdistill_cli.records.directory import run_directory
    from jacdistill_cli.storage import write_json
    from jacdistill_cli.zoo.checkpoints import check_fits, load_checkpoint, model_from_checkpoint
    from jacdistill_cli.zoo.data import build_data

    log = logging.getLogger("jacdistill")
    device = select_device(cfg.trainer.device)
    payload = load_checkpoint(cfg.checkpoint, "checkpoint")
    teacher_payload = None
    if cfg.teacher.checkpoint is not None:
        teacher_payload = load_checkpoint(cfg.teacher.checkpoint, "teacher.checkpoint")
    data_cfg = dataset_node(cfg, payload)
    data = build_data(data_cfg).to(device)
    check_fits(payload, "checkpoint", data)
    if teacher_payload is not None:
        check_fits(teacher_payload, "teacher.checkpoint", data)

    run_dir = run_directory()
    save_resolved_config(cfg, run_dir)
    seed_everything(cfg.seed)
    model = freeze(model_from_checkpoint(payload, "checkpoint").to(device))
    teacher = None if teacher_payload is None else freeze(
        model_from_checkpoint(teacher_payload, "teacher.checkpoint").to(device))

    batch_size = cfg.trainer.eval_batch_size
    measured = evaluate(model, teacher, data.test, batch_size, device)
    models = {"model": model} if teacher is None else {"model": model, "teacher": teacher}
    noisy = noise_accuracy(models, data.test, sigmas, batch_size, device, cfg.seed)
    result: dict[str, Any] = {
        "checkpoint": str(cfg.checkpoint), "role": payload.get("role"),
        "architecture": payload["architecture"], "dataset": data.name, "split": "test",
        "samples": len(data.test), "accuracy": measured["accuracy"],
        "noise_accuracy": noisy["model"], "sigmas": sigmas, "seed": cfg.seed,
        "teacher_checkpoint": None if teacher is None else str(cfg.teacher.checkpoint),
    }
    if teacher is not None:
        result.update(agreement=measured["agreement"], jacobian_cosine=measured["jacobian_cosine"],
                      teacher_architecture=teacher_payload["architecture"],
                      teacher_accuracy=evaluate(teacher, None, data.test, batch_size, device)["accuracy"],
                      teacher_noise_accuracy=noisy["teacher"])
    robust = robust_metrics(models, data, device, cfg)
    if robust:
        result["robust_accuracy"] = robust["model"]
        if teacher is not None:
            result["teacher_robust_accuracy"] = robust["teacher"]
    write_json(run_dir / "evaluation.json", result)

    print_results(result, payload, teacher_payload, cfg, len(data.test))
    log.info(f"written: {run_dir / 'evaluation.json'}")
    return result


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)
