"""jacdistill's `top1` step against the same objective written the plain way, on a bench pair.

    python -m jacdistill_cli.proofs.plain_way [--pair vit] [--classes 10 100] [--rounds 15] [--threads 1]

The plain way is what a user would write without jacdistill: the unconverted student and teacher (no
Jacobian-ready layers), the whole step under `sdpa_kernel(SDPBackend.MATH)` (the fused attention kernels have
no double backward), the teacher's top-1 gradient by `torch.autograd.grad`, the student's by
`torch.autograd.grad(..., create_graph=True)`, each sample's gradient divided by its norm, the squared distance,
and KL distillation at the same temperature and alpha. Both steps start from the same weights, take the same
batch and an SGD optimiser of the same learning rate, as `jacdistill bench` times them (plain KD too, for its
ratio). Before timing, the first step of each must give the same loss to 1e-6 (else the script exits with
status 1). Steps are timed in rounds in a rotating order; each row is the median over the rounds.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from jacdistill_cli.engine.methods import NoJacobian
from jacdistill_cli.loop.teacher import freeze
from jacdistill_cli.proofs.benchmark import StepCase, objective_step, optimiser_step

LOSS_TOLERANCE = 1e-6


def bench_config(pair: str):
    """`jacdistill bench bench_pair=<pair>`'s composed configuration (teacher, student, batch, alpha...)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        return compose(config_name="bench", overrides=[f"bench_pair={pair}"])


def build_pair(cfg, classes: int) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """(student in train mode, frozen teacher, inputs [batch, *input], labels [batch]) as bench draws them,
    the networks unconverted (no Jacobian-ready layers)."""
    from jacdistill_cli.config import registry
    from jacdistill_cli.zoo.models import NOT_ARCHITECTURE, architecture, with_target

    shape = tuple(cfg.input_shape)

    def build(role: str) -> nn.Module:
        spec = with_target(architecture(cfg[role]))
        return registry.build(role, spec, exclude=NOT_ARCHITECTURE, input_shape=shape, num_classes=classes)

    torch.manual_seed(cfg.seed)
    teacher = freeze(build("teacher"))
    student = build("student").train()
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn((cfg.batch_size, *shape), generator=generator)
    y = torch.randint(0, classes, (cfg.batch_size,), generator=generator)
    return student, teacher, x, y


def plain_top1_loss(student: nn.Module, teacher: nn.Module, x: Tensor, alpha: float, temperature: float) -> Tensor:
    """The top1 objective written the plain way: (1 - alpha) KL + alpha * mean ||s/|s| - t/|t|||^2, where s and
    t are the student's and teacher's input-gradients of the teacher's top-1 logit."""
    with sdpa_kernel(SDPBackend.MATH):
        teacher_inputs = x.detach().requires_grad_(True)
        teacher_logits = teacher(teacher_inputs)
        top1 = F.one_hot(teacher_logits.detach().argmax(dim=1), teacher_logits.shape[1]).to(x.dtype)
        (teacher_gradient,) = torch.autograd.grad(teacher_logits, teacher_inputs, top1)
        student_inputs = x.detach().requires_grad_(True)
        student_logits = student(student_inputs)
        (student_gradient,) = torch.autograd.grad(student_logits, student_inputs, top1, create_graph=True)
    s = student_gradient.flatten(1)
    t = teacher_gradient.flatten(1)
    jacobian = (s / s.norm(dim=1, keepdim=True) - t / t.norm(dim=1, keepdim=True)).pow(2).sum(dim=1).mean()
    distill = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                       F.log_softmax(teacher_logits.detach() / temperature, dim=1),
                       reduction="batchmean", log_target=True) * temperature ** 2
    return (1 - alpha) * distill + alpha * jacobian


def first_losses(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, cfg) -> tuple[float, float]:
    """(jacdistill's, the plain way's) loss of one top1 step from the same weights (copies: nothing trained)."""
    from jacdistill_cli.config.registry import build, shipped_node
    from jacdistill_cli.engine.layers import make_jacobian_ready
    from jacdistill_cli.engine.losses import kl
    from jacdistill_cli.engine.objective import distillation_objective

    objective = distillation_objective(lambda s, t: kl(s, t, cfg.temperature), cfg.alpha, 0.0,
                                       build("jacobian", shipped_node("jacobian", "top1")))
    ours = objective(make_jacobian_ready(copy.deepcopy(student)), make_jacobian_ready(copy.deepcopy(teacher)), x, y)
    plain = plain_top1_loss(copy.deepcopy(student), teacher, x, cfg.alpha, cfg.temperature)
    return float(ours[1]["total"].detach()), float(plain.detach())


def steps(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, cfg) -> dict[str, Callable[[], None]]:
    """The three timed steps, each on its own copy of the student with its own optimiser."""
    from jacdistill_cli.config.registry import shipped_node
    from jacdistill_cli.engine.layers import make_jacobian_ready

    case = StepCase(make_jacobian_ready(copy.deepcopy(teacher)), x, y, cfg.alpha, cfg.temperature, cfg.seed)
    none = OmegaConf.create({"_target_": f"{NoJacobian.__module__}.NoJacobian", "name": "none"})
    plain_student = copy.deepcopy(student)
    return {
        "plain KD": objective_step(make_jacobian_ready(copy.deepcopy(student)), case, none),
        "jacdistill top1": objective_step(make_jacobian_ready(copy.deepcopy(student)), case,
                                          shipped_node("jacobian", "top1")),
        "plain-way top1": optimiser_step(plain_student, lambda scale: plain_top1_loss(
            plain_student, teacher, x, cfg.alpha, cfg.temperature)),
    }


def timed(candidates: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each candidate over `rounds` rounds, each round in a rotated order."""
    for step in candidates.values():
        for _ in range(warmup):
            step()
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="vit", help="a bench pair of conf/bench_pair (default vit)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args(argv)
    from jacdistill_cli.loop.device import keep_freed_memory

    keep_freed_memory()   # as bench runs
    torch.set_num_threads(options.threads)
    cfg = bench_config(options.pair)
    print(f"bench pair {options.pair}, {options.threads} thread(s), batch {cfg.batch_size}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    agreed = True
    for classes in options.classes:
        student, teacher, x, y = build_pair(cfg, classes)
        ours, plain = first_losses(student, teacher, x, y, cfg)
        same = abs(ours - plain) <= LOSS_TOLERANCE * max(1.0, abs(plain))
        agreed &= same
        medians = timed(steps(student, teacher, x, y, cfg), options.rounds)
        kd, top1, plain_way = medians["plain KD"], medians["jacdistill top1"], medians["plain-way top1"]
        print(f"{classes} classes: loss {ours:.8f} (jacdistill) vs {plain:.8f} (plain way): "
              f"{'same' if same else 'DIFFERENT'} to {LOSS_TOLERANCE:g}")
        print(f"  median ms over {options.rounds} rounds: plain KD {1000 * kd:.1f}, jacdistill top1 {1000 * top1:.1f} "
              f"({top1 / kd:.2f}x KD), plain-way top1 {1000 * plain_way:.1f} ({plain_way / kd:.2f}x KD); "
              f"jacdistill / plain way = {top1 / plain_way:.2f}")
    return 0 if agreed else 1


if __name__ == "__main__":
    raise SystemExit(main())
