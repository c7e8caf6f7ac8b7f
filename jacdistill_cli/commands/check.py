"""`jacdistill check`: prove each Jacobian method right on the configured networks and data.

Prints one row per method and one line on the common mistake; writes check.json in the run
directory; exit status 1 when any check fails (see jacdistill_cli.proofs.verify for what is checked).
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.entry import one_line_errors
from jacdistill_cli.config.registry import label
from jacdistill_cli.config.resolvers import register_resolvers
from jacdistill_cli.errors import setting_error

register_resolvers()


def selected_methods(cfg: DictConfig) -> list[str]:
    from jacdistill_cli.proofs.verify import checkable_methods

    available = checkable_methods()
    configured = label("jacobian", cfg.jacobian)
    if configured not in available and configured != "none":
        available.append(configured)   # a user's own method, checked as configured
    raw = cfg.methods
    if raw == "all":
        return available
    names = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_list(raw) else raw
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or any(n not in available for n in names):
        raise setting_error("methods", raw, f"it must be all or a list of {', '.join(available)}")
    return list(dict.fromkeys(names))


def validate(cfg: DictConfig) -> list[str]:
    from jacdistill_cli.config import settings

    settings.integer(cfg, "seed", low=0, allowed="it must be an integer >= 0")
    settings.integer(cfg, "batch_size", low=2, allowed="it must be an integer >= 2")
    settings.choice(cfg, "device", settings.DEVICES)
    settings.validate_methods(cfg)
    settings.precision(cfg)
    return selected_methods(cfg)


def shipped_jacobian(name: str) -> DictConfig:
    """conf/jacobian/<name>.yaml as shipped."""
    from importlib.resources import files

    path = files("jacdistill_cli.conf") / "jacobian" / f"{name}.yaml"
    if not path.is_file():
        return OmegaConf.create({"name": name})
    return OmegaConf.create(path.read_text())


def networks(cfg: DictConfig, data, device) -> tuple[Any, Any, str]:
    """(student in train mode, frozen teacher, where the teacher comes from)."""
    import torch

    from jacdistill_cli.loop.teacher import freeze
    from jacdistill_cli.zoo.checkpoints import check_fits, load_teacher_checkpoint, model_from_checkpoint
    from jacdistill_cli.zoo.models import architecture, build_model

    torch.manual_seed(cfg.seed)
    student = build_model(architecture(cfg.student), data.input_shape, data.num_classes, "student").to(device)
    student.train()
    if cfg.teacher.checkpoint is not None:
        payload = load_teacher_checkpoint(cfg.teacher.checkpoint, "teacher.checkpoint", architecture(cfg.teacher), data)
        check_fits(payload, "teacher.checkpoint", data, architecture(cfg.teacher))
        teacher = model_from_checkpoint(payload, "teacher.checkpoint")
        source = f"checkpoint {cfg.teacher.checkpoint}"
    else:
        teacher = build_model(architecture(cfg.teacher), data.input_shape, data.num_classes, "teacher")
        source = f"freshly initialised, seed {cfg.seed}, drawn after the student"
    return student, freeze(teacher.to(device)), source


@one_line_errors("check")
def run(cfg: DictConfig) -> int:
    """Returns the number of methods that failed."""
    methods = validate(cfg)

    import logging

    import torch

    from jacdistill_cli.commands.startup import data as dataset
    from jacdistill_cli.commands.startup import start
    from jacdistill_cli.config.settings import precision as precision_setting
    from jacdistill_cli.proofs import check_report, vanishing
    from jacdistill_cli.proofs.verify import check_method, method_settings, retain_graph_mistake
    from jacdistill_cli.storage import write_json
    from jacdistill_cli.zoo.data import batches
    from jacdistill_cli.zoo.models import architecture, describe_architecture

    log = logging.getLogger("jacdistill")
    startup = start(cfg, device_key="device")
    device, run_dir = startup.device, startup.run_dir
    data = dataset(cfg.dataset, device)
    student, teacher, source = networks(cfg, data, device)
    precision = precision_setting(cfg)
    inputs, labels = next(iter(batches(data.val, cfg.batch_size, True, torch.Generator().manual_seed(cfg.seed),
                                       device)))
    print(f"jacdistill check: student {describe_architecture(architecture(cfg.student))} (train mode), "
          f"teacher {describe_architecture(architecture(cfg.teacher))} "
          f"({source}), {data.name}: {len(labels)} samples, float64"
          + (f" and float32 under autocast({precision})" if precision != "32" else "") + f", {device}")
    student, teacher, perturbations = vanishing.proof_networks(student, teacher, inputs, cfg.seed)

    reports = []
    for name in methods:
        settings = method_settings(name, cfg.jacobian, shipped_jacobian)
        reports.append(check_method(settings, student, teacher, inputs, labels, cfg.seed, precision))
        log.debug(f"checked {name}")
    configured = cfg.jacobian if cfg.jacobian.get("normalize") is not None else shipped_jacobian("top1")
    mistake = retain_graph_mistake(student, teacher, inputs, bool(configured.normalize), bool(configured.squared))
    print(check_report.format_report(reports, mistake, perturbations))
    from jacdistill_cli.config.registry import build
    from jacdistill_cli.proofs.feature_checks import feature_checks

    # Features captured by hooks: attention and hint, each with the Jacobian of its features.
    feature_reports = feature_checks(cfg, student, teacher, inputs, build("jacobian", configured))
    for feature_report in feature_reports:
        print("\n".join(feature_report.lines()))
    failed = [r.method for r in reports if not r.passed] + [f"features={r.method}" for r in feature_reports
                                                             if not r.passed]
    print("all checks passed" if not failed else f"checks FAILED for: {', '.join(failed)}")
    write_json(run_dir / "check.json", {
        "passed": not failed, "device": str(device), "dataset": data.name, "samples": len(labels),
        "student": architecture(cfg.student), "teacher": architecture(cfg.teacher), "teacher_source": source,
        "methods": [r.as_dict() for r in reports], "perturbed": [p.as_dict() for p in perturbations],
        "retain_graph_mistake": {"receiving": mistake[0], "parameters": mistake[1]},
        "features": [r.as_dict() for r in feature_reports],
    })
    log.info(f"run directory: {run_dir}")
    if failed:
        raise SystemExit(1)
    return 0


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="check")
def main(cfg: DictConfig) -> int:
    return run(cfg)
