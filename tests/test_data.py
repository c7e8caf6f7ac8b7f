"""Datasets: every one built, the real formats read through torchvision's loaders, samples_per_class,
augmentation, and one line when files are missing."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import balanced_labels, dataset_cfg, pattern, teacher_cache_path, write_cifar
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from jacdistill_cli.errors import UsageError
from jacdistill_cli.zoo.data import (
    Augment,
    DataBundle,
    IndexedSplit,
    TensorSplit,
    UInt8Split,
    batches,
    build_data,
    per_class_indices,
)

CPU = torch.device("cpu")


def train_cfg(*overrides: str):
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def all_items(split) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, labels = zip(*batches(split, 10_000, False, None, CPU))
    return torch.cat(inputs), torch.cat(labels)


# ------------------------------------------------------------------- writing each real format

def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """The idx format of LeCun's MNIST files: magic (0x08 = uint8, ndim), big-endian sizes, bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    body = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(body)
    else:
        path.write_bytes(body)


def write_mnist(root: Path, folder: str, train: int = 100, test: int = 30, gz: bool = True) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n, offset in (("train", train, 0), ("t10k", test, 50)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", pattern(n, 1, 28, 28, offset)[:, 0], gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", balanced_labels(n, 10), gz)


# ------------------------------------------------------------------- digits and fake

def test_digits_default_builds_with_splits_that_cover_all_images_once():
    data = build_data(dataset_cfg("digits"))
    assert (data.name, data.num_classes, data.input_shape) == ("digits", 10, (1, 8, 8))
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.teacher_train is None and data.train.augment is None


def test_fake_is_deterministic_in_its_seed_and_has_the_asked_shape():
    cfg = dataset_cfg("fake", "dataset.shape=[3,16,12]", "dataset.num_classes=7", "dataset.train_size=70",
                      "dataset.val_size=14", "dataset.test_size=21")
    first, second = build_data(cfg), build_data(cfg)
    other = build_data(dataset_cfg("fake", "dataset.shape=[3,16,12]", "dataset.num_classes=7",
                                   "dataset.train_size=70", "dataset.val_size=14", "dataset.test_size=21",
                                   "dataset.data_seed=1"))
    assert (first.input_shape, first.num_classes) == ((3, 16, 12), 7)
    assert first.train.inputs.shape == (70, 3, 16, 12) and len(first.val) == 14 and len(first.test) == 21
    assert torch.equal(first.train.inputs, second.train.inputs) and torch.equal(first.test.labels, second.test.labels)
    assert not torch.equal(first.train.inputs, other.train.inputs)
    assert torch.bincount(first.train.labels, minlength=7).tolist() == [10] * 7


def test_fake_rejects_a_bad_shape_in_one_line():
    with pytest.raises(UsageError, match=r"dataset.shape=\[3, 16\] is not allowed"):
        build_data(dataset_cfg("fake", "dataset.shape=[3,16]"))


# ------------------------------------------------------------------- samples_per_class

@pytest.mark.parametrize("samples", [1, 5, 10])
def test_samples_per_class_gives_exactly_that_many_of_each_class(samples):
    data = build_data(dataset_cfg("digits", f"dataset.samples_per_class={samples}"))
    assert torch.bincount(data.train.labels, minlength=10).tolist() == [samples] * 10
    full = build_data(dataset_cfg("digits"))
    # the teacher's split is the full one; val and test are untouched
    assert torch.equal(data.teacher_train.inputs, full.train.inputs)
    assert torch.equal(data.val.inputs, full.val.inputs) and torch.equal(data.test.inputs, full.test.inputs)
    # each chosen sample is a training sample
    assert all((full.train.inputs == x).flatten(1).all(1).any() for x in data.train.inputs)


def test_samples_per_class_is_the_same_for_the_same_seed_and_nested():
    pick = lambda samples, seed: build_data(dataset_cfg(  # noqa: E731
        "digits", f"dataset.samples_per_class={samples}", f"dataset.split_seed={seed}")).train.inputs
    assert torch.equal(pick(10, 3), pick(10, 3))
    assert not torch.equal(pick(10, 3), pick(10, 4))
    ten, fifty = pick(10, 3), pick(50, 3)
    assert all((fifty == x).flatten(1).all(1).any() for x in ten)


