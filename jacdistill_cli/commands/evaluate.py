"""`jacdistill evaluate checkpoint=PATH [teacher.checkpoint=PATH]`: a checkpoint on the test split."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.entry import one_line_errors
from jacdistill_cli.config.resolvers import register_resolvers

register_resolvers()


@one_line_errors("evaluate")
def run(cfg: DictConfig) -> dict:
    """Returns what evaluation.json holds."""
    import logging

    from jacdistill_cli.loop.assessment import assess, dataset_node, report_lines
    from jacdistill_cli.loop.device import seed_everything, select_device
    from jacdistill_cli.loop.teacher import freeze
    from jacdistill_cli.records.directory import run_directory
    from jacdistill_cli.spec.tools import evaluate_spec
    from jacdistill_cli.storage import write_json, write_text
    from jacdistill_cli.zoo.checkpoints import check_fits, load_checkpoint, model_from_checkpoint
    from jacdistill_cli.zoo.data import build_data

    log = logging.getLogger("jacdistill")
    spec = evaluate_spec(cfg)   # every setting checked once: a bad value is refused here
    device = select_device(spec.device)
    payload = load_checkpoint(spec.checkpoint, "checkpoint")
    teacher_payload = None
    if spec.teacher_checkpoint is not None:
        teacher_payload = load_checkpoint(spec.teacher_checkpoint, "teacher.checkpoint")
    data = build_data(dataset_node(spec, payload)).to(device)
    check_fits(payload, "checkpoint", data)
    if teacher_payload is not None:
        check_fits(teacher_payload, "teacher.checkpoint", data)
    run_dir = run_directory()
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(spec.config)))
    seed_everything(spec.seed)
    models = {"model": freeze(model_from_checkpoint(payload, "checkpoint", spec.trust).to(device))}
    if teacher_payload is not None:
        models["teacher"] = freeze(model_from_checkpoint(teacher_payload, "teacher.checkpoint", spec.trust).to(device))
    result = {"checkpoint": spec.checkpoint, "role": payload.get("role"), "architecture": payload["architecture"],
              "teacher_checkpoint": spec.teacher_checkpoint,
              **({"teacher_architecture": teacher_payload["architecture"]} if teacher_payload else {}),
              **assess(spec, models, data, device)}
    write_json(run_dir / "evaluation.json", result)
    print(report_lines(result, payload, teacher_payload, spec))
    log.info(f"written: {run_dir / 'evaluation.json'}")
    return result


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)
