"""The model zoo: every family on every input shape, twice differentiable and per-sample in eval
mode, the published layouts, bad settings in one line, and a short `train` of each family on digits
and on a 3x32x32 fake dataset."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_command
from omegaconf import OmegaConf
from torch import nn

from jacdistill_cli.config.registry import shipped_node, shipped_options
from jacdistill_cli.engine.layers import gate_of
from jacdistill_cli.errors import UsageError
from jacdistill_cli.zoo.models import LEGACY_NAMES, VGG_LAYOUTS, Hardsigmoid, Hardswish, build_model, count_parameters

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 40, 48)]


@pytest.fixture(autouse=True)
def flush_denormals():
    """Untrained deep networks in eval mode can carry denormal floats, which make CPU math tens of
    times slower; flushing them to zero keeps these tests quick without changing what they check."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)

# One small member of each family, for speed; the shipped sizes are built in test_shipped_options.
SMALL = {
    "mlp": {"name": "mlp", "hidden": [16]},
    "cnn": {"name": "cnn", "channels": [4, 8], "hidden": 8},
    "lenet5": {"name": "lenet5", "channels": [3, 4], "hidden": [8, 8]},
    "vgg": {"name": "vgg", "depth": 9, "width": 0.0625},
    "vgg_cifar": {"name": "vgg_cifar", "depth": 13, "width": 0.0625},
    "resnet_cifar": {"name": "resnet_cifar", "depth": 8, "channels": [4, 4, 8, 8]},
    "wrn": {"name": "wrn", "depth": 10, "width": 1},
    "torchvision": {"name": "torchvision", "arch": "squeezenet1_1"},
    "vit": {"_target_": "jacdistill_cli.zoo.vit.vit", "name": "vit", "dim": 8, "depth": 1, "heads": 2},
    "timm": {"_target_": "jacdistill_cli.zoo.timm_models.timm_model", "name": "timm", "arch": "vit_tiny_patch16_224",
             "patch_size": 4, "options": {"embed_dim": 16, "depth": 1, "num_heads": 2}},
}


def test_every_shipped_family_has_a_small_member_here():
    targets = {target.rsplit(".", 1)[-1] for group in ("teacher", "student") for target in shipped_options(group).values()}
    assert targets == {spec.get("_target_", LEGACY_NAMES.get(name, "")).rsplit(".", 1)[-1] for name, spec in SMALL.items()}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_each_family_adapts_to_every_input_shape(family):
    for shape in SHAPES:
        torch.manual_seed(0)
        model = build_model(SMALL[family], shape, 7).eval()
        with torch.no_grad():
            logits = model(torch.randn(3, *shape))
        assert logits.shape == (3, 7) and torch.isfinite(logits).all(), (family, shape)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_each_family_is_per_sample_in_eval_mode_and_twice_differentiable(family):
    """One double-backward step, as Jacobian matching takes: the loss on input-gradients reaches the
    parameters. In eval mode a sample's logits do not depend on the rest of its batch."""
    torch.manual_seed(0)
    shape = (1, 8, 8) if family in ("mlp", "cnn", "lenet5") else (3, 32, 32)
    model = build_model(SMALL[family], shape, 5).eval()
    inputs = torch.randn(4, *shape, requires_grad=True)
    with gate_of(model).second_order_pass():   # the pass whose input-gradient is differentiated again
        logits = model(inputs)
    with torch.no_grad():
        alone = torch.cat([model(inputs[i:i + 1]) for i in range(4)])
    assert torch.allclose(logits, alone, atol=1e-5)
    top = logits.gather(1, logits.argmax(1, keepdim=True)).sum()  # the top-1 logit, as jacobian=top1 takes
    grads, = torch.autograd.grad(top, inputs, create_graph=True)
    grads.pow(2).sum().backward()
    reached = [p.grad for p in model.parameters() if p.grad is not None]
    assert reached and all(torch.isfinite(g).all() for g in reached)
    assert sum(g.abs().sum() for g in reached) > 0


def test_torchvision_models_take_small_grayscale_inputs_and_lose_in_place_activations():
    model = build_model({"name": "torchvision", "arch": "mnasnet0_5"}, (1, 8, 8), 10, "teacher")
    assert model.image_size == (32, 32)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert build_model({"name": "torchvision", "arch": "mnasnet0_5"}, (3, 40, 48), 10).image_size is None
    assert build_model({"name": "torchvision", "arch": "mnasnet0_5", "image_size": 64}, (3, 32, 32), 10).image_size == (64, 64)