def test_per_class_indices_are_stratified_on_uneven_classes():
    labels = torch.tensor([0] * 30 + [1] * 7 + [2] * 12)
    index = per_class_indices(labels, 7, seed=0, key="dataset.samples_per_class")
    assert torch.bincount(labels[index]).tolist() == [7, 7, 7]
    assert torch.equal(index, per_class_indices(labels, 7, seed=0, key="k"))
    with pytest.raises(UsageError, match=r"dataset.samples_per_class=8 is not allowed: class 1 has only 7"):
        per_class_indices(labels, 8, seed=0, key="dataset.samples_per_class")


def test_teacher_cache_key_ignores_the_students_samples_per_class_but_not_the_teachers():
    def key(*overrides: str):
        return teacher_cache_path(train_cfg(*overrides))

    plain = key()
    assert key("dataset.samples_per_class=10") == plain
    assert key("teacher.samples_per_class=10") != plain
    assert key("dataset.val_fraction=0.1") != plain


def test_teacher_bundle_is_the_full_split_or_its_own_subset():
    data = build_data(dataset_cfg("digits", "dataset.samples_per_class=3"))
    assert len(data.train) == 30
    assert len(data.for_teacher().train) == len(data.teacher_train) > 1000
    teacher = data.for_teacher(20, seed=0)
    assert torch.bincount(teacher.train.labels).tolist() == [20] * 10
    assert teacher.config["samples_per_class"] == 20


# ------------------------------------------------------------------- augmentation

