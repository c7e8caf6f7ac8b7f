"""`jacdistill evaluate`'s measures of a checkpoint (and optionally a teacher's) on a test split: accuracy,
agreement, input-gradient cosine and explanation agreement, accuracy under Gaussian noise, robust accuracy
(robustness=) and the faithfulness of each network's own explanations (explain=); and the table they print as.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from jacdistill_cli.config.registry import shipped_options
from jacdistill_cli.errors import UsageError, setting_error
from jacdistill_cli.explain.faithfulness import faithfulness
from jacdistill_cli.loop.evaluation import evaluate
from jacdistill_cli.robustness.measure import robust_accuracy
from jacdistill_cli.robustness.pixels import Pixels
from jacdistill_cli.spec.run import EvaluateSpec
from jacdistill_cli.zoo.data import batches, derived_seed
from jacdistill_cli.zoo.models import describe_architecture

log = logging.getLogger("jacdistill")

# Dataset settings that may differ between training and evaluation without changing the test split.
SPLIT_NEUTRAL = {"samples_per_class", "augment", "download", "root", "verify", "max_memory_mb"}


def with_dataset_target(stored: dict, checkpoint: str) -> dict:
    """The stored dataset settings with a `_target_` of jacdistill's own: a checkpoint names no code to import
    (a stored target outside the package, or none in an older checkpoint, is replaced by the shipped option's)."""
    if str(stored.get("_target_", "")).startswith("jacdistill_cli."):
        return stored
    shipped = shipped_options("dataset").get(str(stored.get("name")))
    if shipped is None:
        raise UsageError(f"checkpoint={checkpoint!r} was trained on a dataset jacdistill does not ship "
                         f"({stored.get('_target_') or stored.get('name')!r}); name the dataset to evaluate on, "
                         "e.g. dataset=NAME with --config-dir for your own")
    return {**stored, "_target_": shipped}


def stored_dataset(spec: EvaluateSpec, stored: dict | None) -> DictConfig:
    """The dataset recorded in the checkpoint, its files read only from a directory the user names."""
    if not stored:
        raise UsageError(f"checkpoint={spec.checkpoint!r} does not record its dataset settings; name the dataset, "
                         "e.g. dataset=digits")
    stored = dict(stored)
    if stored.get("root") is not None:
        if spec.dataset_root is None:
            raise UsageError(
                f"dataset_root=null is not allowed: checkpoint={spec.checkpoint!r} was trained on "
                f"{stored.get('name')} read from {stored['root']}, and files are read only from a directory you "
                f"name: add dataset_root={stored['root']} if you trust it, or name the dataset, e.g. "
                f"dataset={stored.get('name')} dataset.root=DIR")
        stored["root"] = spec.dataset_root
    return OmegaConf.create(with_dataset_target(stored, spec.checkpoint))


def dataset_node(spec: EvaluateSpec, payload: dict[str, Any]) -> DictConfig:
    """The dataset to evaluate on: the one given, else the one stored in the checkpoint."""
    stored = payload.get("dataset_config")
    if spec.data is None:
        return stored_dataset(spec, stored)
    if spec.dataset_root is not None:
        raise setting_error("dataset_root", spec.dataset_root, "it applies to the dataset settings stored in the "
                            "checkpoint; with dataset=... give dataset.root=DIR instead")
    given = spec.data.node
    if stored and stored.get("name") == given.get("name"):
        differing = sorted(k for k in set(given) | set(stored)
                           if k not in SPLIT_NEUTRAL and given.get(k) != stored.get(k))
        if differing:
            log.warning(f"the dataset settings differ from those the checkpoint was trained with "
                        f"({', '.join(f'{k}: {stored.get(k)} -> {given.get(k)}' for k in differing)}); the test split "
                        "may not be the one it was measured on")
    return OmegaConf.create(given)


def noise_accuracy(models: dict[str, nn.Module], split, sigmas: tuple[float, ...], batch_size: int,
                   device: torch.device, seed: int) -> dict[str, dict[str, float]]:
    """{model name: {str(sigma): accuracy on inputs + sigma * N(0, 1)}}; every model sees the same noise,
    drawn on the CPU from `seed` so that it does not depend on the device; counted on the device, read once."""
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    for sigma in sigmas:
        generator = torch.Generator().manual_seed(derived_seed(seed, f"noise sigma={sigma}"))
        correct = torch.zeros(len(models), dtype=torch.long, device=device)
        count = 0
        with torch.no_grad():
            for inputs, labels in batches(split, batch_size, False, None, device):
                noisy = inputs + sigma * torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype).to(device)
                correct += torch.stack([(model(noisy).argmax(1) == labels).sum() for model in models.values()])
                count += len(labels)
        for name, value in zip(models, correct.tolist()):
            results[name][str(sigma)] = value / max(count, 1)
    return results


