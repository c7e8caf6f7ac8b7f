"""The specs of the commands around training, built from their composed configs as train's is
(spec/build.py): `jacdistill evaluate`, `jacdistill check`, `jacdistill bench`."""

from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config import registry
from jacdistill_cli.engine.jacobian import EXACT_STRATEGIES
from jacdistill_cli.errors import UsageError, setting_error
from jacdistill_cli.explain.settings import explain_settings
from jacdistill_cli.robustness.settings import robustness_settings
from jacdistill_cli.spec.build import check_device_name, data_spec, existing_file, methods, model_spec, precision
from jacdistill_cli.spec.reader import Reader
from jacdistill_cli.spec.run import BenchSpec, CheckSpec, EvaluateSpec

# The naive references of bench: the question's code (backward + x.grad), and its autograd.grad variant.
NAIVE_VARIANTS = ("backward", "grad")


def evaluate_spec(cfg: DictConfig, choices: Mapping[str, Any] | None = None,
                  reader: Reader | None = None) -> EvaluateSpec:
    read = reader or Reader(cfg)
    checkpoint = read.value("checkpoint")
    if checkpoint is None or str(checkpoint).strip() == "":
        raise UsageError("checkpoint=null is not allowed: give a checkpoint written by `jacdistill train` or "
                         "`jacdistill teacher`, e.g. checkpoint=outputs/train/DATE/TIME/student.pt")
    seed = read.integer("seed", low=0, allowed="it must be an integer >= 0")
    sigmas = read.plain("sigmas")
    if not isinstance(sigmas, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0
                                               for s in sigmas):
        raise setting_error("sigmas", sigmas, "it must be a list of numbers >= 0, e.g. sigmas=[0.1,0.5]")
    trust = read.plain("trust", [])
    if not isinstance(trust, list) or not all(isinstance(t, str) and t for t in trust):
        raise setting_error("trust", trust, "it must be a list of the `_target_`s of your own models that a "
                            "checkpoint may name, e.g. trust=[mymodels.tiny]")
    root = read.value("dataset_root", None)
    data = data_spec(read) if read.value("dataset", None) is not None else None
    return EvaluateSpec(
        checkpoint=str(checkpoint), teacher_checkpoint=read.value("teacher.checkpoint", None), data=data,
        dataset_root=None if root is None or str(root).strip() == "" else str(root),
        sigmas=tuple(float(s) for s in sigmas), seed=seed, device=check_device_name(read.value("trainer.device")),
        eval_batch_size=read.integer("trainer.eval_batch_size", allowed="it must be an integer >= 1"),
        robustness=robustness_settings(read.plain("robustness", None), seed=seed),
        explain=explain_settings(read.plain("explain", None), seed=seed), trust=tuple(trust),
        config=OmegaConf.to_container(cfg, resolve=True))


def checkable_methods() -> list[str]:
    """The shipped methods with a term to check (all but `none`), in the order the docs give them (docs/concepts/jacobian-methods.md)."""
    from hydra.utils import get_object

    order = ["top1", "target", "loss", "exact", "projected", "noise"]
    names = [name for name, target in registry.shipped_options("jacobian").items()
             if get_object(target).uses_gradients or get_object(target).perturbs_inputs]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def names(read: Reader, key: str, options: list[str]) -> list[str]:
    raw = read.plain(key, None)
    values = [raw] if isinstance(raw, str) else [] if raw is None else raw
    if not isinstance(values, list) or any(v not in options for v in values):
        raise setting_error(key, raw, f"it must be a list of {', '.join(options)}")
    return list(dict.fromkeys(values))


def integers(read: Reader, key: str, low: int, allowed: str) -> list[int]:
    raw = read.plain(key)
    values = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw
    if (not isinstance(values, list) or not values
            or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values)):
        raise setting_error(key, raw, allowed)
    return values