def test_augment_shifts_and_flips_each_sample_and_pads_with_black():
    torch.manual_seed(0)
    inputs = torch.randn(16, 2, 6, 5)
    fill = [-1.5, 0.25]
    out = Augment(pad=2, flip=True, fill=fill)(inputs, torch.Generator().manual_seed(0))
    assert out.shape == inputs.shape
    padded = torch.stack([torch.full((10, 9), v) for v in fill])
    found_flip, found_shift = False, False
    for x, y in zip(inputs, out):
        canvas = padded.clone()
        canvas[:, 2:8, 2:7] = x
        matches = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)
                   if torch.equal((canvas[:, dy:dy + 6, dx:dx + 5].flip(-1) if flip else canvas[:, dy:dy + 6, dx:dx + 5]), y)]
        assert matches, "an augmented sample is no shift/flip of its input"
        found_flip |= any(m[2] for m in matches) and not any(not m[2] for m in matches)
        found_shift |= all((m[0], m[1]) != (2, 2) for m in matches)
    assert found_flip and found_shift
    again = Augment(pad=2, flip=True, fill=fill)(inputs, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_augment_applies_to_training_batches_only():
    data = build_data(dataset_cfg("fake", "dataset.augment=true", "dataset.train_size=40", "dataset.val_size=20",
                                  "dataset.test_size=20"))
    assert isinstance(data.train.augment, Augment) and data.val.augment is None and data.test.augment is None
    augmented, _ = all_items(data.train)
    assert not torch.equal(augmented, data.train.inputs)
    val, _ = all_items(data.val)
    assert torch.equal(val, data.val.inputs)


# ------------------------------------------------------------------- MNIST and Fashion-MNIST

@pytest.mark.parametrize("name,folder,gz", [("mnist", "MNIST", True), ("fashion_mnist", "FashionMNIST", False)])
def test_mnist_formats_are_read_by_torchvisions_loader(tmp_path, name, folder, gz):
    write_mnist(tmp_path, folder, train=100, test=30, gz=gz)
    data = build_data(dataset_cfg(name, f"dataset.root={tmp_path}", "dataset.val_fraction=0.2",
                                  "dataset.augment=true"))
    assert (data.num_classes, data.input_shape) == (10, (1, 28, 28))
    assert (len(data.train), len(data.val), len(data.test)) == (80, 20, 30)
    assert isinstance(data.train, UInt8Split) and data.val.augment is None and data.test.augment is None
    # every item is torchvision's own item of the same file, normalised with the dataset's mean and std
    reference = getattr(torchvision.datasets, folder)(str(tmp_path), train=False, transform=torchvision.transforms.Compose(
        [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(data.mean, data.std)]))
    inputs, labels = all_items(data.test)
    for i in (0, 7, 29):
        image, label = reference[i]
        assert torch.allclose(inputs[i], image, atol=1e-6) and labels[i] == label
    train_inputs, train_labels = all_items(data.train)
    assert train_inputs.shape == (80, 1, 28, 28) and torch.bincount(train_labels).tolist() == [8] * 10


def test_mnist_samples_per_class_on_files(tmp_path):
    write_mnist(tmp_path, "MNIST", train=100, test=20)
    data = build_data(dataset_cfg("mnist", f"dataset.root={tmp_path}", "dataset.samples_per_class=4"))
    assert torch.bincount(data.train.labels).tolist() == [4] * 10
    assert len(data.teacher_train) == 90
    _, labels = all_items(data.train)
    assert torch.equal(labels, data.train.labels)


# ------------------------------------------------------------------- CIFAR-10 and CIFAR-100

@pytest.mark.parametrize("name,classes,folder", [("cifar10", 10, "cifar-10-batches-py"),
                                                 ("cifar100", 100, "cifar-100-python")])
def test_cifar_files_that_fail_the_md5_check_are_refused_in_one_line(tmp_path, name, classes, folder):
    write_cifar(tmp_path, classes, train_per_class=2, test_per_class=1)
    with pytest.raises(UsageError) as err:
        build_data(dataset_cfg(name, f"dataset.root={tmp_path}"))
    message = str(err.value)
    assert "md5" in message and str(tmp_path / folder) in message and "dataset.verify=false" in message
    assert "\n" not in message


@pytest.mark.parametrize("name,classes,train_per_class", [("cifar10", 10, 10), ("cifar100", 100, 3)])
def test_cifar_batches_are_read_by_torchvisions_loader(tmp_path, name, classes, train_per_class):
    write_cifar(tmp_path, classes, train_per_class=train_per_class, test_per_class=1)
    data = build_data(dataset_cfg(name, f"dataset.root={tmp_path}", "dataset.verify=false",
                                  "dataset.val_fraction=0.34"))
    assert (data.num_classes, data.input_shape) == (classes, (3, 32, 32))
    val_per_class = round(0.34 * train_per_class)
    assert (len(data.train), len(data.val), len(data.test)) == (
        classes * (train_per_class - val_per_class), classes * val_per_class, classes)
    assert isinstance(data.train.augment, Augment) and data.train.augment.flip and data.train.augment.pad == 4
    # channel planes land in [C, H, W] as written: pixel (c, y, x) of test image k
    inputs, labels = all_items(data.test)
    expected = torch.from_numpy(pattern(classes, 3, 32, 32, 50)).float() / 255
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    assert torch.allclose(inputs, (expected - mean) / std, atol=1e-5)
    assert labels.tolist() == list(range(classes))


def test_cifar_batches_go_through_dataloader_workers(tmp_path):
    write_cifar(tmp_path, 10, train_per_class=4, test_per_class=1)
    data = build_data(dataset_cfg("cifar10", f"dataset.root={tmp_path}", "dataset.verify=false",
                                  "dataset.samples_per_class=2", "dataset.val_fraction=0.25"))  # 1 of 4 per class
    seen = [labels for _, labels in batches(data.train, 8, True, torch.Generator().manual_seed(0), CPU,
                                            num_workers=2)]
    assert sorted(torch.cat(seen).tolist()) == sorted([c for c in range(10) for _ in range(2)])


@pytest.mark.parametrize("name,expected", [
    ("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_files_say_where_they_are_expected_and_how_to_provide_them(tmp_path, name, expected):
    with pytest.raises(UsageError) as err:
        build_data(dataset_cfg(name, f"dataset.root={tmp_path}"))
    message = str(err.value)
    assert f"{tmp_path}/{expected}" in message and "dataset.download=true" in message and "dataset.root" in message
    assert "\n" not in message


# ------------------------------------------------------------------- uint8 in memory or item by item

def training_batches(split, seed: int = 3, batch_size: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled (and, where the split is, augmented) epoch, as training draws it."""
    return list(batches(split, batch_size, True, torch.Generator().manual_seed(seed), CPU))


def build_files(kind: str, root: Path, *overrides: str):
    """A dataset read from small files in its real format, with `overrides`."""
    if kind == "mnist":
        if not (root / "MNIST").exists():
            write_mnist(root, "MNIST", train=60, test=20)
        return build_data(dataset_cfg("mnist", f"dataset.root={root}", "dataset.augment=true", *overrides))
    if kind == "cifar10":
        if not (root / "cifar-10-batches-py").exists():
            write_cifar(root, 10, train_per_class=6, test_per_class=2)
        return build_data(dataset_cfg("cifar10", f"dataset.root={root}", "dataset.verify=false", *overrides))
    if not (root / "train").exists():
        write_images(root / "train", COLOURS, per_class=8)
        write_images(root / "test", COLOURS, per_class=3)
    # mean and std estimated from the training images: from memory and from the files alike
    return build_data(dataset_cfg("imagefolder", f"dataset.root={root}", "dataset.image_size=[8,6]",
                                  "dataset.augment=true", *overrides))


@pytest.mark.parametrize("kind", ["mnist", "cifar10", "imagefolder"])
def test_uint8_splits_give_the_batches_of_the_item_by_item_path(tmp_path, kind):
    memory = build_files(kind, tmp_path)
    loader = build_files(kind, tmp_path, "dataset.max_memory_mb=0")
    for name in ("train", "val", "test"):
        held, read = getattr(memory, name), getattr(loader, name)
        assert isinstance(held, UInt8Split) and held.images.dtype == torch.uint8 and isinstance(read, IndexedSplit)
        assert held.images.shape[1:] == memory.input_shape and len(held) == len(read)
        # the same normalised float32 values, in the same order, as the files read item by item
        plain_held = dataclasses.replace(held, augment=None)
        plain_read = IndexedSplit(read.base, read.indices, read.labels)
        (held_inputs, held_labels), (read_inputs, read_labels) = all_items(plain_held), all_items(plain_read)
        assert held_inputs.dtype == torch.float32 and torch.equal(held_labels, read_labels)
        torch.testing.assert_close(held_inputs, read_inputs, rtol=1.2e-7, atol=1e-7)
    assert memory.mean == loader.mean and memory.std == loader.std
    # a training epoch: the same order and the same augmentation from the same generator on both paths,
    # and the stream of an in-memory float TensorSplit of the same values
    assert memory.train.augment is not None
    as_float = TensorSplit(all_items(dataclasses.replace(memory.train, augment=None))[0], memory.train.labels,
                           memory.train.augment)
    held, read, floats = (training_batches(s) for s in (memory.train, loader.train, as_float))
    assert len(held) == len(read) == len(floats) == -(-len(memory.train) // 7)
    for (x, y), (x_read, y_read), (x_float, y_float) in zip(held, read, floats):
        assert torch.equal(y, y_read) and torch.equal(y, y_float)
        torch.testing.assert_close(x, x_read, rtol=1.2e-7, atol=1e-7)
        assert torch.equal(x, x_float)
    unaugmented = training_batches(dataclasses.replace(memory.train, augment=None))
    assert [torch.equal(x, x_plain) for (x, _), (x_plain, _) in zip(held, unaugmented)] != [True] * len(held)


def test_max_memory_mb_is_a_limit_on_all_splits_images(tmp_path):
    # 3 classes x (8 training + 3 test) images of 3x8x6 uint8: 1584 bytes
    size = 3 * (8 + 3) * 3 * 8 * 6
    fits = build_files("imagefolder", tmp_path, f"dataset.max_memory_mb={size / 2**20}")
    over = build_files("imagefolder", tmp_path, f"dataset.max_memory_mb={(size - 1) / 2**20}")
    assert all(isinstance(s, UInt8Split) for s in (fits.train, fits.val, fits.test))
    assert all(isinstance(s, IndexedSplit) for s in (over.train, over.val, over.test))
    with pytest.raises(UsageError, match=r"dataset.max_memory_mb=-1 is not allowed: it must be a number of "
                                         r"megabytes >= 0 \(0: never held in memory"):
        build_files("mnist", tmp_path, "dataset.max_memory_mb=-1")


def test_uint8_bundle_moves_to_the_device_with_its_subsets(tmp_path):
    data = build_files("cifar10", tmp_path, "dataset.samples_per_class=2")
    assert isinstance(data.train, UInt8Split) and isinstance(data.teacher_train, UInt8Split)
    assert torch.bincount(data.train.labels).tolist() == [2] * 10 and len(data.teacher_train) == 50
    moved = data.to(torch.device("meta"))
    for split in (moved.train, moved.val, moved.test, moved.teacher_train):
        assert split.images.is_meta and split.labels.is_meta and split.mean.is_meta
        assert split.images.dtype == torch.uint8
    assert data.train.images.device == CPU, "moving makes a new bundle"


# ------------------------------------------------------------------- image folders

def write_images(folder: Path, classes: dict[str, tuple[int, int, int]], per_class: int, size=(12, 10)) -> None:
    rng = np.random.default_rng(0)
    for name, colour in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{i}.png")


COLOURS = {"apple": (200, 30, 30), "grass": (30, 200, 30), "sky": (30, 30, 200)}


def test_imagefolder_pool_is_split_stratified_and_normalised(tmp_path):
    write_images(tmp_path, COLOURS, per_class=10)
    data = build_data(dataset_cfg("imagefolder", f"dataset.root={tmp_path}", "dataset.image_size=[8,6]",
                                  "dataset.val_fraction=0.2", "dataset.test_fraction=0.3"))
    assert (data.num_classes, data.input_shape) == (3, (3, 8, 6))
    assert (len(data.train), len(data.val), len(data.test)) == (15, 6, 9)
    inputs, labels = all_items(data.train)
    assert inputs.shape == (15, 3, 8, 6) and torch.bincount(labels).tolist() == [5, 5, 5]
    # mean and std were estimated on the training images: they come out standardised
    assert torch.allclose(inputs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(inputs.std(dim=(0, 2, 3)), torch.ones(3), atol=0.05)
    red = inputs[labels == 0][:, 0].mean() > inputs[labels == 0][:, 2].mean()
    assert red, "class folders are sorted by name: apple (red) is class 0"


def test_imagefolder_with_train_and_test_folders_and_grayscale(tmp_path):
    write_images(tmp_path / "train", COLOURS, per_class=5)
    write_images(tmp_path / "test", COLOURS, per_class=2)
    data = build_data(dataset_cfg("imagefolder", f"dataset.root={tmp_path}", "dataset.channels=1",
                                  "dataset.image_size=16", "dataset.val_fraction=0.2",
                                  "dataset.mean=[0.5]", "dataset.std=[0.25]", "dataset.samples_per_class=2"))
    assert data.input_shape == (1, 16, 16) and data.mean == [0.5] and data.std == [0.25]
    assert (len(data.train), len(data.val), len(data.test), len(data.teacher_train)) == (6, 3, 6, 12)
    inputs, _ = all_items(data.test)
    assert inputs.shape == (6, 1, 16, 16)


def test_imagefolder_without_root_or_with_differing_classes_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"dataset.root=null is not allowed"):
        build_data(dataset_cfg("imagefolder"))
    write_images(tmp_path / "train", COLOURS, per_class=3)
    write_images(tmp_path / "test", {"apple": (1, 2, 3), "pear": (3, 2, 1)}, per_class=1)
    with pytest.raises(UsageError, match=r"the class folders of .*test \(apple, pear\) differ"):
        build_data(dataset_cfg("imagefolder", f"dataset.root={tmp_path}"))


def test_every_shipped_dataset_config_has_the_common_settings():
    import importlib.resources

    folder = importlib.resources.files("jacdistill_cli.conf") / "dataset"
    names = sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))
    assert names == ["cifar10", "cifar100", "digits", "fake", "fashion_mnist", "imagefolder", "mnist"]
    for name in names:
        node = OmegaConf.create((folder / f"{name}.yaml").read_text())
        assert node.name == name and "samples_per_class" in node and "augment" in node
        # datasets read from files say how much of them may be held on the training device
        assert ("max_memory_mb" in node) == (name not in ("digits", "fake"))


def test_bundle_to_device_keeps_the_teacher_split():
    data = build_data(dataset_cfg("digits", "dataset.samples_per_class=2"))
    moved = data.to(CPU)
    assert isinstance(moved, DataBundle) and isinstance(moved.teacher_train, TensorSplit)
    assert len(moved.teacher_train) == len(data.teacher_train)
