"""Data-parallel training on torch.distributed: one process per device, the student in
DistributedDataParallel, the frozen teacher not wrapped.

`jacdistill train trainer.devices=N` starts N workers itself through torch's elastic launcher (the
engine under `torchrun`); a run started by an external `torchrun` or SLURM `srun` reads its rank,
world size and rendezvous from the environment. Each rank takes its own shard of every global batch
(`trainer.batch_size` is the global batch, drawn by the same generator on every rank), evaluation is
sharded and its sums reduced, and only rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def world_from_environment() -> World:
    """torchrun (and the elastic launcher) set RANK, WORLD_SIZE, LOCAL_RANK; SLURM's srun sets
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (then MASTER_ADDR and MASTER_PORT must be exported)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return SINGLE


@contextlib.contextmanager
def joined(world: World, device_type: str) -> Iterator[None]:
    """In the process group (NCCL on GPUs, gloo on CPUs) for the block, left however the block ends: a
    process that exits with a gloo group in place can abort ("terminate called without an active exception")."""
    if not world.distributed or dist.is_initialized():
        yield
        return
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(minutes=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard(*tensors: Tensor, world: World) -> tuple[Tensor, ...]:
    """This rank's contiguous part of each tensor of a global batch (sizes differ by at most one)."""
    if not world.distributed:
        return tensors
    return tuple(torch.tensor_split(t, world.size)[world.rank] for t in tensors)


def reduce_sums(values: list[float], world: World, device: torch.device) -> list[float]:
    """The sums over all ranks of each value."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_over_ranks(tensor: Tensor, world: World) -> Tensor:
    """The element-wise sum of `tensor` over all ranks (this rank's own without torch.distributed)."""
    if world.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def gather_rows(row: Tensor, world: World) -> Tensor:
    """Every rank's 1-d tensor `row` (of the same length), stacked in rank order: [ranks, n]."""
    if not world.distributed:
        return row.unsqueeze(0)
    rows = [torch.empty_like(row) for _ in range(world.size)]
    dist.all_gather(rows, row.contiguous())
    return torch.stack(rows)


def reduce_max(value: int, world: World, device: torch.device) -> int:
    """The largest value over all ranks (a tensor on the training device: NCCL reduces CUDA tensors only)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's value, on every rank (any picklable object)."""
    if not world.distributed:
        return value
    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_parameters(parameters: list[torch.nn.Parameter], world: World) -> None:
    """Rank 0's values of parameters that DDP does not hold (a hint regressor), on every rank."""
    if world.distributed:
        for p in parameters:
            dist.broadcast(p.data, src=0)


def average_gradients(parameters: list[torch.nn.Parameter], world: World) -> None:
    """Sum the ranks' gradients of parameters that DDP does not hold and divide by the world size, as
    DDP does for the student's."""
    if world.distributed:
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world.size


def all_gather(value: Any, world: World) -> list[Any]:
    """Every rank's value, in rank order (any picklable object)."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


# torch's agent logs each step of stopping its workers at WARNING; the workers say what happened to the run.
AGENT_LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")


def launch(worker: Callable[..., Any], args: tuple, processes: int, run_id: str | None = None,
           forward: tuple[int, ...] = ()) -> Any:
    """Run `worker(*args)` in `processes` local processes through torch's elastic launcher (what
    `torchrun --standalone --nproc-per-node=N` does); returns rank 0's return value.

    torch's agent stops the workers with the signal it gets for SIGINT, SIGTERM, SIGHUP and SIGQUIT (then
    raises its SignalException here); the signals in `forward` (SIGUSR1, which it leaves alone) are passed
    on to the workers as they are, and the launch ends as the workers do."""
    import logging
    import multiprocessing
    import signal

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    def forward_to_workers(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():   # the agent's workers: spawned by this process
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=run_id or uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    previous = {signum: signal.signal(signum, forward_to_workers) for signum in forward}
    quiet = [] if "LOGLEVEL" in os.environ else [logging.getLogger(name) for name in AGENT_LOGGERS]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        results = elastic_launch(config, worker)(*args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return results[0]
