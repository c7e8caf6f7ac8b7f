"""Datasets by name: train/val/test splits, class count, input shape, normalisation, augmentation.

A dataset builder takes the `dataset` config node and returns a `DataBundle`. Small datasets are
held in memory as `TensorSplit`s (batched by indexing, on the device); files on disk (MNIST, CIFAR,
image folders) are `IndexedSplit`s, torch Datasets batched by a DataLoader.

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
import pickle
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
        b, c, h, w = inputs.shape
        out = inputs
        if self.pad > 0:
            p = self.pad
            fill = torch.tensor(self.fill, dtype=inputs.dtype, device=inputs.device).view(1, c, 1, 1)
            padded = fill.expand(b, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = inputs
            dy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(inputs.device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(inputs.device)
            rows = (dy[:, None] + torch.arange(h, device=inputs.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=inputs.device))[:, None, None, :]
            samples = torch.arange(b, device=inputs.device)[:, None, None, None]
            channels = torch.arange(c, device=inputs.device)[None, :, None, None]
            out = padded[samples, channels, rows, cols]
        if self.flip:
            flipped = torch.rand(b, generator=generator).to(inputs.device) < 0.5
            out = torch.where(flipped[:, None, None, None], out.flip(-1), out)
        return out


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


Split = TensorSplit | IndexedSplit


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

    def to(self, device) -> "DataBundle":
        """Move in-memory splits to the device once, so batching costs no copies."""
        move = lambda s: s.to(device) if isinstance(s, TensorSplit) else s  # noqa: E731
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
            raise UsageError(f"dataset {name}: its {split} split is empty ({len(bundle.train)} training, "
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
            device: torch.device, num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (inputs [b, *input], labels [b]) on `device`; shuffled by `generator` when asked;
    augmented when the split carries an augmentation (training splits only)."""
    augment = getattr(split, "augment", None)
    if isinstance(split, TensorSplit):
        n = len(split)
        order = torch.randperm(n, generator=generator).to(split.labels.device) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                inputs, labels = split.inputs[start:start + batch_size], split.labels[start:start + batch_size]
            else:
                index = order[start:start + batch_size]
                inputs, labels = split.inputs[index], split.labels[index]
            yield (augment(inputs, generator) if augment else inputs), labels
        return
    loader = DataLoader(split, batch_size=batch_size, shuffle=shuffle, generator=generator,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    for inputs, labels in loader:
        inputs = inputs.to(device, non_blocking=True)
        yield (augment(inputs, generator) if augment else inputs), labels.to(device, non_blocking=True)


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
    return DataBundle("fake", train, val, test, num_classes=num_classes, input_shape=shape, mean=mean, std=std)


# ---------------------------------------------------------------- files on disk (torchvision's loaders)

def data_root(cfg: DictConfig) -> Path:
    return Path(os.path.expanduser(str(cfg.root))).resolve()


def download_flag(cfg: DictConfig) -> bool:
    download = cfg.get("download", False)
    if not isinstance(download, bool):
        raise setting_error("dataset.download", download, "it must be true or false")
    return download


def failed_download(name: str, root: Path, err: Exception, how: str) -> UsageError:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    reason = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    return UsageError(f"dataset {name}: could not download into {root} ({reason}); {how}")


def holdout_bundle(cfg: DictConfig, name: str, base_train: Dataset, train_labels: Tensor, base_test: Dataset,
                   test_labels: Tensor, num_classes: int, input_shape: tuple[int, ...], mean: list[float],
                   std: list[float], augment: Augment | None) -> DataBundle:
    """Train/val from a stratified, seeded hold-out of the official training files; test from the test files."""
    (val_fraction,) = fractions_of(cfg, "val_fraction")
    val_index, train_index = stratified_split(train_labels, (val_fraction,), split_seed(cfg))
    test_index = torch.arange(len(test_labels))
    return DataBundle(name, IndexedSplit(base_train, train_index, train_labels[train_index], augment),
                      IndexedSplit(base_train, val_index, train_labels[val_index]),
                      IndexedSplit(base_test, test_index, test_labels),
                      num_classes=num_classes, input_shape=input_shape, mean=mean, std=std)


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def mnist_like(cfg: DictConfig, name: str, loader_name: str, flip: bool) -> DataBundle:
    """MNIST or Fashion-MNIST through torchvision's loader: 1x28x28, 10 classes.

    Expects ROOT/<MNIST|FashionMNIST>/raw/ with the four idx files, plain or gzipped (.gz files
    are unpacked there first, as torchvision's own download does)."""
    import torchvision
    from torchvision.datasets.utils import extract_archive

    loader = getattr(torchvision.datasets, loader_name)
    root = data_root(cfg)
    raw = root / loader_name / "raw"
    for file in MNIST_FILES:
        if not (raw / file).is_file() and (raw / f"{file}.gz").is_file():
            extract_archive(str(raw / f"{file}.gz"), str(raw))
    how = (f"put {', '.join(f + '.gz' for f in MNIST_FILES)} (or the same files unpacked) in {raw}, "
           "or set dataset.root to the directory that holds "
           f"{loader_name}/raw, or dataset.download=true on a machine with network")
    download = download_flag(cfg)
    if not all((raw / f).is_file() for f in MNIST_FILES) and not download:
        raise UsageError(f"dataset {name}: files not found in {raw}; {how}")
    try:
        train = loader(str(root), train=True, download=download)
        test = loader(str(root), train=False, download=download)
    except (RuntimeError, OSError, ValueError, AssertionError) as err:
        if all((raw / f).is_file() for f in MNIST_FILES):
            raise UsageError(f"dataset {name}: the files in {raw} cannot be read as idx files ({err}); {how}") from None
        raise failed_download(name, root, err, how) from None
    mean, std = list(cfg.mean), list(cfg.std)
    augment = training_augment(cfg, pad=2, flip=flip, mean=mean, std=std)
    train_labels, test_labels = train.targets.long(), test.targets.long()
    return holdout_bundle(cfg, name, UInt8Images(train.data.unsqueeze(1), train_labels, mean, std), train_labels,
                          UInt8Images(test.data.unsqueeze(1), test_labels, mean, std), test_labels,
                          10, (1, 28, 28), mean, std, augment)


@dataset_builder
def mnist(cfg: DictConfig) -> DataBundle:
    """MNIST handwritten digits. Augmentation: shifts of up to 2 pixels, no flips."""
    return mnist_like(cfg, "mnist", "MNIST", flip=False)


@dataset_builder
def fashion_mnist(cfg: DictConfig) -> DataBundle:
    """Fashion-MNIST clothing images. Augmentation: shifts of up to 2 pixels and horizontal flips."""
    return mnist_like(cfg, "fashion_mnist", "FashionMNIST", flip=True)


class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR python batch without running code: it admits only what the published files
    (and the same format written by numpy 1 or 2) hold: dicts, lists, str, bytes, ints, and numpy
    arrays of numeric dtypes. A pickle naming any other callable is refused (pickle.UnpicklingError)
    before anything is called, whatever its md5 checksum or `dataset.verify` says."""

    def find_class(self, module: str, name: str):
        allowed = CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"it would call {module}.{name}, which a CIFAR batch never holds")
        return allowed()


def _numeric_dtype(*args):
    """numpy.dtype, for numeric types only (bool, integers, floats): an object dtype would let an
    array hold arbitrary objects."""
    import numpy as np

    dtype = np.dtype(*args)
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise pickle.UnpicklingError(f"it holds an array of dtype {dtype}, not of numbers")
    return dtype


def _reconstruct(subtype, shape, dtype_code):
    """numpy's _reconstruct (the first step of unpickling an array), for plain ndarrays only."""
    import numpy as np

    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("it holds an array subclass, not a plain numpy array")
    return np.ndarray.__new__(np.ndarray, shape, _numeric_dtype(dtype_code))


def _frombuffer(buffer, dtype, shape, order):
    """numpy's _frombuffer (arrays pickled with protocol 5), for numeric dtypes only."""
    import numpy as np

    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("it holds an array built from something other than bytes")
    _numeric_dtype(dtype)
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)
    return array.copy()


