"""last.pt, the state a run continues from, and best.pt: read and written whole, with every random state."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from jacdistill_cli import storage
from jacdistill_cli.errors import ReadError, UsageError

STATE_VERSION = 2

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

def model_state(state: dict[str, Any]) -> dict[str, Any]:
    """The distiller's state_dict in last.pt; the first layout (version 1) kept the student's and the hint
    regressors' apart."""
    if "model" in state:
        return state["model"]
    features = state.get("modules", {}).get("features", {})
    return {**{f"student.{k}": v for k, v in state["student"].items()},
            **{f"matching.{k}": v for k, v in features.items()}}

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
    if not isinstance(state, dict) or state.get("format") != "jacdistill-state":
        raise UsageError(f"trainer.resume='auto' is not allowed: {path} is not a jacdistill training state; "
                         "start over with trainer.resume=never")
    return state
