"""Models by name. A builder takes (input_shape, num_classes, **architecture settings).

The architecture settings of a model are its config node minus the keys that say how a
teacher is obtained (`checkpoint`, `epochs`, ...): see `architecture`.

Every model maps inputs [batch, *input_shape] to logits [batch, num_classes], adapts to the
input shape (1x8x8, 1x28x28, 3x32x32 and larger), is a per-sample function in eval mode, and is
twice differentiable (no in-place activations), as Jacobian matching needs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from jacdistill_cli.config.checks import SettingError, boolean, whole
from jacdistill_cli.errors import ReadError, UsageError, setting_error

# Keys of a teacher/student node that are not architecture settings.
NOT_ARCHITECTURE = {"checkpoint", "epochs", "batch_size", "lr", "weight_decay", "samples_per_class", "reuse_outputs",
                    "training", "adversarial"}
PACKAGE_TARGETS = "jacdistill_cli."
# Checkpoints written before models were chosen by `_target_` name their builder.
LEGACY_NAMES = {"mlp": "mlp", "cnn": "cnn", "lenet5": "lenet5", "vgg": "vgg", "resnet_cifar": "resnet_cifar",
                "wrn": "wrn", "torchvision": "torchvision_model", "vgg_cifar": "vgg_cifar"}
ModelSettingError = SettingError   # a model setting out of range, named under its role by build_model


def architecture(node: DictConfig, option: str | None = None) -> dict[str, Any]:
    """The architecture of a teacher/student node as a plain dict: {"_target_": ..., "name": ..., settings...}.
    `output` (which element of what the model returns holds the logits) is part of it when set, and absent
    when null, so that the spec of a model that returns its logits (and a teacher's cache key) is as it
    was. `option`: the group's option the node came from (Hydra's choice, the file's name): a node without
    `name` (a user's own `_target_` file) takes it as its name, for the teacher cache's file name and logs."""
    spec = OmegaConf.to_container(node, resolve=True)
    spec = {k: v for k, v in spec.items() if k not in NOT_ARCHITECTURE}
    if spec.get("output") is None:
        spec.pop("output", None)
    if spec.get("name") is None and option is not None:
        name = str(option).rsplit("/", 1)[-1]
        if not _names_another_option(name, spec.get("_target_")):
            spec["name"] = name
        else:
            spec.pop("name", None)   # labelled by its target (registry.label)
    return spec


def _names_another_option(name: str, target: Any) -> bool:
    """Whether `name` is a shipped teacher/student option that builds another target: as a name it would be
    refused (registry.check_name)."""
    from jacdistill_cli.config.registry import shipped_options

    return any(options.get(name, target) != target for options in (shipped_options("teacher"),
                                                                    shipped_options("student")))


def selection(group: str, option: str | None, spec: dict[str, Any]) -> str:
    """The model as the user selected it, for messages: `student=timm student.arch=vit_tiny_patch16_224`
    (the option and the settings that differ from its shipped file), `student=tiny` (a user's own option),
    or `student._target_=mymodels.tiny` when the option is not known."""
    from jacdistill_cli.config.registry import shipped_node, shipped_options

    if option is None:
        return f"{group}._target_={spec.get('_target_')}"
    if option not in shipped_options(group):
        return f"{group}={option}"
    shipped = {k: v for k, v in OmegaConf.to_container(shipped_node(group, option), resolve=True).items()
               if k not in NOT_ARCHITECTURE}
    differing = [f"{group}.{k}={override_value(v)}" for k, v in spec.items()
                 if k != "name" and shipped.get(k) != v and not (k == "output" and v is None)]
    return " ".join([f"{group}={option}", *differing])


def override_value(value: Any) -> str:
    """A value as a Hydra command-line override writes it: [1,2], null, true."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def describe_architecture(spec: dict[str, Any]) -> str:
    """An architecture (`architecture`'s dict) on one line, as logs and messages show it:
    `resnet_cifar(depth=32, channels=[32, 64, 128, 256])`."""
    from jacdistill_cli.config.registry import label

    settings = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("name", "_target_"))
    return f"{label('model', spec)}({settings})"


def with_target(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with its `_target_` (a checkpoint of the legacy layout names only its builder)."""
    if "_target_" in spec or spec.get("name") not in LEGACY_NAMES:
        return spec
    return {"_target_": f"{__name__}.{LEGACY_NAMES[spec['name']]}", **spec}


def build_model(spec: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, role: str = "model",
                trusted: tuple[str, ...] | None = None) -> nn.Module:
    """The model of `spec` (its `_target_` called as (input_shape, num_classes, **settings)), its lazy
    layers given their shapes by one eval-mode pass of the input shape (zoo/probe.py
    initialise_lazy_layers), made Jacobian-ready (engine/layers.py), returning the logits at
    `spec["output"]` of what it returns when that is set (a forward hook: state_dict keys unchanged).
    `role` names the config group (teacher/student) in error messages. A spec read from a checkpoint
    passes `trusted`, the targets the user trusts (`trust=[...]` of `jacdistill evaluate`, the run's
    own teacher target): a target outside this package is then imported only if it is one of them."""
    from jacdistill_cli.config import registry
    from jacdistill_cli.engine.layers import make_jacobian_ready
    from jacdistill_cli.zoo.probe import check_output_choice, initialise_lazy_layers, pick_output

    spec = with_target(dict(spec))
    target = str(spec.get("_target_", ""))
    if trusted is not None and not target.startswith(PACKAGE_TARGETS) and target not in trusted:
        raise UsageError(f"{role}: the checkpoint's model is built by {spec.get('_target_')!r}, which is not part of "
                         f"jacdistill, and a checkpoint imports no code on its own: add trust=[{target}] to "
                         "trust it (the _target_s of your own models that a checkpoint may name)")
    try:
        output = check_output_choice(spec.pop("output", None))
    except SettingError as err:
        raise setting_error(f"{role}.output", err.value, err.allowed) from None
    model = registry.build(role, spec, exclude=NOT_ARCHITECTURE, input_shape=tuple(input_shape),
                           num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{role}._target_={spec.get('_target_')!r} is not allowed: it must return an nn.Module, "
                         f"it returned {type(model).__name__}")
    initialise_lazy_layers(model, tuple(input_shape), f"{role} {describe_architecture(spec)}")
    return pick_output(make_jacobian_ready(model), output)


def did_you_mean(name: Any, known: Sequence[str]) -> str:
    """`; did you mean resnet18 or resnet18d?` for a misspelt name among `known`, else ''."""
    import difflib

    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    if not close:
        return ""
    return f"; did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}?"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def widths(key: str, value: Any, example: str, count: int | None = None, allow_empty: bool = True) -> list[int]:
    """A list of layer widths (channel counts, hidden sizes): integers >= 1, `count` of them when given."""
    items = list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items) or (
            count is not None and len(items) != count) or (not allow_empty and not items):
        many = f"{count} integers" if count is not None else "a list of integers"
        raise ModelSettingError(key, value, f"it must be {many} >= 1, e.g. {example}")
    return items


def probability(key: str, value: Any) -> float:
    """A dropout rate: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ModelSettingError(key, value, "it must be a number in [0, 1)")
    return float(value)


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int] = (64,), batchnorm: bool = False,
        dropout: float = 0.0) -> nn.Module:
    """Flatten, then Linear-(BatchNorm)-ReLU blocks of the given widths, then a linear classifier."""
    hidden = widths("hidden", hidden, "[64] or [256,256] ([] for a linear model)")
    batchnorm, dropout = boolean("batchnorm", batchnorm), probability("dropout", dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if batchnorm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], num_classes: int, channels: list[int] = (32, 64), hidden: int = 128,
        batchnorm: bool = True) -> nn.Module:
    """3x3 conv-(BatchNorm)-ReLU blocks, each max-pooled by 2 while the map is at least 4 wide,
    then global average pooling and a one-hidden-layer head. Fits any [C, H, W] input."""
    channels = widths("channels", channels, "[16,32]", allow_empty=False)
    hidden = whole("hidden", hidden, 0, "it must be an integer >= 0 (0: no hidden layer)")
    batchnorm = boolean("batchnorm", batchnorm)
    in_channels, height = input_shape[0], input_shape[1]
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        if height >= 4:
            layers.append(nn.MaxPool2d(2))
            height //= 2
        in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if hidden:
        layers += [nn.Linear(in_channels, hidden), nn.ReLU()]
        in_channels = hidden
    layers.append(nn.Linear(in_channels, num_classes))
    return nn.Sequential(*layers)


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def positive_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ModelSettingError(key, value, "it must be a finite number > 0")
    return float(value)


