"""Datasets by name: train/val/test splits, class count, input shape and normalisation.

A dataset builder takes the `dataset` config node and returns a `DataBundle`. Small datasets are
held in memory as `TensorSplit`s (batched by indexing, on the device); others are torch Datasets
batched by a DataLoader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from jacdistill_cli.errors import UsageError

DATASETS: dict[str, Callable[[DictConfig], "DataBundle"]] = {}


def register_dataset(name: str):
    def add(builder):
        DATASETS[name] = builder
        return builder

    return add


@dataclass
class TensorSplit:
    """A split held in memory: inputs [n, *input] (already normalised), labels [n] (long)."""

    inputs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "TensorSplit":
        return TensorSplit(self.inputs.to(device), self.labels.to(device))


@dataclass
class DataBundle:
    name: str
    train: TensorSplit | Dataset
    val: TensorSplit | Dataset
    test: TensorSplit | Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def to(self, device) -> "DataBundle":
        """Move in-memory splits to the device once, so batching costs no copies."""
        moved = {k: (s.to(device) if isinstance(s, TensorSplit) else s)
                 for k, s in (("train", self.train), ("val", self.val), ("test", self.test))}
        return DataBundle(self.name, moved["train"], moved["val"], moved["test"],
                          self.num_classes, self.input_shape, self.mean, self.std)


def build_data(cfg: DictConfig) -> DataBundle:
    name = cfg.name
    if name not in DATASETS:
        raise UsageError(f"dataset.name={name!r} is not allowed: it must be one of {', '.join(DATASETS)}")
    return DATASETS[name](cfg)


def batches(split: TensorSplit | Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None,
            device: torch.device, num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (inputs [b, *input], labels [b]) on `device`; shuffled by `generator` when asked."""
    if isinstance(split, TensorSplit):
        n = len(split)
        order = torch.randperm(n, generator=generator).to(split.labels.device) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                yield split.inputs[start:start + batch_size], split.labels[start:start + batch_size]
            else:
                index = order[start:start + batch_size]
                yield split.inputs[index], split.labels[index]
        return
    loader = DataLoader(split, batch_size=batch_size, shuffle=shuffle, generator=generator,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    for inputs, labels in loader:
        yield inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def stratified_split(labels: Tensor, fractions: tuple[float, ...], seed: int) -> list[Tensor]:
    """Indices of len(fractions) + 1 disjoint parts, each class divided in the given fractions
    (the last part takes the rest), by a permutation seeded from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for i, fraction in enumerate(fractions):
            count = int(round(fraction * len(members)))
            parts[i].append(members[start:start + count])
            start += count
        parts[-1].append(members[start:])
    return [torch.sort(torch.cat(p)).values for p in parts]


@register_dataset("digits")
def digits(cfg: DictConfig) -> DataBundle:
    """scikit-learn's handwritten digits: 1797 images of 1x8x8 in [0, 16], 10 classes."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw.target, dtype=torch.long)
    mean, std = images.mean().item(), images.std().item()
    images = (images - mean) / std
    fractions = (float(cfg.val_fraction), float(cfg.test_fraction))
    if not (0 < fractions[0] and 0 < fractions[1] and sum(fractions) < 1):
        raise UsageError(f"dataset.val_fraction={fractions[0]} and dataset.test_fraction={fractions[1]} are not "
                         "allowed: each must be > 0 and together < 1")
    val_index, test_index, train_index = stratified_split(labels, fractions, int(cfg.split_seed))
    split = lambda index: TensorSplit(images[index], labels[index])  # noqa: E731
    return DataBundle("digits", split(train_index), split(val_index), split(test_index),
                      num_classes=10, input_shape=(1, 8, 8), mean=[mean], std=[std])