def assess(spec: EvaluateSpec, models: dict[str, nn.Module], data: Any, device: torch.device) -> dict[str, Any]:
    """evaluation.json's measures of `models` ({"model": ..., "teacher": ...}) on the test split of `data`."""
    model, teacher = models["model"], models.get("teacher")
    measured = evaluate(model, teacher, data.test, spec.eval_batch_size, device)
    noisy = noise_accuracy(models, data.test, spec.sigmas, spec.eval_batch_size, device, spec.seed)
    result: dict[str, Any] = {"dataset": data.name, "split": "test", "samples": len(data.test),
                              "accuracy": measured["accuracy"], "noise_accuracy": noisy["model"],
                              "sigmas": list(spec.sigmas), "seed": spec.seed}
    if teacher is not None:
        result.update({k: v for k, v in measured.items() if k != "accuracy"},
                      teacher_accuracy=evaluate(teacher, None, data.test, spec.eval_batch_size, device)["accuracy"],
                      teacher_noise_accuracy=noisy["teacher"])
    pixels = Pixels.of(data)
    if spec.robustness.enabled:
        # The model is attacked with the teacher as the source of transfer attacks; the teacher without them.
        result["robust_accuracy"] = robust_accuracy(model, data.test, pixels, device, spec.robustness, teacher=teacher)
        if teacher is not None:
            result["teacher_robust_accuracy"] = robust_accuracy(teacher, data.test, pixels, device, spec.robustness,
                                                                role="teacher")
    if spec.explain.enabled:
        result["faithfulness"] = {name: faithfulness(net, data.test, pixels, device, spec.explain)
                                  for name, net in models.items()}
    return result


def table(rows: dict[str, dict[str, float | None]], columns: list[str]) -> str:
    """Rows of numbers under column headings; a missing value prints as '-'."""
    widths = [max(len(c), 6) + 2 for c in columns]
    lines = ["".ljust(10) + "".join(c.rjust(w) for c, w in zip(columns, widths))]
    for name, values in rows.items():
        cells = [("-" if values.get(c) is None else f"{values[c]:.4f}").rjust(w) for c, w in zip(columns, widths)]
        lines.append(name.ljust(10) + "".join(cells))
    return "\n".join(lines)


def report_lines(result: dict[str, Any], payload: dict, teacher_payload: dict | None, spec: EvaluateSpec) -> str:
    """The table of evaluation.json's numbers: one row per network, then its robust accuracy and the
    faithfulness of its explanations."""
    sigmas, teacher = result["sigmas"], teacher_payload is not None
    agreement = ["agreement", "jacobian_cosine", "explanation_rank_correlation", "explanation_top10_iou"]
    columns = ["accuracy", *(agreement if teacher else []), *[f"sigma={s:g}" for s in sigmas]]
    rows = {"model": {"accuracy": result["accuracy"], **{k: result.get(k) for k in agreement},
                      **{f"sigma={s:g}": result["noise_accuracy"][str(s)] for s in sigmas}}}
    if teacher:
        rows["teacher"] = {"accuracy": result["teacher_accuracy"],
                           **{f"sigma={s:g}": result["teacher_noise_accuracy"][str(s)] for s in sigmas}}
    lines = [f"model     {spec.checkpoint}: {describe_architecture(payload['architecture'])}"]
    if teacher:
        lines.append(f"teacher   {spec.teacher_checkpoint}: {describe_architecture(teacher_payload['architecture'])}")
    lines += [f"dataset   {result['dataset']}, test split, {result['samples']} samples; sigma: std of Gaussian noise "
              "on the normalised inputs\n", table(rows, columns)]
    robust = {name: result[key] for name, key in (("model", "robust_accuracy"), ("teacher", "teacher_robust_accuracy"))
              if key in result}
    if robust:
        keys = [k for k in robust["model"] if k not in ("samples", "robust_seconds")]
        lines.append(f"\nrobust accuracy on the first {robust['model']['samples']} test samples (epsilon and noise "
                     f"sigma in pixel scale [0, 1]); {sum(r['robust_seconds'] for r in robust.values()):.1f} s")
        lines.append(table({name: {k: r.get(k) for k in keys} for name, r in robust.items()}, keys))
    if "faithfulness" in result:
        keys = ["deletion_area", "random_deletion_area", "insertion_area", "random_insertion_area"]
        faith = result["faithfulness"]
        lines.append(f"\nfaithfulness of each network's own saliency ({spec.explain.saliency}) on "
                     f"{faith['model']['samples']} test samples: deletion (lower is better) and insertion (higher "
                     "is better) areas, beside a random order's")
        lines.append(table({name: {k: f.get(k) for k in keys} for name, f in faith.items()}, keys))
    return "\n".join(lines)