def lenet5(input_shape: tuple[int, ...], num_classes: int, channels: Sequence[int] = (6, 16),
           hidden: Sequence[int] = (120, 84), activation: str = "relu") -> nn.Module:
    """LeCun et al.'s LeNet-5: conv 5x5 (6) - pool 2 - conv 5x5 (16) - pool 2 - linear 120 - 84 - classes.

    Adapted to the input: the first conv pads by 2 when the input is smaller than 32 (MNIST's
    28x28 then gives LeNet's 5x5 maps), the second pads by 2 when its input is smaller than 10,
    and a pool is skipped when the map is narrower than 2; the first linear layer takes whatever
    the convolutions give. Max pooling; `activation` relu or tanh.
    """
    if activation not in ("relu", "tanh"):
        raise ModelSettingError("activation", activation, "it must be relu or tanh")
    channels = widths("channels", channels, "[6,16]", count=2)
    hidden = widths("hidden", hidden, "[120,84]")
    act = nn.ReLU if activation == "relu" else nn.Tanh
    in_channels, height, width = input_shape[0], input_shape[1], input_shape[2]
    layers: list[nn.Module] = []
    for i, out_channels in enumerate(channels):
        size = min(height, width)
        pad = 2 if size < (32 if i == 0 else 10) else 0
        layers += [nn.Conv2d(in_channels, out_channels, 5, padding=pad), act()]
        height, width = height + 2 * pad - 4, width + 2 * pad - 4
        if min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        in_channels = out_channels
    layers.append(nn.Flatten())
    features = in_channels * height * width
    for size in hidden:
        layers += [nn.Linear(features, size), act()]
        features = size
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


