"""Datasets by name: train/val/test splits, class count, input shape, normalisation, augmentation.

A dataset builder takes the `dataset` config node and returns a `DataBundle`. digits and fake are
held in memory as float `TensorSplit`s; files on disk (MNIST, CIFAR, image folders) are read once and,
when their images together fit in `dataset.max_memory_mb`, held as uint8 `UInt8Split`s (a quarter of
float32's memory), moved to the training device with the bundle and normalised there batch by batch.
Both kinds are batched by indexing on the device, with no per-item work. Files that do not fit are
`IndexedSplit`s, torch Datasets batched item by item by a DataLoader (`trainer.num_workers`), in the
same order for the same generator.

Every split yields normalised float inputs [C, H, W]. A training split may carry an `Augment`
(random shifts and flips), applied batch by batch in `batches`; validation and test splits never do.
`samples_per_class` limits the student's training split to a stratified, seeded subset; the full
training split stays available as `DataBundle.teacher_train` for a teacher trained by the runner.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from jacdistill_cli.errors import UsageError, setting_error


def dataset_builder(builder: Callable[[DictConfig], "DataBundle"]) -> Callable[..., "DataBundle"]:
    """A shipped dataset's builder, called (as every dataset `_target_` is) with the node's settings as
    keywords; it reads them as a node."""

    def build(**settings: Any) -> "DataBundle":
        return builder(OmegaConf.create(settings))

    build.__name__, build.__qualname__, build.__doc__ = builder.__name__, builder.__qualname__, builder.__doc__
    build.__module__ = builder.__module__
    return build


@dataclass
class Augment:
    """Standard training augmentation on a normalised batch [b, C, H, W]: a random shift of up to
    `pad` pixels each way (pad, then crop back to H x W; padding takes the normalised value of
    black, `fill` [C]) and, with `flip`, a horizontal flip with probability 1/2. Per sample."""

    pad: int
    flip: bool
    fill: list[float]

    def __call__(self, inputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # One gather from the padded batch: the output pixel (y, x) of sample i is padded pixel
        # (dy_i + y, dx_i + x), or (dy_i + y, dx_i + W - 1 - x) when sample i is flipped. Draws from
        # `generator`: dy [b], dx [b] (when pad > 0), then the flips [b] (when flip).
        b, c, h, w = inputs.shape
        device = inputs.device
        p = self.pad
        rows = torch.arange(h, device=device).expand(b, h)
        cols = torch.arange(w, device=device).expand(b, w)
        padded = inputs
        if p > 0:
            fill = torch.tensor(self.fill, dtype=inputs.dtype, device=device).view(1, c, 1, 1)
            padded = fill.expand(b, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = inputs
            dy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(device)
            rows, cols = dy[:, None] + rows, dx[:, None] + cols
        if self.flip:
            flipped = torch.rand(b, generator=generator).to(device) < 0.5
            cols = torch.where(flipped[:, None], cols.flip(-1), cols)
        if p == 0 and not self.flip:
            return inputs
        index = (rows[:, :, None] * padded.shape[-1] + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return padded.reshape(b, c, -1).gather(2, index).view(b, c, h, w)


@dataclass
class TensorSplit:
    """A split held in memory: inputs [n, *input] (already normalised), labels [n] (long)."""

    inputs: Tensor
    labels: Tensor
    augment: Augment | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "TensorSplit":
        return TensorSplit(self.inputs.to(device), self.labels.to(device), self.augment)

    def subset(self, index: Tensor) -> "TensorSplit":
        index = index.to(self.labels.device)
        return TensorSplit(self.inputs[index], self.labels[index], self.augment)


@dataclass
class UInt8Split:
    """A split of images held in memory as uint8 [n, C, H, W] (0-255) with labels [n] (long), and the
    dataset's per-channel `mean` and `std` [C]. A batch is indexed, scaled to [0, 1] and normalised
    where the images are (on the training device once the bundle is moved): the same float32 values,
    operation for operation, as `UInt8Images` items and torchvision's ToTensor + Normalize."""

    images: Tensor
    labels: Tensor
    mean: Tensor
    std: Tensor
    augment: Augment | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 images [b, C, H, W] -> normalised float32 [b, C, H, W]."""
        # in place on the one new float tensor: the operations of (x / 255 - mean) / std, in that order
        return images.float().div_(255.0).sub_(self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.normalise(self.images[index:index + 1])[0], int(self.labels[index])

    def to(self, device) -> "UInt8Split":
        return UInt8Split(self.images.to(device), self.labels.to(device), self.mean.to(device),
                          self.std.to(device), self.augment)

    def subset(self, index: Tensor) -> "UInt8Split":
        index = index.to(self.labels.device)
        return UInt8Split(self.images[index], self.labels[index], self.mean, self.std, self.augment)


class UInt8Images(Dataset):
    """Images decoded once into memory: uint8 [n, C, H, W] and labels [n]; an item is the image
    scaled to [0, 1] and normalised per channel, [C, H, W] float32, and its label."""

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float]):
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return (self.images[index].float() / 255.0 - self.mean) / self.std, int(self.labels[index])


class IndexedSplit(Dataset):
    """A split of a torch Dataset: the items of `base` at `indices` [n]; `labels` [n] are theirs,
    known without loading the inputs (for stratified subsets)."""

    def __init__(self, base: Dataset, indices: Tensor, labels: Tensor, augment: Augment | None = None):
        self.base = base
        self.indices = indices
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[int(self.indices[index])]

    def subset(self, index: Tensor) -> "IndexedSplit":
        return IndexedSplit(self.base, self.indices[index], self.labels[index], self.augment)


Split = TensorSplit | UInt8Split | IndexedSplit


@dataclass
class DataBundle:
    """train: the student's training split (limited by samples_per_class); teacher_train: the full
    training split, for a teacher trained by the runner (None: the same as train)."""

    name: str
    train: Split | Dataset
    val: Split | Dataset
    test: Split | Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    teacher_train: Split | Dataset | None = None
    config: dict[str, Any] = field(default_factory=dict)
    # The range of the images' pixels before normalisation (digits: grey levels 0..16 / 16; files: 0..255 / 255);
    # None for data that are no images of a range (fake): robustness attacks are then not clipped.
    pixel_range: tuple[float, float] | None = (0.0, 1.0)

    def to(self, device) -> "DataBundle":
        """Move in-memory splits to the device once, so batching costs no copies."""
        move = lambda s: s.to(device) if in_memory(s) else s  # noqa: E731
        return dataclasses.replace(self, train=move(self.train), val=move(self.val), test=move(self.test),
                                   teacher_train=None if self.teacher_train is None else move(self.teacher_train))

    def for_teacher(self, samples_per_class: int | None = None, seed: int = 0) -> "DataBundle":
        """The bundle a teacher trains on: the full training split, or a stratified subset of it."""
        full = self.train if self.teacher_train is None else self.teacher_train
        if samples_per_class is not None:
            full = per_class_subset(full, samples_per_class, seed, "teacher.samples_per_class")
        return dataclasses.replace(self, train=full, teacher_train=full,
                                   config={**self.config, "samples_per_class": samples_per_class})


def build_data(cfg: DictConfig) -> DataBundle:
    """The bundle of the `dataset` node: the builder's splits, then `samples_per_class`."""
    from jacdistill_cli.config import registry

    split_seed(cfg)
    bundle = registry.build("dataset", cfg)
    bundle.config = OmegaConf.to_container(cfg, resolve=True)
    if bundle.config.get("root") is not None:
        # stored in checkpoints: `jacdistill evaluate` finds the files from any working directory
        bundle.config["root"] = str(data_root(cfg))
    for split in ("train", "val", "test"):
        if len(getattr(bundle, split)) == 0:
            raise UsageError(f"dataset {bundle.name}: its {split} split is empty ({len(bundle.train)} training, "
                             f"{len(bundle.val)} validation, {len(bundle.test)} test samples); give more samples "
                             "per class, or larger dataset.val_fraction/dataset.test_fraction")
    samples = cfg.get("samples_per_class")
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise setting_error("dataset.samples_per_class", samples, "it must be null (all) or an integer >= 1")
        full = bundle.train
        bundle.train = per_class_subset(full, samples, split_seed(cfg), "dataset.samples_per_class")
        bundle.teacher_train = full
    return bundle