def _latin1_bytes(text, encoding="latin1"):
    """_codecs.encode as Python 3 pickles bytes for protocol 2: str to bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("it encodes something other than a latin-1 string")
    return text.encode("latin1")


def _ndarray():
    import numpy as np

    return np.ndarray


# (module, name) -> the object handed to the unpickler. numpy 1 writes numpy.core, numpy 2 numpy._core.
CIFAR_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): (lambda: _reconstruct) for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): (lambda: _frombuffer) for core in ("core", "_core")},
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): lambda: _numeric_dtype,
    ("_codecs", "encode"): lambda: _latin1_bytes,
}


def read_cifar_batch(path: Path, what: str) -> dict:
    """One CIFAR python batch (or meta) file as a dict with str keys, read by CifarUnpickler.
    Python 2 str objects (the published files) are read as latin-1. Raises pickle.UnpicklingError."""
    with open(path, "rb") as f:
        try:
            entry = CifarUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError:
            raise
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file: any parse failure
            raise pickle.UnpicklingError(f"it cannot be parsed as a pickle ({type(err).__name__}: {err})") from None
    if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
        raise pickle.UnpicklingError(f"it holds a {type(entry).__name__}, not the dict of a CIFAR {what}")
    return entry


def cifar_images_and_labels(path: Path, label_key: str) -> tuple[Any, list[int]]:
    """data [n, 3072] uint8 and labels [n] of one batch file, checked against the published format."""
    import numpy as np

    entry = read_cifar_batch(path, "batch")
    data = entry.get("data")
    labels = entry.get(label_key, entry.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise pickle.UnpicklingError("its 'data' is not a uint8 array of shape [n, 3072]")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise pickle.UnpicklingError(f"its '{label_key}' is not a list of {len(data)} integer labels")
    return data, [int(v) for v in labels]


def cifar(cfg: DictConfig, name: str, loader_name: str, num_classes: int) -> DataBundle:
    """CIFAR-10/100 in torchvision's file layout: ROOT/cifar-10-batches-py or ROOT/cifar-100-python
    (python pickle batches), or the .tar.gz archive in ROOT (unpacked first). The batches are read by
    CifarUnpickler (no code runs, whatever `dataset.verify` says); with verify=true (the default) each
    file must also match the md5 checksum of the published file."""
    import numpy as np
    import torchvision
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive

    published = getattr(torchvision.datasets, loader_name)
    root = data_root(cfg)
    folder = root / published.base_folder
    checked = published.train_list + published.test_list + [[published.meta["filename"], published.meta["md5"]]]
    files = [f for f, _ in checked]
    archive = root / published.filename
    if not all((folder / f).is_file() for f in files) and archive.is_file():
        extract_archive(str(archive), str(root))
    how = (f"put {published.filename} from https://www.cs.toronto.edu/~kriz/cifar.html (or its unpacked "
           f"folder {published.base_folder}/) in {root}, or set dataset.root to the directory that holds it, "
           "or dataset.download=true on a machine with network")
    download = download_flag(cfg)
    verify = cfg.get("verify", True)
    if not isinstance(verify, bool):
        raise setting_error("dataset.verify", verify, "it must be true or false")
    if not all((folder / f).is_file() for f in files):
        if not download:
            raise UsageError(f"dataset {name}: files not found in {folder} (expected {', '.join(files)}); {how}")
        try:
            download_and_extract_archive(published.url, str(root), filename=published.filename,
                                         md5=published.tgz_md5)
        except (RuntimeError, OSError, ValueError) as err:
            raise failed_download(name, root, err, how) from None
    if verify and not all(check_integrity(str(folder / f), md5) for f, md5 in checked):
        raise UsageError(f"dataset {name}: the files in {folder} do not match the md5 checksums of the "
                         "published CIFAR files (corrupted or modified); replace them, or set "
                         "dataset.verify=false to use them as they are (they are still read as data only)")
    label_key = "labels" if num_classes == 10 else "fine_labels"
    parts: dict[str, tuple[Any, list[int]]] = {}
    for split, listed in (("train", published.train_list), ("test", published.test_list)):
        arrays, labels = [], []
        for file, _ in listed:
            try:
                data, batch_labels = cifar_images_and_labels(folder / file, label_key)
            except pickle.UnpicklingError as err:
                raise UsageError(f"dataset {name}: {folder / file} is refused: {err}; a CIFAR python batch holds "
                                 "only a dict of a uint8 array and lists") from None
            arrays.append(data)
            labels += batch_labels
        parts[split] = (np.concatenate(arrays), labels)
    try:
        read_cifar_batch(folder / published.meta["filename"], "meta file")
    except pickle.UnpicklingError as err:
        raise UsageError(f"dataset {name}: {folder / published.meta['filename']} is refused: {err}") from None
    for split, (_, labels) in parts.items():
        if labels and not 0 <= min(labels) <= max(labels) < num_classes:
            raise UsageError(f"dataset {name}: the {split} labels in {folder} are not all in [0, {num_classes})")
    mean, std = list(cfg.mean), list(cfg.std)
    augment = training_augment(cfg, pad=4, flip=True, mean=mean, std=std)
    to_images = lambda data: torch.from_numpy(data.reshape(-1, 3, 32, 32)).contiguous()  # noqa: E731
    train_labels = torch.tensor(parts["train"][1], dtype=torch.long)
    test_labels = torch.tensor(parts["test"][1], dtype=torch.long)
    return holdout_bundle(cfg, name, UInt8Images(to_images(parts["train"][0]), train_labels, mean, std),
                          train_labels, UInt8Images(to_images(parts["test"][0]), test_labels, mean, std),
                          test_labels, num_classes, (3, 32, 32), mean, std, augment)


@dataset_builder
def cifar10(cfg: DictConfig) -> DataBundle:
    """CIFAR-10: 50000 training and 10000 test images, 10 classes. Augmentation: shifts of up to 4
    pixels (pad 4, crop 32) and horizontal flips."""
    return cifar(cfg, "cifar10", "CIFAR10", 10)


@dataset_builder
def cifar100(cfg: DictConfig) -> DataBundle:
    """CIFAR-100: 50000 training and 10000 test images, 100 classes. Augmentation as CIFAR-10."""
    return cifar(cfg, "cifar100", "CIFAR100", 100)


# ---------------------------------------------------------------- a directory of class folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataset_builder
def imagefolder(cfg: DictConfig) -> DataBundle:
    """A directory of class folders (ROOT/<class>/<image>), read by torchvision's ImageFolder.

    With ROOT/train and ROOT/test (each holding the same class folders), those are the training and
    test splits, and the validation split is ROOT/val if present, else a stratified `val_fraction`
    of ROOT/train. Otherwise ROOT's class folders are one pool, split stratified and seeded into
    val_fraction, test_fraction and the rest for training. Images are resized to `image_size` and
    converted to `channels` (1: grayscale, 3: RGB). Normalisation is `mean`/`std`, or, when null,
    estimated from up to 1000 training images.
    """
    import torchvision
    from torchvision import transforms

    if cfg.get("root") is None:
        raise UsageError("dataset.root=null is not allowed: imagefolder needs the directory of your class "
                         "folders, e.g. dataset.root=~/images (ROOT/<class>/<image>)")
    root = data_root(cfg)
    if not root.is_dir():
        raise UsageError(f"dataset.root={str(root)!r} is not allowed: no such directory; imagefolder expects "
                         "ROOT/<class>/<image> (or ROOT/train/<class>/... and ROOT/test/<class>/...)")
    channels = cfg.channels
    if channels not in (1, 3):
        raise setting_error("dataset.channels", channels, "it must be 1 (grayscale) or 3 (RGB)")
    size = cfg.image_size
    size = [size, size] if isinstance(size, int) else list(size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise setting_error("dataset.image_size", cfg.image_size, "it must be an integer or [height, width], >= 1")
    convert = transforms.Grayscale(1) if channels == 1 else transforms.Lambda(_rgb)
    base_transform = [convert, transforms.Resize(size), transforms.ToTensor()]

    def folder(path: Path, transform: list) -> torchvision.datasets.ImageFolder:
        try:
            return torchvision.datasets.ImageFolder(str(path), transform=transforms.Compose(transform),
                                                    loader=read_image)
        except (FileNotFoundError, RuntimeError) as err:
            raise UsageError(f"dataset.root={str(root)!r} is not allowed: {str(err).splitlines()[0]}; imagefolder "
                             f"expects class folders holding images ({', '.join(IMAGE_SUFFIXES)})") from None

    seed = split_seed(cfg)
    separate = (root / "train").is_dir() and (root / "test").is_dir()
    pool = folder(root / "train" if separate else root, base_transform)
    classes = pool.classes
    if len(classes) < 2:
        raise UsageError(f"dataset.root={str(root)!r} is not allowed: it holds {len(classes)} class folder"
                         f"{'' if len(classes) == 1 else 's'} ({', '.join(classes)}); a classifier needs at least 2")
    labels = torch.tensor(pool.targets, dtype=torch.long)
    val_index = test_index = None
    train_index = torch.arange(len(labels))
    if not separate:
        val_index, test_index, train_index = stratified_split(
            labels, fractions_of(cfg, "val_fraction", "test_fraction"), seed)
    elif not (root / "val").is_dir():
        (val_fraction,) = fractions_of(cfg, "val_fraction")
        val_index, train_index = stratified_split(labels, (val_fraction,), seed)

    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        mean, std = estimate_normalisation(pool, train_index, seed)
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise UsageError(f"dataset.mean={mean} and dataset.std={std} are not allowed: each must hold "
                         f"{channels} values (one per channel), std > 0")
    transform = transforms.Compose(base_transform + [transforms.Normalize(mean, std)])
    pool.transform = transform  # the folder is scanned once; from here on its items are normalised
    augment = training_augment(cfg, pad=max(1, size[0] // 8), flip=True, mean=mean, std=std)

    def whole(path: Path) -> IndexedSplit:
        data = folder(path, base_transform)
        data.transform = transform
        if data.classes != classes:
            raise UsageError(f"dataset.root={str(root)!r} is not allowed: the class folders of {path} "
                             f"({', '.join(data.classes)}) differ from those of {root / 'train'}")
        targets = torch.tensor(data.targets, dtype=torch.long)
        return IndexedSplit(data, torch.arange(len(targets)), targets)

    part = lambda index, aug=None: IndexedSplit(pool, index, labels[index], aug)  # noqa: E731
    train = part(train_index, augment)
    val = part(val_index) if val_index is not None else whole(root / "val")
    test = part(test_index) if test_index is not None else whole(root / "test")
    return DataBundle("imagefolder", train, val, test, num_classes=len(classes),
                      input_shape=(channels, size[0], size[1]), mean=mean, std=std)


def read_image(path: str):
    """An image file as a PIL image (ImageFolder's loader); one that cannot be decoded is named in one line."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for truncated or foreign files
        raise UsageError(f"dataset imagefolder: the image {path} cannot be read ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'}); remove or replace it") from None


def _rgb(image):
    return image.convert("RGB")


def estimate_normalisation(data: Dataset, index: Tensor, seed: int, limit: int = 1000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to `limit` images of `data` at `index` (a seeded sample)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "normalisation"))
    chosen = index[torch.randperm(len(index), generator=generator)[:limit]]
    images = torch.stack([data[int(i)][0] for i in chosen])
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return mean.tolist(), std.tolist()
