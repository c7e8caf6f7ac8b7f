"""Datasets read from files: MNIST and Fashion-MNIST (torchvision's loaders), CIFAR-10/100 (batch files
read by a restricted unpickler that admits only the published format's arrays, lists, dicts and bytes),
and image folders. Their images are held as uint8 `UInt8Split`s when they fit in
`dataset.max_memory_mb`, else read item by item (`IndexedSplit`); see zoo/data.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import Dataset

from jacdistill_cli.config.checks import boolean
from jacdistill_cli.errors import UsageError, setting_error
from jacdistill_cli.zoo.data import (
    Augment,
    DataBundle,
    IndexedSplit,
    UInt8Images,
    UInt8Split,
    data_root,
    dataset_builder,
    derived_seed,
    fractions_of,
    split_seed,
    stratified_split,
    training_augment,
)

log = logging.getLogger("jacdistill")


def failed_download(name: str, root: Path, err: Exception, how: str) -> UsageError:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    reason = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    return UsageError(f"dataset {name}: could not download into {root} ({reason}); {how}")


DEFAULT_MAX_MEMORY_MB = 2048


def memory_limit(cfg: DictConfig) -> int:
    """`dataset.max_memory_mb` in bytes: file datasets whose uint8 images (all splits) take at most this
    are held in memory on the training device; larger ones are read item by item by a DataLoader."""
    limit = cfg.get("max_memory_mb", DEFAULT_MAX_MEMORY_MB)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0:
        raise setting_error("dataset.max_memory_mb", limit, "it must be a number of megabytes >= 0 (0: never "
                            "held in memory, every split read item by item through a DataLoader)")
    return int(limit * 2**20)


def held_in_memory(bundle: DataBundle, nbytes: int) -> DataBundle:
    """The bundle with each split over `UInt8Images` as a `UInt8Split` (its images copied out once),
    to be moved to the training device with the bundle."""
    def convert(split):
        if not (isinstance(split, IndexedSplit) and isinstance(split.base, UInt8Images)):
            return split
        base = split.base
        return UInt8Split(base.images[split.indices], split.labels, base.mean.flatten(), base.std.flatten(),
                          split.augment)

    logging.getLogger("jacdistill").info(
        f"dataset {bundle.name}: {nbytes / 2**20:.1f} MB of uint8 images held in memory, normalised "
        "batch by batch on the training device")
    return dataclasses.replace(bundle, train=convert(bundle.train), val=convert(bundle.val), test=convert(bundle.test),
                               teacher_train=None if bundle.teacher_train is None else convert(bundle.teacher_train))


def in_memory_or_loader(cfg: DictConfig, bundle: DataBundle, nbytes: int) -> DataBundle:
    """`held_in_memory` when `nbytes` of images fit in `dataset.max_memory_mb`, else the bundle as it
    is (IndexedSplits, read item by item through a DataLoader)."""
    limit = memory_limit(cfg)
    if nbytes <= limit:
        return held_in_memory(bundle, nbytes)
    logging.getLogger("jacdistill").info(
        f"dataset {bundle.name}: {nbytes / 2**20:.1f} MB of uint8 images exceed dataset.max_memory_mb="
        f"{cfg.get('max_memory_mb', DEFAULT_MAX_MEMORY_MB)}: read item by item through a DataLoader")
    return bundle


@dataclasses.dataclass(frozen=True)
class Images:
    """A dataset's images as read from its files: the training and test images (uint8, normalised on the way)
    with their labels, the class count and input shape, the normalisation."""

    train: UInt8Images
    test: UInt8Images
    num_classes: int
    input_shape: tuple[int, ...]
    mean: list[float]
    std: list[float]


def holdout_bundle(cfg: DictConfig, name: str, images: Images, augment: Augment | None) -> DataBundle:
    """Train/val from a stratified, seeded hold-out of the official training files; test from the test files."""
    (val_fraction,) = fractions_of(cfg, "val_fraction")
    train_labels, test_labels = images.train.labels, images.test.labels
    val_index, train_index = stratified_split(train_labels, (val_fraction,), split_seed(cfg))
    test_index = torch.arange(len(test_labels))
    return DataBundle(name, IndexedSplit(images.train, train_index, train_labels[train_index], augment),
                      IndexedSplit(images.train, val_index, train_labels[val_index]),
                      IndexedSplit(images.test, test_index, test_labels),
                      num_classes=images.num_classes, input_shape=images.input_shape, mean=images.mean, std=images.std)


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def mnist_like(cfg: DictConfig, name: str, loader_name: str, flip: bool) -> DataBundle:
    """MNIST or Fashion-MNIST through torchvision's loader: 1x28x28, 10 classes.

    Expects ROOT/<MNIST|FashionMNIST>/raw/ with the four idx files, plain or gzipped (.gz files
    are unpacked there first, as torchvision's own download does)."""
    import torchvision
    from torchvision.datasets.utils import extract_archive

    loader = getattr(torchvision.datasets, loader_name)
    memory_limit(cfg)  # checked before any file is read
    root = data_root(cfg)
    raw = root / loader_name / "raw"
    for file in MNIST_FILES:
        if not (raw / file).is_file() and (raw / f"{file}.gz").is_file():
            extract_archive(str(raw / f"{file}.gz"), str(raw))
    how = (f"put {', '.join(f + '.gz' for f in MNIST_FILES)} (or the same files unpacked) in {raw}, "
           "or set dataset.root to the directory that holds "
           f"{loader_name}/raw, or dataset.download=true on a machine with network")
    download = boolean("download", cfg.get("download", False))
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
    images = Images(UInt8Images(train.data.unsqueeze(1), train_labels, mean, std),
                    UInt8Images(test.data.unsqueeze(1), test_labels, mean, std), 10, (1, 28, 28), mean, std)
    bundle = holdout_bundle(cfg, name, images, augment)
    return in_memory_or_loader(cfg, bundle, train.data.numel() + test.data.numel())


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
    import torchvision

    published = getattr(torchvision.datasets, loader_name)
    memory_limit(cfg)  # checked before any file is read
    folder = cifar_folder(cfg, name, published)
    parts = read_cifar_folder(name, folder, published, num_classes)
    mean, std = list(cfg.mean), list(cfg.std)
    augment = training_augment(cfg, pad=4, flip=True, mean=mean, std=std)
    to_images = lambda data: torch.from_numpy(data.reshape(-1, 3, 32, 32)).contiguous()  # noqa: E731
    train_labels = torch.tensor(parts["train"][1], dtype=torch.long)
    test_labels = torch.tensor(parts["test"][1], dtype=torch.long)
    images = Images(UInt8Images(to_images(parts["train"][0]), train_labels, mean, std),
                    UInt8Images(to_images(parts["test"][0]), test_labels, mean, std), num_classes, (3, 32, 32), mean,
                    std)
    bundle = holdout_bundle(cfg, name, images, augment)
    return in_memory_or_loader(cfg, bundle, parts["train"][0].size + parts["test"][0].size)


def cifar_folder(cfg: DictConfig, name: str, published: Any) -> Path:
    """The folder of the published CIFAR batch files (`published`: torchvision's CIFAR10/CIFAR100 class, for
    its file names and checksums) in ROOT: unpacked from the archive there, or downloaded with
    dataset.download=true, and checked against the published md5 sums unless dataset.verify=false."""
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive

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
    download = boolean("download", cfg.get("download", False))
    verify = boolean("verify", cfg.get("verify", True))
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
    return folder


def read_cifar_folder(name: str, folder: Path, published: Any, num_classes: int) -> dict[str, tuple[Any, list[int]]]:
    """{"train": (images [n, 3072] uint8, labels), "test": (...)} of the batch files in `folder`, each file
    (and the meta file) refused in one line unless it holds the published format, labels in [0, classes)."""
    import numpy as np

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
    return parts


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
    from torchvision import transforms

    root, channels, size = imagefolder_settings(cfg)
    convert = transforms.Grayscale(1) if channels == 1 else transforms.Lambda(_rgb)
    base_transform = [convert, transforms.Resize(size), transforms.ToTensor()]
    seed = split_seed(cfg)
    folders = class_folders(cfg, root, base_transform, seed)
    # Decoded once into memory when every split's uint8 images fit; else decoded item by item, every epoch.
    nbytes = channels * size[0] * size[1] * sum(len(f) for f in folders.present)
    in_memory = nbytes <= memory_limit(cfg)
    decoded = ({id(f): decode_images(f, [convert, transforms.Resize(size)]) for f in folders.present}
               if in_memory else {})
    mean, std = folder_normalisation(cfg, folders, decoded, channels, seed)
    transform = transforms.Compose(base_transform + [transforms.Normalize(mean, std)])
    augment = training_augment(cfg, pad=max(1, size[0] // 8), flip=True, mean=mean, std=std)
    train, val, test = folder_splits(folders, decoded, transform, mean, std, augment)
    bundle = DataBundle("imagefolder", train, val, test, num_classes=len(folders.pool.classes),
                        input_shape=(channels, size[0], size[1]), mean=mean, std=std)
    if in_memory:
        return held_in_memory(bundle, nbytes)
    logging.getLogger("jacdistill").info(
        f"dataset imagefolder: {nbytes / 2**20:.1f} MB of uint8 images exceed dataset.max_memory_mb="
        f"{cfg.get('max_memory_mb', DEFAULT_MAX_MEMORY_MB)}: decoded item by item through a DataLoader")
    return bundle


def imagefolder_settings(cfg: DictConfig) -> tuple[Path, int, list[int]]:
    """(the root directory, the channel count, [height, width]) of the imagefolder node, checked."""
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
    return root, channels, size


def class_folder(root: Path, path: Path, transform: list):
    """torchvision's ImageFolder of `path` (under the dataset's `root`), or one line saying why not."""
    import torchvision
    from torchvision import transforms

    try:
        return torchvision.datasets.ImageFolder(str(path), transform=transforms.Compose(transform), loader=read_image)
    except (FileNotFoundError, RuntimeError) as err:
        raise UsageError(f"dataset.root={str(root)!r} is not allowed: {str(err).splitlines()[0]}; imagefolder "
                         f"expects class folders holding images ({', '.join(IMAGE_SUFFIXES)})") from None


@dataclasses.dataclass
class ClassFolders:
    """The folders of an imagefolder dataset: `pool` (ROOT/train, or ROOT), and `val`/`test` (ROOT/val,
    ROOT/test) where those splits are whole folders; else their indices into the pool, as for training."""

    pool: Any                       # torchvision.datasets.ImageFolder
    val: Any
    test: Any
    labels: Tensor                  # the pool's labels [n]
    train_index: Tensor
    val_index: Tensor | None
    test_index: Tensor | None

    @property
    def present(self) -> list:
        return [f for f in (self.pool, self.val, self.test) if f is not None]


def class_folders(cfg: DictConfig, root: Path, transform: list, seed: int) -> ClassFolders:
    """The pool and the whole-folder splits, with the stratified, seeded indices of the others."""
    separate = (root / "train").is_dir() and (root / "test").is_dir()
    pool = class_folder(root, root / "train" if separate else root, transform)
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

    def whole(path: Path):
        data = class_folder(root, path, transform)
        if data.classes != classes:
            raise UsageError(f"dataset.root={str(root)!r} is not allowed: the class folders of {path} "
                             f"({', '.join(data.classes)}) differ from those of {root / 'train'}")
        return data

    return ClassFolders(pool, whole(root / "val") if val_index is None else None,
                        whole(root / "test") if test_index is None else None, labels, train_index, val_index,
                        test_index)


def folder_normalisation(cfg: DictConfig, folders: ClassFolders, decoded: dict[int, Tensor], channels: int,
                         seed: int) -> tuple[list[float], list[float]]:
    """`dataset.mean`/`dataset.std`, or, when null, estimated from up to 1000 training images; checked."""
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        # the same values as ToTensor's: uint8 / 255 (minus 0, over 1)
        source = (UInt8Images(decoded[id(folders.pool)], folders.labels, [0.0] * channels, [1.0] * channels)
                  if decoded else folders.pool)
        mean, std = estimate_normalisation(source, folders.train_index, seed)
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise UsageError(f"dataset.mean={mean} and dataset.std={std} are not allowed: each must hold "
                         f"{channels} values (one per channel), std > 0")
    return mean, std


def folder_items(data, decoded: dict[int, Tensor], transform, mean: list[float],
                 std: list[float]) -> tuple[Dataset, Tensor]:
    """A folder's items normalised (from memory when decoded) and its labels."""
    targets = torch.tensor(data.targets, dtype=torch.long)
    if decoded:
        return UInt8Images(decoded[id(data)], targets, mean, std), targets
    data.transform = transform  # the folder is scanned once; from here on its items are normalised
    return data, targets


def folder_splits(folders: ClassFolders, decoded: dict[int, Tensor], transform, mean: list[float], std: list[float],
                  augment: Augment | None) -> tuple[IndexedSplit, IndexedSplit, IndexedSplit]:
    """(train, val, test): parts of the pool at their indices, or whole folders."""
    pool_items, _ = folder_items(folders.pool, decoded, transform, mean, std)
    labels = folders.labels

    def split(index: Tensor | None, folder, aug: Augment | None = None) -> IndexedSplit:
        if index is not None:
            return IndexedSplit(pool_items, index, labels[index], aug)
        items, targets = folder_items(folder, decoded, transform, mean, std)
        return IndexedSplit(items, torch.arange(len(targets)), targets)

    return (split(folders.train_index, None, augment), split(folders.val_index, folders.val),
            split(folders.test_index, folders.test))


def decode_images(data, transform: list) -> Tensor:
    """Every image of a torchvision ImageFolder through `transform` (PIL to PIL: convert, resize), as
    uint8 [n, C, H, W]: the bytes that ToTensor scales to [0, 1]. Decoded by a few threads (PIL releases
    the interpreter lock while it decodes and resizes)."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision import transforms

    to_uint8 = transforms.Compose([*transform, transforms.PILToTensor()])
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as threads:
        images = list(threads.map(lambda sample: to_uint8(data.loader(sample[0])), data.samples))
    return torch.stack(images)


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
