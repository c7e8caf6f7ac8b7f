"""The device a run trains on, its seeding, and the allocator setting that keeps a step's memory."""

from __future__ import annotations

from jacdistill_cli.errors import UsageError
from jacdistill_cli.spec.build import check_device_name


def select_device(name: str, local_rank: int | None = None, key: str = "trainer.device"):
    """The torch device of a setting: `auto` (the first GPU when torch sees one, else the CPU), `cpu`,
    `cuda` or `cuda:N`; a GPU that torch does not see is refused in one line. Under torch.distributed
    (`local_rank` given) each rank takes GPU `local_rank` (CPU ranks share the CPU)."""
    import torch

    check_device_name(name, key)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{key}={name!r} is not allowed: torch sees no CUDA GPU on this machine; "
                             f"use {key}=auto or {key}=cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise UsageError(f"{key}={name!r} is not allowed: torch sees {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    if name == "cuda" and local_rank is not None:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)

def describe_device(device) -> str:
    """The device in words for metrics.json: `cpu`, or the GPU's name (`cuda:0 (NVIDIA H200)`)."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)

def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

def keep_freed_memory() -> bool:
    """On Linux with glibc, keep freed memory in the process for the next step's tensors; whether that
    took effect (asking again sets it again: glibc has no call that reads the setting back).

    By default glibc returns large freed blocks to the system and maps fresh pages for the next
    allocation of that size, so every training step pays page faults for its large tensors; a step
    with a Jacobian term allocates more of them (about 10% of its time on a CPU). Elsewhere nothing.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbols, libc's among them: ctypes.util.find_library would run ldconfig.
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, ctypes.c_int(32 * 2**20))   # glibc's largest: blocks below come
                and mallopt(m_trim_threshold, ctypes.c_int(2**30)))   # from the heap, which keeps up to 1 GiB