def split_seed(cfg: DictConfig) -> int:
    """dataset.split_seed: the seed of the train/val/test split and of subsets, an integer >= 0."""
    seed = cfg.get("split_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise setting_error("dataset.split_seed", seed, "it must be an integer >= 0")
    return seed


def batches(split: Split | Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None,
            device: torch.device, num_workers: int = 0, indices: bool = False) -> Iterator[tuple[Tensor, ...]]:
    """Yield (inputs [b, *input], labels [b]) on `device`; shuffled by `generator` when asked;
    augmented when the split carries an augmentation (training splits only). With `indices` (splits held
    in memory only), (inputs, labels, the samples' indices in the split [b])."""
    augment = getattr(split, "augment", None)
    if indices and not in_memory(split):
        raise ValueError("batches(indices=True) needs a split held in memory")
    if in_memory(split):
        n = len(split)
        data = split.inputs if isinstance(split, TensorSplit) else split.images
        order = torch.randperm(n, generator=generator).to(split.labels.device) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                index = (torch.arange(start, min(start + batch_size, n), device=split.labels.device)
                         if indices else None)
                inputs, labels = data[start:start + batch_size], split.labels[start:start + batch_size]
            else:
                index = order[start:start + batch_size]
                inputs, labels = data[index], split.labels[index]
            if isinstance(split, UInt8Split):
                inputs = split.normalise(inputs)
            inputs = augment(inputs, generator) if augment else inputs
            yield (inputs, labels, index) if indices else (inputs, labels)
        return
    # The same order as above: one permutation drawn from `generator` when the epoch's first batch is
    # asked for, then the augmentation's draws, batch by batch. (A DataLoader given the generator would
    # draw from it first, for its workers' base seed; their seed does not matter here: no item is random.)
    sampler = EpochOrder(len(split), generator) if shuffle else None
    loader = DataLoader(split, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0), pin_memory=device.type == "cuda")
    for inputs, labels in loader:
        inputs = inputs.to(device, non_blocking=True)
        yield (augment(inputs, generator) if augment else inputs), labels.to(device, non_blocking=True)