def test_hard_activations_are_replaced_by_equal_twice_differentiable_ones():
    """torch has no double backward for hard-sigmoid/hard-swish (MobileNetV3); the replacements agree
    with them and have one."""
    model = build_model({"name": "torchvision", "arch": "mobilenet_v3_small"}, (3, 32, 32), 10)
    assert not any(isinstance(m, (nn.Hardswish, nn.Hardsigmoid)) for m in model.modules())
    assert any(isinstance(m, Hardswish) for m in model.modules())
    x = torch.linspace(-5, 5, 101, dtype=torch.float64, requires_grad=True)
    for ours, theirs in ((Hardswish(), nn.Hardswish()), (Hardsigmoid(), nn.Hardsigmoid())):
        assert torch.allclose(ours(x), theirs(x))
        grad, = torch.autograd.grad(ours(x).sum(), x, create_graph=True)
        reference, = torch.autograd.grad(theirs(x).sum(), x)
        assert torch.allclose(grad, reference)
        second, = torch.autograd.grad(grad.pow(2).sum(), x)
        assert torch.isfinite(second).all()


def layers(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_vgg_depth_counts_weight_layers_as_in_the_paper():
    for depth, layout in VGG_LAYOUTS.items():
        model = build_model({"name": "vgg", "depth": depth, "width": 0.0625}, (3, 32, 32), 100)
        assert layers(model, nn.Conv2d) + layers(model, nn.Linear) == depth
        assert layers(model, nn.Conv2d) == sum(item != "M" for item in layout)
    # VGG-9 (teacher): 8 convolutions with 5 pools on 32x32; on 8x8 inputs the pools that would go below 1x1 are skipped
    assert layers(build_model({"name": "vgg", "depth": 9}, (3, 32, 32), 10), nn.MaxPool2d) == 5
    assert layers(build_model({"name": "vgg", "depth": 9}, (1, 8, 8), 10), nn.MaxPool2d) == 3


def test_vgg_cifar_pools_as_the_published_code_on_32_and_64_pixels():
    """Blocks 0-2 are pooled; block 3 only on inputs that reach it wider than 4 (64x64, not 32x32)."""
    def pools(shape):
        return layers(build_model({"name": "vgg_cifar", "depth": 8, "width": 0.0625}, shape, 10), nn.MaxPool2d)

    assert (pools((3, 32, 32)), pools((3, 64, 64)), pools((1, 8, 8))) == (3, 4, 3)
    vgg13 = build_model({"name": "vgg_cifar", "depth": 13, "width": 0.0625}, (3, 32, 32), 10)
    assert layers(vgg13, nn.Conv2d) == 10 and all(m.bias is not None for m in vgg13.modules()
                                                    if isinstance(m, nn.Conv2d))


def test_torchvision_weights_from_a_state_dict_file_load_strictly(tmp_path):
    """teacher.weights=PATH: the network's own state_dict file (what a weights name downloads), no network."""
    torch.manual_seed(1)
    source = build_model({"name": "torchvision", "arch": "squeezenet1_1"}, (3, 32, 32), 10).net
    path = tmp_path / "squeezenet1_1.pth"
    torch.save(source.state_dict(), path)
    loaded = build_model({"name": "torchvision", "arch": "squeezenet1_1", "weights": str(path)}, (3, 32, 32), 10)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value), key
    with pytest.raises(UsageError, match=r"^teacher.weights='.*squeezenet1_1.pth' is not allowed: its tensors do "
                                         r"not fit squeezenet1_1 with 100 classes: size mismatch"):
        build_model({"name": "torchvision", "arch": "squeezenet1_1", "weights": str(path)}, (3, 32, 32), 100,
                    "teacher")
    with pytest.raises(UsageError, match=r"teacher.weights='.*missing.pth' is not allowed: no such file"):
        build_model({"name": "torchvision", "arch": "squeezenet1_1", "weights": str(tmp_path / "missing.pth")},
                    (3, 32, 32), 10, "teacher")
    # A checkpoint of a network started from weights is read back without their file (or a download).
    from jacdistill_cli.zoo.checkpoints import model_from_checkpoint

    payload = {"architecture": {"name": "torchvision", "arch": "squeezenet1_1", "weights": str(path)},
               "input_shape": [3, 32, 32], "num_classes": 10, "state_dict": loaded.state_dict()}
    path.unlink()
    rebuilt = model_from_checkpoint(payload, "checkpoint")
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("weights,message", [
    ("ResNet18_Weights.NOPE", r"it names no weights of torchvision"),
    ("ResNet34_Weights.IMAGENET1K_V1", r"they are not weights of resnet18; its weights are "
                                       r"ResNet18_Weights.IMAGENET1K_V1"),
    ("ResNet18_Weights.IMAGENET1K_V1", r"they classify 1000 classes, the dataset has 10"),
])
def test_torchvision_weights_names_are_checked_before_any_download(weights, message):
    with pytest.raises(UsageError, match=rf"^teacher.weights='{weights}' is not allowed: {message}"):
        build_model({"name": "torchvision", "arch": "resnet18", "weights": weights}, (3, 32, 32), 10, "teacher")