# VGG layouts by depth = weight layers (convolutions + the one linear classifier); "M" is a 2x2 max pool.
VGG_LAYOUTS: dict[int, list[int | str]] = {
    4: [64, "M", 128, "M", 256, "M"],
    6: [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    9: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    11: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    14: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    17: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def vgg(input_shape: tuple[int, ...], num_classes: int, depth: int = 9, width: float = 1.0,
        batchnorm: bool = True) -> nn.Module:
    """CIFAR-style VGG: 3x3 conv-(BatchNorm)-ReLU layers with 2x2 max pools (see VGG_LAYOUTS), global
    average pooling, one linear classifier. `depth` counts the weight layers: VGG-9 (8 convs, the
    conv stack of VGG-11) and VGG-4 (3 convs) are the ICML 2018 paper's teacher and student; depth 6
    has the channels of CRD/mdistiller's vgg8 but not its pooling or conv biases (`vgg_cifar` is
    that network). `width` scales every channel count. A pool is skipped where the map is narrower
    than 2, so small inputs (8x8, 28x28) fit.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth not in VGG_LAYOUTS:
        raise ModelSettingError("depth", depth, f"it must be one of {', '.join(map(str, VGG_LAYOUTS))}")
    width = positive_number("width", width)
    batchnorm = boolean("batchnorm", batchnorm)
    in_channels, size = input_shape[0], min(input_shape[1], input_shape[2])
    layers: list[nn.Module] = []
    for item in VGG_LAYOUTS[depth]:
        if item == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            continue
        out_channels = scaled(item, width)
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


# CRD/mdistiller's CIFAR VGGs (models/vgg.py of RepDistiller): five blocks of 3x3 convolutions by depth.
VGG_CIFAR_BLOCKS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class BlockVGG(nn.Module):
    """block0 .. block4 (each conv3x3 with bias - BatchNorm - ReLU, repeated), pool0 .. pool3 after the
    first four (a 2x2 max pool, or nothing where `pooled` says no), global average pooling, `classifier`.
    The module names are those of the published files, so their state_dicts load as they are."""

    def __init__(self, blocks: list[nn.Sequential], pooled: list[bool], features: int, num_classes: int):
        super().__init__()
        for i, block in enumerate(blocks):
            setattr(self, f"block{i}", block)
        for i, pool in enumerate(pooled):
            setattr(self, f"pool{i}", nn.MaxPool2d(2) if pool else nn.Identity())
        self.depth = len(blocks)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.depth):
            x = getattr(self, f"block{i}")(x)
            if i < self.depth - 1:
                x = getattr(self, f"pool{i}")(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def vgg_cifar(input_shape: tuple[int, ...], num_classes: int, depth: int = 8, width: float = 1.0) -> nn.Module:
    """CRD/mdistiller's BatchNorm VGG for CIFAR (their vgg8_bn, vgg13_bn, ...; the published vgg8 and
    vgg13 teachers): five blocks of conv3x3 (with bias) - BatchNorm - ReLU layers (VGG_CIFAR_BLOCKS;
    `depth` is the number in the name, the convolutions plus three as ImageNet VGG counts: vgg8 has 5
    convolutions, vgg13 has 10), a 2x2 max pool after blocks 0, 1 and 2, and after block 3 while the map
    is still wider than 4 (32x32 inputs reach blocks 3 and 4 at 4x4, 64x64 inputs are pooled once more,
    as in the original code), global average pooling, one linear layer. A pool is skipped where the map
    is narrower than 2. `width` scales every channel count (1.0: the published network)."""
    if depth not in VGG_CIFAR_BLOCKS:
        raise ModelSettingError("depth", depth, f"it must be one of {', '.join(map(str, VGG_CIFAR_BLOCKS))}")
    width = positive_number("width", width)
    in_channels, size = input_shape[0], min(input_shape[1], input_shape[2])
    blocks, pooled = [], []
    for i, convs in enumerate(VGG_CIFAR_BLOCKS[depth]):
        layers: list[nn.Module] = []
        for channels in convs:
            out_channels = scaled(channels, width)
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]
            in_channels = out_channels
        blocks.append(nn.Sequential(*layers))
        if i < 4:
            pool = size >= 2 and (i < 3 or size > 4)
            pooled.append(pool)
            size = size // 2 if pool else size
    return BlockVGG(blocks, pooled, in_channels, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (1x1 conv-BN when the shape
    changes), then ReLU. Out-of-place throughout, so it stays twice differentiable."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        # modules rather than F.relu, so that the Jacobian engine can swap in its cheaper backward
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Backbone(nn.Module):
    """stem -> stages -> (head norm) -> global average pool -> linear. Logits [batch, classes]."""

    def __init__(self, stem: nn.Module, stages: nn.Module, head: nn.Module, features: int, num_classes: int):
        super().__init__()
        self.stem, self.stages, self.head = stem, stages, head
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


RESNET_DEPTHS = "6n+2: 8, 14, 20, 32, 44, 56, 110"


def resnet_cifar(input_shape: tuple[int, ...], num_classes: int, depth: int = 20,
                 channels: Sequence[int] = (16, 16, 32, 64)) -> nn.Module:
    """He et al.'s CIFAR ResNet in the CRD/mdistiller layout: a 3x3 stem of channels[0], then three
    stages of (depth - 2) / 6 basic blocks with channels[1:], the last two with stride 2, global
    average pooling and a linear classifier. resnet8..resnet110: channels [16, 16, 32, 64];
    resnet8x4 and resnet32x4: [32, 64, 128, 256]. Any input size >= 1 fits (strided maps shrink to 1).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ModelSettingError("depth", depth, f"it must be {RESNET_DEPTHS}, ...")
    channels = widths("channels", channels, "[16,16,32,64] (stem and three stages)", count=4)
    blocks = (depth - 2) // 6
    stem = nn.Sequential(nn.Conv2d(input_shape[0], channels[0], 3, 1, 1, bias=False),
                         nn.BatchNorm2d(channels[0]), nn.ReLU())
    stages, in_channels = [], channels[0]
    for stage, out_channels in enumerate(channels[1:]):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            stages.append(BasicBlock(in_channels, out_channels, stride))
            in_channels = out_channels
    return Backbone(stem, nn.Sequential(*stages), nn.Identity(), in_channels, num_classes)


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus the shortcut
    (a 1x1 conv of the pre-activated input when the shape changes). Out-of-place throughout."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.project = None
        if stride != 1 or in_channels != out_channels:
            self.project = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + (x if self.project is None else self.project(activated))


def wrn(input_shape: tuple[int, ...], num_classes: int, depth: int = 16, width: int = 2,
        dropout: float = 0.0) -> nn.Module:
    """Zagoruyko & Komodakis' wide ResNet WRN-depth-width: a 3x3 stem of 16 channels, three stages of
    (depth - 4) / 6 pre-activation blocks with 16, 32 and 64 times `width` channels (the last two
    strided), BN-ReLU, global average pooling, linear. wrn_40_2 and wrn_16_2 are CRD's pair."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ModelSettingError("depth", depth, "it must be 6n+4: 10, 16, 22, 28, 40, ...")
    width, dropout = whole("width", width), probability("dropout", dropout)
    blocks = (depth - 4) // 6
    stem = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
    stages, in_channels = [], 16
    for stage, base in enumerate((16, 32, 64)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            stages.append(WideBlock(in_channels, base * width, stride, float(dropout)))
            in_channels = base * width
    head = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU())
    return Backbone(stem, nn.Sequential(*stages), head, in_channels, num_classes)


class Hardsigmoid(nn.Module):
    """relu6(x + 3) / 6, as nn.Hardsigmoid, but twice differentiable (torch lacks its double backward)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.hardtanh(x + 3.0, 0.0, 6.0) / 6.0


class Hardswish(nn.Module):
    """x * relu6(x + 3) / 6, as nn.Hardswish, but twice differentiable."""

    def forward(self, x: Tensor) -> Tensor:
        return x * F.hardtanh(x + 3.0, 0.0, 6.0) / 6.0


def twice_differentiable(net: nn.Module) -> nn.Module:
    """Switch off in-place activations and swap activations that lack a double backward."""
    for module in list(net.modules()):
        if getattr(module, "inplace", False) is True:
            module.inplace = False
        for name, child in module.named_children():
            if isinstance(child, nn.Hardsigmoid):
                setattr(module, name, Hardsigmoid())
            elif isinstance(child, nn.Hardswish):
                setattr(module, name, Hardswish())
    return net


class TorchvisionClassifier(nn.Module):
    """A torchvision classification network behind an input adapter: grayscale inputs are repeated
    to 3 channels (other channel counts go through a learned 1x1 conv to 3), and inputs are resized
    (bilinear) to `image_size` [h, w] when it differs from theirs."""

    def __init__(self, net: nn.Module, in_channels: int, image_size: tuple[int, int] | None):
        super().__init__()
        self.net = net
        self.in_channels = in_channels
        self.channel_map = nn.Conv2d(in_channels, 3, 1) if in_channels not in (1, 3) else None
        self.image_size = image_size

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        elif self.channel_map is not None:
            x = self.channel_map(x)
        if self.image_size is not None and tuple(x.shape[-2:]) != tuple(self.image_size):
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        # Attention runs on a kernel with a double backward inside the model's gate only (engine/layers.py).
        return self.net(x)


# Sizes tried, smallest first, when a torchvision network does not take the input's own size.
PROBE_SIZES = (32, 64, 96, 128, 160, 224, 299)


def _takes(model: nn.Module, channels: int, height: int, width: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, height, width))
        return True
    except (RuntimeError, ValueError, AssertionError, IndexError):
        return False


