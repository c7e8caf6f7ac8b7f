"""The data path against the step: batches per second of a dataset's training split, drawn as training
draws them, set against the optimisation steps per second that `jacdistill bench` timed.

A training run is bound by its data path when the split cannot deliver batches as fast as the step
consumes them. The batches are the training loop's own (`zoo.data.batches`: shuffled by a generator,
augmented when the split is, normalised and on the device), at the bench's batch size, for the
configured `dataset` (default digits). With a CUDA device the time includes the device's work
(synchronised at the end).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig


def batch_rate(dataset: DictConfig, batch_size: int, device: torch.device, count: int, seed: int = 0,
               num_workers: int = 0) -> dict[str, Any]:
    """Time `count` training batches of `dataset` (after one untimed batch), epoch after epoch as
    needed; returns batches and samples per second with what was timed."""
    from jacdistill_cli.zoo.data import batches, build_data

    data = build_data(dataset).to(device)
    generator = torch.Generator().manual_seed(seed)
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def draw(n: int) -> tuple[int, int]:
        drawn = samples = 0
        while drawn < n:
            for inputs, labels in batches(data.train, batch_size, True, generator, device, num_workers):
                drawn, samples = drawn + 1, samples + len(labels)
                if drawn == n:
                    break
        return drawn, samples

    draw(1)   # first-use costs (allocations, kernels) are not the steady rate
    synchronise()
    started = time.perf_counter()
    drawn, samples = draw(count)
    synchronise()
    seconds = max(time.perf_counter() - started, 1e-9)
    split = data.train
    return {"dataset": data.name, "split": type(split).__name__, "train_size": len(split),
            "input_shape": list(data.input_shape), "augmented": getattr(split, "augment", None) is not None,
            "batch_size": batch_size, "batches": drawn, "seconds": seconds,
            "batches_per_second": drawn / seconds, "samples_per_second": samples / seconds}


def compare(rate: dict[str, Any], tables: list[dict[str, Any]]) -> dict[str, Any]:
    """The data path's rate against each benched step's steps per second (1000 / median ms); the
    fastest step (plain KD) is the one the data path must keep up with."""
    steps = {f"{t['classes']} classes: {row['step']}": 1000.0 / row["median_ms"]
             for t in tables for row in t["rows"] if row["median_ms"] > 0}
    fastest = max(steps, key=steps.get) if steps else None
    return {**rate, "steps_per_second": steps, "fastest_step": fastest,
            "x_fastest_step": rate["batches_per_second"] / steps[fastest] if fastest else None}


def format_row(row: dict[str, Any]) -> str:
    """The data-path row as printed below the bench's tables."""
    where = ("uint8 in memory, normalised per batch on the device" if row["split"] == "UInt8Split" else
             "float in memory" if row["split"] == "TensorSplit" else "item by item through a DataLoader")
    text = (f"data path: dataset={row['dataset']} training split ({row['train_size']} samples of "
            f"{'x'.join(map(str, row['input_shape']))}, {where}{', augmented' if row['augmented'] else ''}), "
            f"batch {row['batch_size']}: {row['batches_per_second']:.1f} batches/s "
            f"({row['samples_per_second']:.0f} samples/s over {row['batches']} batches)")
    if row["fastest_step"] is not None:
        verdict = "keeps up with" if row["x_fastest_step"] >= 1 else "is slower than"
        text += (f"\n  against the fastest benched step ({row['fastest_step']}, "
                 f"{row['steps_per_second'][row['fastest_step']]:.1f} steps/s): "
                 f"{row['x_fastest_step']:.1f}x, the data path {verdict} the step")
    return text