def in_memory(split: Any) -> bool:
    """A split batched by indexing (held in memory), not item by item by a DataLoader."""
    return isinstance(split, (TensorSplit, UInt8Split))


class EpochOrder(torch.utils.data.Sampler):
    """Indices of one epoch in the order of `torch.randperm(n, generator=generator)`, drawn when the
    first index is taken: the order in which in-memory splits are batched."""

    def __init__(self, n: int, generator: torch.Generator | None):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=self.generator).tolist()


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose (a split, a subset), so that streams drawn from one `seed` differ."""
    return int(hashlib.sha256(f"{seed}:{purpose}".encode()).hexdigest()[:12], 16)


def stratified_split(labels: Tensor, fractions: tuple[float, ...], seed: int) -> list[Tensor]:
    """Indices of len(fractions) + 1 disjoint parts, each class divided in the given fractions
    (the last part takes the rest), by a permutation seeded from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
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


def per_class_indices(labels: Tensor, samples_per_class: int, seed: int, key: str) -> Tensor:
    """Sorted indices [classes * samples_per_class]: the first `samples_per_class` members of each
    class in a permutation seeded from `seed`. Subsets for one seed are nested (10 within 50 within 500)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "samples_per_class"))
    labels = labels.cpu()
    chosen = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        if len(members) < samples_per_class:
            raise setting_error(key, samples_per_class, f"class {cls} has only {len(members)} training samples")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:samples_per_class]])
    return torch.sort(torch.cat(chosen)).values


def per_class_subset(split: Split, samples_per_class: int, seed: int, key: str) -> Split:
    """A stratified subset of a training split: exactly `samples_per_class` samples of each class."""
    return split.subset(per_class_indices(split.labels, samples_per_class, seed, key))


def fractions_of(cfg: DictConfig, *keys: str) -> tuple[float, ...]:
    """Split fractions from the dataset node: each > 0, together < 1."""
    values = tuple(float(cfg[k]) for k in keys)
    if not (all(v > 0 for v in values) and sum(values) < 1):
        named = " and ".join(f"dataset.{k}={cfg[k]}" for k in keys)
        raise UsageError(f"{named} {'is' if len(keys) == 1 else 'are'} not allowed: each must be > 0 "
                         "and together < 1")
    return values


def training_augment(cfg: DictConfig, pad: int, flip: bool, mean: Sequence[float],
                     std: Sequence[float]) -> Augment | None:
    """The dataset's standard augmentation when `augment` is true."""
    augment = cfg.get("augment", False)
    if not isinstance(augment, bool):
        raise setting_error("dataset.augment", augment, "it must be true or false")
    if not augment:
        return None
    return Augment(pad=pad, flip=flip, fill=[-m / s for m, s in zip(mean, std)])


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as images [1797, 1, 8, 8] in [0, 1] and labels [1797]; read once per process."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(raw.target, dtype=torch.long)


