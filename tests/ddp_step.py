"""One optimisation step of the Trainer on a fixed global batch, in one process or as one rank of several:
the worker of tests/test_distributed.py (importable by the processes the launcher spawns)."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_module

from jacdistill_cli.engine.objective import objective_from_settings
from jacdistill_cli.loop import distributed
from jacdistill_cli.loop.distiller import Distiller
from jacdistill_cli.loop.trainer import Trainer
from jacdistill_cli.spec.build import objective_spec
from jacdistill_cli.spec.reader import Reader
from jacdistill_cli.spec.run import LoopSpec, OptimSpec
from jacdistill_cli.zoo.data import DataBundle, TensorSplit
from jacdistill_cli.zoo.models import build_model

CASES = {"top1": ["jacobian=top1"], "target": ["jacobian=target"], "projected": ["jacobian=projected"],
         "exact": ["jacobian=exact"], "noise": ["jacobian=noise"], "hint": ["jacobian=top1", "features=hint"]}
SHAPE, CLASSES, BATCH, SEED = (1, 8, 8), 4, 8, 0


def models():
    torch.manual_seed(SEED)
    spec = {"name": "cnn", "channels": [3, 4], "hidden": 6, "batchnorm": True}
    student = build_model(spec, SHAPE, CLASSES).train()
    teacher = build_model({**spec, "channels": [4, 5]}, SHAPE, CLASSES).eval().requires_grad_(False)
    return student, teacher


def data() -> DataBundle:
    g = torch.Generator().manual_seed(1)
    split = TensorSplit(torch.randn(BATCH, *SHAPE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
    return DataBundle("toy", split, split, split, CLASSES, SHAPE)


def objective_for(case: str, student, teacher):
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=CASES[case])
    built, matching = objective_from_settings(objective_spec(Reader(cfg)), teacher, student, SHAPE,
                                              generator=torch.Generator().manual_seed(SEED))
    return built, matching


def sgd() -> OptimSpec:
    return OptimSpec("sgd", lambda params: torch.optim.SGD(params, lr=0.5), "constant")


def step(case: str, world: distributed.World) -> list[torch.Tensor]:
    """The student's and the hint regressor's parameters after one step on the global batch."""
    student, teacher = models()
    built, matching = objective_for(case, student, teacher)
    cpu = torch.device("cpu")
    distiller = Distiller(student, teacher, built, matching).distribute(world, cpu)
    extra = distiller.objective_parameters()
    Trainer(LoopSpec(1, BATCH, BATCH), sgd(), cpu, world=world, seed=SEED).fit(distiller, data())
    return [p.detach().clone() for p in [*student.parameters(), *extra]]


def rank_step(cases: list[str]) -> dict[str, list[torch.Tensor]]:
    torch.set_num_threads(1)
    world = distributed.world_from_environment()
    with distributed.joined(world, "cpu"):
        return {case: step(case, world) for case in cases}


def reference_step(case: str) -> list[torch.Tensor]:
    """One process, the same global batch, BatchNorm per half as on two ranks: the mean of the two
    halves' objectives (each with the rank's generator state), one SGD step."""
    student, teacher = models()
    bundle = data()
    order = torch.randperm(BATCH, generator=torch.Generator().manual_seed(SEED))
    inputs, labels = bundle.train.inputs[order], bundle.train.labels[order]
    total = 0
    matching = None
    for half in range(2):
        built, matching_half = objective_for(case, student, teacher)
        if matching is None:
            matching = matching_half
        else:   # one regressor, as the ranks hold one (the same initial values)
            matching_half.load_state_dict(matching.state_dict())
            built.matching = matching
            for term in built.terms:
                if hasattr(term, "matching"):
                    term.matching = matching
        part = slice(half * BATCH // 2, (half + 1) * BATCH // 2)
        total = total + built(student, teacher, inputs[part], labels[part])[1]["total"] / 2
    extra = list(matching.parameters()) if matching is not None else []
    optimizer = sgd().build([*student.parameters(), *extra])
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return [p.detach().clone() for p in [*student.parameters(), *extra]]



def group_states() -> list[bool]:
    """On a rank: whether a process group is in place inside distributed.joined's block, and after the
    block raised."""
    import torch.distributed as dist

    world, states = distributed.world_from_environment(), []
    try:
        with distributed.joined(world, "cpu"):
            states.append(dist.is_initialized() and distributed.broadcast(world.rank, world) == 0)
            raise RuntimeError("a failure inside the block")
    except RuntimeError:
        states.append(dist.is_initialized())
    return states
