"""What every command needs from its surroundings: Hydra's run directory, the device, seeding."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.errors import UsageError

MAX_DIRNAME = 120
# Hydra's own sweeper runs each combination of values once, so its jobs' overrides are unique.
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def job_dirname(override_dirname: str, job_num: Any, _root_: Any = None) -> str:
    """A sweep job's directory name: its overrides (`alpha=0.3,jacobian=exact`), made safe for a file name.

    TensorBoard names each run of a sweep directory by this name. It stays unique: a name whose
    characters had to be replaced, or that was cut to MAX_DIRNAME, ends in `~` and a short hash of the
    overrides; under a sweeper other than Hydra's basic one (Optuna may draw the same values twice)
    the job number comes first (`007,alpha=0.31`). A job with no overrides is named by its number.
    """
    original = str(override_dirname)
    name = re.sub(r"[^A-Za-z0-9=,._+\-]", "_", original).strip("._")
    if not name:
        return str(job_num)
    if name != original or len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(original.encode()).hexdigest()[:8]
        name = f"{name[:MAX_DIRNAME - 9]}~{digest}"
    sweeper = OmegaConf.select(_root_, "hydra.sweeper._target_", default=None) if _root_ is not None else None
    if sweeper not in (None, BASIC_SWEEPER):
        name = f"{int(job_num):03d},{name}"
    return name


_UNIQUE: list[str] = []


def unique_suffix() -> str:
    """A short random name part, the same for the whole process: default run directories
    (`outputs/train/DATE/TIME-3f9a1c`) of runs started in the same second differ by it. Six hex
    digits keep names short for TensorBoard; a collision (one in 16 million) is still caught: a
    run refuses a directory that another configuration's results or a live run hold."""
    import secrets

    if not _UNIQUE:
        _UNIQUE.append(secrets.token_hex(3))
    return _UNIQUE[0]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("jd_job_dir"):
        OmegaConf.register_new_resolver("jd_job_dir", job_dirname)
    if not OmegaConf.has_resolver("jd_unique"):
        # Cached in the config like Hydra's `now`, so a sweep's jobs (copies of its config) share it.
        OmegaConf.register_new_resolver("jd_unique", unique_suffix, use_cache=True)


def run_directory() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir).resolve()


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra saves the config as composed (.hydra/config.yaml); this is the one with values filled in."""
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)


def select_device(name: str, local_rank: int | None = None):
    """The training device; under torch.distributed each rank takes GPU `local_rank` (CPU ranks share the CPU)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("trainer.device='cuda' is not allowed: torch sees no CUDA GPU on this machine; "
                         "use trainer.device=auto or trainer.device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cache_directory(cfg: DictConfig) -> Path:
    return Path(os.path.expanduser(str(cfg.cache_dir)))


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