WEIGHTS_ALLOWED = ("it must be null (random initialisation), a torchvision weights name of the model such as "
                   "ResNet18_Weights.IMAGENET1K_V1 (downloaded where there is network), or the path of a state_dict "
                   "file of it (such as the file that name downloads)")


def pretrained_network(arch: str, num_classes: int, weights: str, options: dict[str, Any]) -> nn.Module:
    """torchvision network `arch` with `weights`: a weights name of torchvision (torch's hub cache holds
    the download), or the path of a state_dict file of the network, loaded strictly and weights-only."""
    import os

    import torchvision

    if not isinstance(weights, str) or not weights:
        raise ModelSettingError("weights", weights, WEIGHTS_ALLOWED)
    path = os.path.expanduser(weights)
    if os.path.isfile(path) or os.sep in weights or weights.endswith((".pt", ".pth")):
        if not os.path.isfile(path):
            raise ModelSettingError("weights", weights, f"no such file; {WEIGHTS_ALLOWED}")
        from jacdistill_cli.storage import load_torch

        net = torchvision.models.get_model(arch, **options)
        try:
            state = load_torch(path)
        except ReadError as err:
            raise ModelSettingError("weights", weights, f"{err.reason}; {WEIGHTS_ALLOWED}") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ModelSettingError("weights", weights, f"the file holds no state_dict; {WEIGHTS_ALLOWED}")
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ModelSettingError("weights", weights, f"its tensors do not fit {arch} with {num_classes} classes: "
                                    f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}")
        return net
    try:
        enum = torchvision.models.get_weight(weights)
    except (ValueError, KeyError, AttributeError):
        raise ModelSettingError("weights", weights, f"it names no weights of torchvision; {WEIGHTS_ALLOWED}") from None
    if not isinstance(enum, torchvision.models.get_model_weights(arch)):
        raise ModelSettingError("weights", weights, f"they are not weights of {arch}; its weights are "
                                + ", ".join(str(w) for w in torchvision.models.get_model_weights(arch)))
    classes = len(enum.meta.get("categories") or [])
    if classes != num_classes:
        raise ModelSettingError("weights", weights, f"they classify {classes} classes, the dataset has {num_classes}")
    options = {k: v for k, v in options.items() if k not in ("weights", "init_weights")}
    try:
        return torchvision.models.get_model(arch, **{**options, "weights": enum})
    except OSError as err:  # no network: urllib's URLError is an OSError
        raise ModelSettingError("weights", weights, f"downloading {enum.url} failed ({err}); on a machine without "
                                "network, download that file elsewhere and give its path") from None