def check_spec(cfg: DictConfig, choices: Mapping[str, Any] | None = None, reader: Reader | None = None) -> CheckSpec:
    read = reader or Reader(cfg)
    choices = dict(choices or {})
    seed = read.integer("seed", low=0, allowed="it must be an integer >= 0")
    batch_size = read.integer("batch_size", low=2, allowed="it must be an integer >= 2")
    device = read.choice("device", ("auto", "cpu", "cuda"))
    methods(read)   # the configured jacobian and features nodes build (one line if they do not)
    configured = read.plain("jacobian")
    available = checkable_methods()
    own = registry.label("jacobian", configured)
    if own not in available and own != "none":
        available.append(own)   # a user's own method, checked as configured
    raw = read.plain("methods")
    chosen = available if raw == "all" else [raw] if isinstance(raw, str) else raw
    if not isinstance(chosen, list) or not chosen or any(n not in available for n in chosen):
        raise setting_error("methods", raw, f"it must be all or a list of {', '.join(available)}")
    nodes = {name: configured if registry.label("jacobian", configured) == name else shipped_jacobian(name)
             for name in dict.fromkeys(chosen)}
    return CheckSpec(seed=seed, data=data_spec(read), teacher=model_spec(read, "teacher", choices),
                     teacher_checkpoint=existing_file(read, "teacher.checkpoint"),
                     student=model_spec(read, "student", choices), methods=tuple(nodes), method_nodes=nodes,
                     configured=configured if configured.get("normalize") is not None else shipped_jacobian("top1"),
                     features=read.plain("features", None), batch_size=batch_size, device=device,
                     precision=precision(read), config=OmegaConf.to_container(cfg, resolve=True))


def shipped_jacobian(name: str) -> dict[str, Any]:
    """conf/jacobian/<name>.yaml as shipped, as plain settings."""
    if name not in registry.shipped_options("jacobian"):
        return {"name": name}
    return OmegaConf.to_container(registry.shipped_node("jacobian", name), resolve=True)


def bench_spec(cfg: DictConfig, choices: Mapping[str, Any] | None = None, reader: Reader | None = None) -> BenchSpec:
    read = reader or Reader(cfg)
    choices = dict(choices or {})
    shape = integers(read, "input_shape", 1, "it must be a list of positive integers, e.g. [3,32,32]")
    if len(shape) != 3:
        raise setting_error("input_shape", shape, "it must be [channels, height, width], e.g. [3,32,32]")
    data_batches = read.value("data_batches", 200)
    if isinstance(data_batches, bool) or not isinstance(data_batches, int) or not 0 <= data_batches <= 1000:
        raise setting_error("data_batches", data_batches, "it must be an integer in [0, 1000] (0: no data-path row)")
    return BenchSpec(
        teacher=model_spec(read, "teacher", choices), student=model_spec(read, "student", choices),
        data=data_spec(read), classes=tuple(integers(read, "classes", 2, "it must be a list of integers >= 2, e.g. "
                                                     "classes=[10,100]")),
        input_shape=tuple(shape), methods=tuple(names(read, "methods", checkable_methods())),
        strategies=tuple(names(read, "strategies", [s for s in EXACT_STRATEGIES if s != "auto"])),
        naive=tuple(names(read, "naive", list(NAIVE_VARIANTS))),
        batch_size=read.integer("batch_size", low=2, allowed="it must be an integer >= 2"),
        warmup=read.integer("warmup", low=0, allowed="it must be an integer >= 0"),
        repeats=read.integer("repeats", low=1, allowed="it must be an integer >= 1"),
        budget_seconds=read.real("budget_seconds", low=0, low_open=True, allowed="it must be a number > 0"),
        alpha=read.real("alpha", low=0, high=1, allowed="it must be a number in [0, 1]"),
        temperature=read.real("temperature", low=0, low_open=True, allowed="it must be a number > 0"),
        device=read.choice("device", ("auto", "cpu", "cuda")),
        seed=read.integer("seed", low=0, allowed="it must be an integer >= 0"), precision=precision(read),
        threads=read.optional_integer("threads", allowed="it must be null (torch's default) or an integer >= 1"),
        data_batches=data_batches, comparison=choices.get("comparison"), bench_pair=choices.get("bench_pair"),
        config=OmegaConf.to_container(cfg, resolve=True))