@pytest.mark.slow
def test_a_teacher_with_weights_is_used_as_it_is(tmp_path):
    """teacher=torchvision teacher.weights=FILE: not trained, not cached; its accuracy is the file's."""
    torch.manual_seed(2)
    net = build_model({"name": "torchvision", "arch": "squeezenet1_1"}, (1, 8, 8), 10).net
    torch.save(net.state_dict(), tmp_path / "teacher.pth")
    run_command("train", ["trainer.epochs=1", "dataset.samples_per_class=2", "teacher=torchvision",
                          "teacher.arch=squeezenet1_1", f"teacher.weights={tmp_path / 'teacher.pth'}"], tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["teacher_source"] == "weights"
    assert metrics["teacher_checkpoint"] == str(tmp_path / "teacher.pth")


def shipped(group: str) -> dict[str, dict]:
    return {name: OmegaConf.to_container(shipped_node(group, name)) for name in shipped_options(group)}


# Parameter counts on CIFAR-100 as published with the CRD/mdistiller code (millions).
PUBLISHED = {"resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.74, "resnet8x4": 1.23,
             "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_2": 2.25, "vgg8": 3.96, "vgg13": 9.46}


def test_shipped_options_build_on_cifar100_with_the_published_sizes():
    options = {**shipped("teacher"), **shipped("student")}
    for name in ("vgg9", "vgg4", "resnet32x4", "resnet8x4", "wrn_40_2", "wrn_16_2", "lenet5", "torchvision"):
        assert name in options
    for name, spec in options.items():
        model = build_model(spec, (3, 32, 32), 100)
        if name in PUBLISHED:
            assert count_parameters(model) / 1e6 == pytest.approx(PUBLISHED[name], abs=0.006), name


@pytest.mark.parametrize("spec,message", [
    ({"name": "vgg", "depth": 7}, r"student.depth=7 is not allowed: it must be one of 4, 6, 9, 11, 14, 17"),
    ({"name": "vgg_cifar", "depth": 9}, r"student.depth=9 is not allowed: it must be one of 8, 11, 13, 16, 19"),
    ({"name": "resnet_cifar", "depth": 21}, r"student.depth=21 is not allowed: it must be 6n\+2"),
    ({"name": "wrn", "depth": 16, "width": 0}, r"student.width=0 is not allowed: it must be an integer >= 1"),
    ({"name": "lenet5", "activation": "gelu"}, r"student.activation='gelu' is not allowed: it must be relu or tanh"),
    ({"name": "torchvision", "arch": "resnet7"}, r"student.arch='resnet7' is not allowed: it must name a "
                                                 r"classification model of torchvision.models"),
    ({"name": "vgg", "layers": 3}, r"student.layers is not a setting of 'vgg'; its settings are: depth, width"),
])
def test_bad_model_settings_are_one_line(spec, message):
    with pytest.raises(UsageError, match=message):
        build_model(spec, (3, 32, 32), 10, "student")


# A tiny member of each family as student, by config overrides; the teacher is the default cnn
# (trained once per dataset and cached for the whole session).
FAMILY_OVERRIDES = {
    "mlp": ["student=mlp", "student.hidden=[16]"],
    "cnn": ["student=cnn", "student.channels=[4,8]", "student.hidden=8"],
    "lenet5": ["student=lenet5"],
    "vgg": ["student=vgg4", "student.width=0.125"],
    "vgg_cifar": ["student=vgg8", "student.width=0.125"],
    "resnet_cifar": ["student=resnet8x4", "student.channels=[4,4,8,8]"],
    "wrn": ["student=wrn_16_2", "student.depth=10", "student.width=1"],
    "torchvision": ["student=torchvision", "student.arch=squeezenet1_1"],
    "vit": ["student=vit", "student.dim=8", "student.depth=1", "student.heads=2"],
    "timm": ["student=timm", "student.arch=vit_tiny_patch16_224", "student.patch_size=4",
             "student.options={embed_dim: 16, depth: 1, num_heads: 2}"],
}
DATASETS = {
    "digits": ["dataset.samples_per_class=2", "dataset.val_fraction=0.05", "dataset.test_fraction=0.05"],
    "fake": ["dataset=fake", "dataset.num_classes=4", "dataset.train_size=8", "dataset.val_size=8",
             "dataset.test_size=8"],
}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("family", sorted(FAMILY_OVERRIDES))
def test_a_short_train_runs_for_each_family(tmp_path, family, dataset):
    overrides = ["trainer.epochs=1", "teacher.epochs=2", "trainer.device=cpu", *DATASETS[dataset],
                 *FAMILY_OVERRIDES[family]]
    run_command("train", overrides, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["epochs"] == 1
    for key in ("test_accuracy", "agreement", "jacobian_cosine", "val_accuracy"):
        assert 0 <= metrics[key] <= 1 or key == "jacobian_cosine" and -1 <= metrics[key] <= 1
    checkpoint = torch.load(tmp_path / "student.pt", weights_only=True)
    assert checkpoint["architecture"]["name"] == SMALL[family]["name"]
    assert checkpoint["input_shape"] == ([1, 8, 8] if dataset == "digits" else [3, 32, 32])
