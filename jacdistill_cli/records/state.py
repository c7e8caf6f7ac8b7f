"""last.pt, the state a run continues from, and best.pt: read and written whole, with every random state.

last.pt holds the Trainer's `state_dict()` (loop/trainer.py): progress, the distiller's weights, optimiser,
schedule, the named random generators, the global random states and each callback's own state. Version 3;
a last.pt of version 1 or 2 (written before callbacks kept their own state) is read into the same shape.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from jacdistill_cli import storage
from jacdistill_cli.errors import ReadError, UsageError

FORMAT, STATE_VERSION = "jacdistill-state", 3


def random_states() -> dict[str, Any]:
    """torch (CPU and every CUDA device), python and numpy global random states, weights_only-safe."""
    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """A last.pt of an earlier version in today's shape. Version 1 kept the student's and the hint
    regressors' weights apart; versions 1 and 2 kept the best validation accuracy beside the progress (the
    checkpoint callback keeps it now) and had written the teacher's first level point."""
    state = dict(state)
    if "model" not in state:
        features = state.get("modules", {}).get("features", {})
        state["model"] = {**{f"student.{k}": v for k, v in state["student"].items()},
                          **{f"matching.{k}": v for k, v in features.items()}}
    if "callbacks" not in state:
        state["callbacks"] = {"Checkpointing": {"best": dict(state.get("best", {}))},
                              "TeacherLevel": {"started": True}}
    return state


def write_state(path: Path, state: dict[str, Any]) -> None:
    """A Trainer's state_dict as last.pt, written whole."""
    storage.write_torch(path, {"format": FORMAT, "version": STATE_VERSION, **state})


def load_best(path: Path, distiller: Any) -> dict[str, Any]:
    """Put best.pt's weights (the student's and the hint regressors') into the distiller; returns its payload."""
    payload = storage.load_torch(path)
    distiller.student.load_state_dict(payload["state_dict"])
    distiller.load_checkpoint_entries(payload)
    return payload


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = storage.load_torch(path)
    except ReadError as err:   # a file that does not load is one the run cannot continue from
        raise UsageError(f"trainer.resume='auto' is not allowed: {path} cannot be read ({err.reason}); "
                         "start over with trainer.resume=never") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"trainer.resume='auto' is not allowed: {path} is not a jacdistill training state; "
                         "start over with trainer.resume=never")
    if not isinstance(state.get("version"), int) or state["version"] > STATE_VERSION:
        raise UsageError(f"trainer.resume='auto' is not allowed: {path} is a training state of version "
                         f"{state.get('version')}, newer than this jacdistill reads ({STATE_VERSION}); continue it "
                         "with the jacdistill that wrote it, or start over with trainer.resume=never")
    return {**upgraded(state), "source": str(path)}
