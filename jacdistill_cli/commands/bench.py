"""`jacdistill bench`: time one step of each Jacobian method against plain distillation and the
naive reference; print a table per class count and write bench.json in the run directory.

Exit status 0 whether or not the timing targets are met (times depend on the machine and its
load); bench.json and the table say which are.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.entry import one_line_errors
from jacdistill_cli.config.resolvers import register_resolvers
from jacdistill_cli.errors import setting_error

register_resolvers()

# The naive references: the question's code (backward + x.grad), and its autograd.grad variant.
NAIVE_VARIANTS = ("backward", "grad")


def integer_list(cfg: DictConfig, key: str, low: int, allowed: str) -> list[int]:
    raw = OmegaConf.select(cfg, key)
    values = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_list(raw) else raw
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if (not isinstance(values, list) or not values
            or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values)):
        raise setting_error(key, raw, allowed)
    return values


def name_list(cfg: DictConfig, key: str, options: list[str]) -> list[str]:
    raw = OmegaConf.select(cfg, key)
    values = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_list(raw) else raw
    if isinstance(values, str):
        values = [values]
    if values is None:
        values = []
    if not isinstance(values, list) or any(v not in options for v in values):
        raise setting_error(key, raw, f"it must be a list of {', '.join(options)}")
    return list(dict.fromkeys(values))


def validate(cfg: DictConfig) -> dict[str, Any]:
    from jacdistill_cli.config import settings
    from jacdistill_cli.engine.jacobian import EXACT_STRATEGIES
    from jacdistill_cli.proofs.verify import checkable_methods

    checked = {
        "classes": integer_list(cfg, "classes", 2, "it must be a list of integers >= 2, e.g. classes=[10,100]"),
        "input_shape": integer_list(cfg, "input_shape", 1, "it must be a list of positive integers, e.g. [3,32,32]"),
        "methods": name_list(cfg, "methods", checkable_methods()),
        "strategies": name_list(cfg, "strategies", [s for s in EXACT_STRATEGIES if s != "auto"]),
        "batch_size": settings.integer(cfg, "batch_size", low=2, allowed="it must be an integer >= 2"),
        "warmup": settings.integer(cfg, "warmup", low=0, allowed="it must be an integer >= 0"),
        "repeats": settings.integer(cfg, "repeats", low=1, allowed="it must be an integer >= 1"),
        "budget_seconds": settings.real(cfg, "budget_seconds", low=0, low_open=True, allowed="it must be a number > 0"),
        "alpha": settings.real(cfg, "alpha", low=0, high=1, allowed="it must be a number in [0, 1]"),
        "temperature": settings.real(cfg, "temperature", low=0, low_open=True, allowed="it must be a number > 0"),
        "naive": name_list(cfg, "naive", list(NAIVE_VARIANTS)),
        "device": settings.choice(cfg, "device", settings.DEVICES),
        "seed": settings.integer(cfg, "seed", low=0, allowed="it must be an integer >= 0"),
        "precision": settings.precision(cfg),
    }
    if len(checked["input_shape"]) != 3:
        raise setting_error("input_shape", checked["input_shape"], "it must be [channels, height, width], e.g. "
                            "[3,32,32]")
    threads = cfg.threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise setting_error("threads", threads, "it must be null (torch's default) or an integer >= 1")
    checked["threads"] = threads
    checked.update(chosen_options())
    return checked


def chosen_options() -> dict[str, str | None]:
    """The options of the comparison and bench_pair groups this run was composed with (None: not known)."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {"comparison": choices.get("comparison"), "bench_pair": choices.get("bench_pair")}


def shipped_jacobian(name: str) -> DictConfig:
    from jacdistill_cli.commands.check import shipped_jacobian as load

    return load(name)


def choose_device(options: dict[str, Any]) -> Any:
    """The torch device asked for, with the thread count set; a CUDA device torch does not see is refused."""
    import torch

    from jacdistill_cli.loop.device import select_device

    device = select_device(options["device"], key="device")   # one line for a GPU torch does not see
    if options["threads"] is not None:
        torch.set_num_threads(options["threads"])
    return device