@dataset_builder
def digits(cfg: DictConfig) -> DataBundle:
    """scikit-learn's handwritten digits: 1797 images of 1x8x8 in [0, 16], 10 classes.
    Augmentation: shifts of one pixel (no flips: digits are not mirror-symmetric)."""
    images, labels = digits_arrays()
    mean, std = images.mean().item(), images.std().item()
    images = (images - mean) / std
    fractions = fractions_of(cfg, "val_fraction", "test_fraction")
    val_index, test_index, train_index = stratified_split(labels, fractions, split_seed(cfg))
    augment = training_augment(cfg, pad=1, flip=False, mean=[mean], std=[std])
    split = lambda index, aug=None: TensorSplit(images[index], labels[index], aug)  # noqa: E731
    return DataBundle("digits", split(train_index, augment), split(val_index), split(test_index),
                      num_classes=10, input_shape=(1, 8, 8), mean=[mean], std=[std])


@dataset_builder
def fake(cfg: DictConfig) -> DataBundle:
    """Synthetic images of any shape and class count, in memory, the same for the same `data_seed`.

    Each class has a smooth random prototype (a 4x4 Gaussian pattern upsampled to H x W); an image
    is its class prototype plus Gaussian noise of std `noise`. Classes are balanced (label i % classes).
    """
    shape = tuple(int(v) for v in cfg.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise setting_error("dataset.shape", list(cfg.shape), "it must be [channels, height, width], each >= 1")
    num_classes = cfg.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise setting_error("dataset.num_classes", num_classes, "it must be an integer >= 2")
    sizes = {}
    for key in ("train_size", "val_size", "test_size"):
        size = cfg[key]
        if isinstance(size, bool) or not isinstance(size, int) or size < num_classes:
            raise setting_error(f"dataset.{key}", size, f"it must be an integer >= num_classes ({num_classes})")
        sizes[key] = size
    generator = torch.Generator().manual_seed(int(cfg.data_seed))
    channels, height, width = shape
    coarse = torch.randn(num_classes, channels, 4, 4, generator=generator)
    prototypes = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)

    def make(n: int) -> TensorSplit:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
        noise = torch.randn(n, *shape, generator=generator) * float(cfg.noise)
        return TensorSplit(prototypes[labels] + noise, labels)

    train, val, test = (make(sizes[k]) for k in ("train_size", "val_size", "test_size"))
    mean, std = [0.0] * channels, [1.0] * channels
    train.augment = training_augment(cfg, pad=max(1, height // 8), flip=True, mean=mean, std=std)
    return DataBundle("fake", train, val, test, num_classes=num_classes, input_shape=shape, mean=mean, std=std,
                      pixel_range=None)


# ---------------------------------------------------------------- files on disk (torchvision's loaders)


def data_root(cfg: DictConfig) -> Path:
    return Path(os.path.expanduser(str(cfg.root))).resolve()