def torchvision_model(input_shape: tuple[int, ...], num_classes: int, arch: str = "resnet18",
                      image_size: int | None = None, weights: str | None = None) -> nn.Module:
    """Any classification network of torchvision.models by name, with the dataset's class count:
    randomly initialised, or with `weights` (a torchvision weights name such as
    ResNet18_Weights.IMAGENET1K_V1, or a state_dict file: see `pretrained_network`), for the
    ImageNet-scale teachers torchvision publishes. `image_size`: the square size inputs are resized
    to; null picks the input's own size when at least 32 and the network takes it, else the smallest
    of 32, 64, 96, 128, 160, 224, 299 that it takes. In-place activations are switched off and
    hard-sigmoid/swish replaced by equal twice-differentiable ones, for double backward."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if not isinstance(arch, str) or arch not in available:
        raise ModelSettingError("arch", arch, "it must name a classification model of torchvision.models, e.g. "
                                "resnet18, mobilenet_v3_small, shufflenet_v2_x0_5, vgg11_bn, efficientnet_b0, "
                                "convnext_tiny, vit_b_16 (torchvision.models.list_models() lists them all)"
                                + did_you_mean(arch, available))
    options: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if arch in ("googlenet", "inception_v3"):
        options.update(aux_logits=False, init_weights=True)
    if weights is None:
        net = torchvision.models.get_model(arch, **options)
    else:
        net = pretrained_network(arch, num_classes, weights, options)
    net = twice_differentiable(net)
    adapted = TorchvisionClassifier(net, input_shape[0], None)
    adapted.eval()
    height, width = input_shape[1], input_shape[2]
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ModelSettingError("image_size", image_size, "it must be null (automatic) or an integer >= 1")
        adapted.image_size = (image_size, image_size)
    elif not (min(height, width) >= 32 and _takes(adapted, input_shape[0], height, width)):
        for size in PROBE_SIZES:
            adapted.image_size = (size, size)
            if _takes(adapted, input_shape[0], size, size):
                break
        else:
            raise ModelSettingError("arch", arch, f"it takes none of the input sizes {PROBE_SIZES}; "
                                    "set image_size to one it takes")
    adapted.train()
    return adapted