def load_average() -> float | None:
    import os

    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def bench_classes(cfg: DictConfig, options: dict[str, Any], classes: int, device: Any) -> dict[str, Any]:
    """One table: every candidate timed on a fresh teacher and student with `classes` outputs, its rows
    and checks against the targets."""
    import torch

    from jacdistill_cli.loop.precision import Precision
    from jacdistill_cli.loop.teacher import freeze
    from jacdistill_cli.proofs import benchmark
    from jacdistill_cli.zoo.models import architecture, build_model, count_parameters, describe_architecture

    shape = tuple(options["input_shape"])
    torch.manual_seed(options["seed"])
    teacher = freeze(build_model(architecture(cfg.teacher), shape, classes, "teacher").to(device))
    student = build_model(architecture(cfg.student), shape, classes, "student").to(device).train()
    generator = torch.Generator().manual_seed(options["seed"])
    x = torch.randn((options["batch_size"], *shape), generator=generator).to(device)
    y = torch.randint(0, classes, (options["batch_size"],), generator=generator).to(device)
    teacher_ms = 1000 * benchmark.model_cost(teacher, x, device)
    student_ms = 1000 * benchmark.model_cost(student.eval(), x, device)
    student.train()
    print(f"\nteacher {describe_architecture(architecture(cfg.teacher))}: {count_parameters(teacher)} parameters, "
          f"forward {teacher_ms:.1f} ms; student {describe_architecture(architecture(cfg.student))}: "
          f"{count_parameters(student)} "
          f"parameters, forward {student_ms:.1f} ms")
    candidates = benchmark.build_candidates(student, teacher, x, y, options["methods"], options["strategies"],
                                            options["naive"], options["alpha"], options["temperature"],
                                            options["seed"], shipped_jacobian,
                                            Precision(options["precision"], device.type))
    benchmark.time_rounds(candidates, options["warmup"], options["repeats"], options["budget_seconds"], device)
    agreement = {}
    if "backward" in options["naive"] and "exact" in options["methods"]:
        agreement = benchmark.jacobian_agreement(student, teacher, x, ["auto", *options["strategies"]],
                                                 options["seed"])
    summary = benchmark.summarise(candidates, classes, agreement,
                                  benchmark.targets_for(options["bench_pair"]))
    summary.update({"teacher_parameters": count_parameters(teacher),
                    "student_parameters": count_parameters(student),
                    "teacher_forward_ms": teacher_ms, "student_forward_ms": student_ms})
    print(benchmark.format_summary(summary))
    return summary


@one_line_errors("bench")
def run(cfg: DictConfig) -> dict[str, Any]:
    options = validate(cfg)
    from jacdistill_cli.proofs import benchmark, data_path

    data_batches = data_path.data_batches(cfg)

    import logging
    import platform

    import torch

    from jacdistill_cli.commands.startup import save_resolved_config
    from jacdistill_cli.loop.device import keep_freed_memory
    from jacdistill_cli.records.directory import run_directory
    from jacdistill_cli.storage import write_json
    from jacdistill_cli.zoo.models import architecture

    log = logging.getLogger("jacdistill")
    device = choose_device(options)
    run_dir = run_directory()
    save_resolved_config(cfg, run_dir)
    threads = torch.get_num_threads()
    described = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"{platform.machine()}, {threads} thread{'s' if threads > 1 else ''}")
    load_before = load_average()
    print(benchmark.header(options, device, described, load_before))
    data_rate = data_path.batch_rate(cfg.dataset, options["batch_size"], device, data_batches,
                                     options["seed"]) if data_batches else None
    results: dict[str, Any] = {
        "device": str(device), "device_description": described, "torch": torch.__version__,
        "threads": threads, "batch_size": options["batch_size"], "input_shape": options["input_shape"],
        "teacher": architecture(cfg.teacher), "student": architecture(cfg.student),
        "comparison": options["comparison"], "bench_pair": options["bench_pair"], "strategies": options["strategies"],
        "naive": options["naive"], "warmup": options["warmup"], "repeats": options["repeats"],
        "budget_seconds": options["budget_seconds"], "load_average_before": load_before,
        "precision": options["precision"], "freed_memory_kept": keep_freed_memory(),
        "tables": [],
    }
    for classes in options["classes"]:
        results["tables"].append(bench_classes(cfg, options, classes, device))
        write_json(run_dir / "bench.json", results)

    if data_rate is not None:
        results["data_path"] = data_path.compare(data_rate, results["tables"])
        print("\n" + data_path.format_row(results["data_path"]))
    results["load_average_after"] = load_average()
    missed = [c["what"] for t in results["tables"] for c in t["checks"] if not c["met"]]
    results["targets_met"] = not missed
    write_json(run_dir / "bench.json", results)
    print("\nall targets met" if not missed else "\ntargets missed:\n  " + "\n  ".join(missed))
    log.info(f"bench.json: {run_dir / 'bench.json'}")
    return results


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="bench")
def main(cfg: DictConfig) -> Any:
    run(cfg)
