"""`jacdistill bench`'s work on its spec (spec/run.py BenchSpec): one table per class count, every candidate
timed on a fresh teacher and student, the data path's row, the targets checked; what it prints and what
bench.json records (written after each table, so that a long bench leaves what it measured)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from jacdistill_cli.loop.device import keep_freed_memory
from jacdistill_cli.loop.precision import Precision
from jacdistill_cli.loop.teacher import freeze
from jacdistill_cli.proofs import benchmark, data_path
from jacdistill_cli.spec.run import BenchSpec
from jacdistill_cli.spec.tools import shipped_jacobian
from jacdistill_cli.storage import write_json
from jacdistill_cli.zoo.models import build_model, count_parameters, describe_architecture


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def options_of(spec: BenchSpec) -> dict[str, Any]:
    """The spec's settings as the bench's tables and bench.json name them."""
    return {"input_shape": list(spec.input_shape), "batch_size": spec.batch_size, "repeats": spec.repeats,
            "warmup": spec.warmup, "precision": spec.precision, "comparison": spec.comparison,
            "bench_pair": spec.bench_pair, "strategies": list(spec.strategies), "naive": list(spec.naive),
            "budget_seconds": spec.budget_seconds}


def bench_table(spec: BenchSpec, classes: int, device: torch.device, say: Callable[[str], None]) -> dict[str, Any]:
    """One table: every candidate timed on a fresh teacher and student with `classes` outputs, its rows and
    checks against the targets."""
    torch.manual_seed(spec.seed)
    teacher = freeze(build_model(spec.teacher.architecture, spec.input_shape, classes, "teacher").to(device))
    student = build_model(spec.student.architecture, spec.input_shape, classes, "student").to(device).train()
    generator = torch.Generator().manual_seed(spec.seed)
    x = torch.randn((spec.batch_size, *spec.input_shape), generator=generator).to(device)
    y = torch.randint(0, classes, (spec.batch_size,), generator=generator).to(device)
    teacher_ms = 1000 * benchmark.model_cost(teacher, x, device)
    student_ms = 1000 * benchmark.model_cost(student.eval(), x, device)
    student.train()
    say(f"\nteacher {describe_architecture(spec.teacher.architecture)}: {count_parameters(teacher)} parameters, "
        f"forward {teacher_ms:.1f} ms; student {describe_architecture(spec.student.architecture)}: "
        f"{count_parameters(student)} parameters, forward {student_ms:.1f} ms")
    case = benchmark.StepCase(teacher, x, y, spec.alpha, spec.temperature, spec.seed,
                              Precision(spec.precision, device.type))
    candidates = benchmark.build_candidates(student, case, list(spec.methods), list(spec.strategies), list(spec.naive),
                                            lambda name: OmegaConf.create(shipped_jacobian(name)))
    benchmark.time_rounds(candidates, spec.warmup, spec.repeats, spec.budget_seconds, device)
    agreement = {}
    if "backward" in spec.naive and "exact" in spec.methods:
        agreement = benchmark.jacobian_agreement(student, teacher, x, ["auto", *spec.strategies], spec.seed)
    summary = benchmark.summarise(candidates, classes, agreement, benchmark.targets_for(spec.bench_pair))
    summary.update({"teacher_parameters": count_parameters(teacher), "student_parameters": count_parameters(student),
                    "teacher_forward_ms": teacher_ms, "student_forward_ms": student_ms})
    say(benchmark.format_summary(summary))
    return summary


def run_bench(spec: BenchSpec, device: torch.device, run_dir: Path,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every table, the data path's row and the targets: bench.json's content."""
    threads = torch.get_num_threads()
    described = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"{platform.machine()}, {threads} thread{'s' if threads > 1 else ''}")
    load_before = load_average()
    say(benchmark.header(options_of(spec), device, described, load_before))
    data_rate = (data_path.batch_rate(OmegaConf.create(spec.data.node), spec.batch_size, device, spec.data_batches,
                                      spec.seed) if spec.data_batches else None)
    results: dict[str, Any] = {
        "device": str(device), "device_description": described, "torch": torch.__version__, "threads": threads,
        **options_of(spec), "teacher": spec.teacher.architecture, "student": spec.student.architecture,
        "load_average_before": load_before, "freed_memory_kept": keep_freed_memory(), "tables": []}
    for classes in spec.classes:
        results["tables"].append(bench_table(spec, classes, device, say))
        write_json(run_dir / "bench.json", results)
    if data_rate is not None:
        results["data_path"] = data_path.compare(data_rate, results["tables"])
        say("\n" + data_path.format_row(results["data_path"]))
    results["load_average_after"] = load_average()
    missed = [c["what"] for t in results["tables"] for c in t["checks"] if not c["met"]]
    results["targets_met"] = not missed
    write_json(run_dir / "bench.json", results)
    say("\nall targets met" if not missed else "\ntargets missed:\n  " + "\n  ".join(missed))
    return results
