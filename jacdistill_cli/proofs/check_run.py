"""`jacdistill check`'s work on its spec (spec/run.py CheckSpec): the networks it proves the methods on, and
every check run on a batch of validation samples, with what it prints and what check.json records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from jacdistill_cli.config.registry import build
from jacdistill_cli.loop.teacher import freeze
from jacdistill_cli.proofs import check_report, vanishing
from jacdistill_cli.proofs.feature_checks import feature_checks
from jacdistill_cli.proofs.verify import check_method, retain_graph_mistake
from jacdistill_cli.spec.run import CheckSpec
from jacdistill_cli.zoo.checkpoints import check_fits, load_teacher_checkpoint, model_from_checkpoint
from jacdistill_cli.zoo.data import DataBundle, batches
from jacdistill_cli.zoo.models import build_model, describe_architecture


def check_networks(spec: CheckSpec, data: DataBundle, device: torch.device) -> tuple[nn.Module, nn.Module, str]:
    """(the student in train mode, the frozen teacher, where the teacher comes from): the student drawn from
    the seed, then the teacher read from its checkpoint or drawn after it."""
    torch.manual_seed(spec.seed)
    student = build_model(spec.student.architecture, data.input_shape, data.num_classes, "student").to(device)
    student.train()
    teacher_spec = spec.teacher.architecture
    if spec.teacher_checkpoint is not None:
        payload = load_teacher_checkpoint(spec.teacher_checkpoint, "teacher.checkpoint", teacher_spec, data)
        check_fits(payload, "teacher.checkpoint", data, teacher_spec)
        teacher = model_from_checkpoint(payload, "teacher.checkpoint", (str(teacher_spec.get("_target_")),))
        source = f"checkpoint {spec.teacher_checkpoint}"
    else:
        teacher = build_model(teacher_spec, data.input_shape, data.num_classes, "teacher")
        source = f"freshly initialised, seed {spec.seed}, drawn after the student"
    return student, freeze(teacher.to(device)), source


@dataclass
class CheckResult:
    text: str                  # what check prints, the header aside
    record: dict[str, Any]     # check.json
    failed: list[str]          # the methods (and features=...) that failed


def run_checks(spec: CheckSpec, data: DataBundle, device: torch.device,
               say: Callable[[str], None] = print) -> CheckResult:
    """Every check of `spec` on a batch of the validation split; what is checked said first (`say`)."""
    student, teacher, source = check_networks(spec, data, device)
    inputs, labels = next(iter(batches(data.val, spec.batch_size, True, torch.Generator().manual_seed(spec.seed),
                                       device)))
    header = (f"jacdistill check: student {describe_architecture(spec.student.architecture)} (train mode), teacher "
              f"{describe_architecture(spec.teacher.architecture)} ({source}), {data.name}: {len(labels)} samples, "
              "float64" + (f" and float32 under autocast({spec.precision})" if spec.precision != "32" else "")
              + f", {device}")
    say(header)
    student, teacher, perturbations = vanishing.proof_networks(student, teacher, inputs, spec.seed)
    reports = [check_method(spec.method_nodes[name], student, teacher, inputs, labels, spec.seed, spec.precision)
               for name in spec.methods]
    configured = spec.configured
    mistake = retain_graph_mistake(student, teacher, inputs, bool(configured["normalize"]),
                                   bool(configured["squared"]))
    features = feature_checks(spec.features, student, teacher, inputs, build("jacobian", configured), spec.seed)
    failed = [r.method for r in reports if not r.passed] + [f"features={r.method}" for r in features if not r.passed]
    text = "\n".join([check_report.format_report(reports, mistake, perturbations),
                      *("\n".join(r.lines()) for r in features),
                      "all checks passed" if not failed else f"checks FAILED for: {', '.join(failed)}"])
    record = {"passed": not failed, "device": str(device), "dataset": data.name, "samples": len(labels),
              "student": spec.student.architecture, "teacher": spec.teacher.architecture, "teacher_source": source,
              "methods": [r.as_dict() for r in reports], "perturbed": [p.as_dict() for p in perturbations],
              "retain_graph_mistake": {"receiving": mistake[0], "parameters": mistake[1]},
              "features": [r.as_dict() for r in features]}
    return CheckResult(text, record, failed)
