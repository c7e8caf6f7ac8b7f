"""Models by name. A builder takes (input_shape, num_classes, **architecture settings).

The architecture settings of a model are its config node minus the keys that say how a
teacher is obtained (`checkpoint`, `epochs`, ...): see `architecture`.

Every model maps inputs [batch, *input_shape] to logits [batch, num_classes], adapts to the
input shape (1x8x8, 1x28x28, 3x32x32 and larger), is a per-sample function in eval mode, and is
twice differentiable (no in-place activations), as Jacobian matching needs.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from jacdistill_cli.errors import UsageError, setting_error

MODELS: dict[str, Callable[..., nn.Module]] = {}

# Keys of a teacher/student node that are not architecture settings.
NOT_ARCHITECTURE = {"checkpoint", "epochs", "batch_size", "lr", "weight_decay", "samples_per_class"}


class ModelSettingError(Exception):
    """A model setting out of range; `build_model` names it under its role (teacher./student.)."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(key, value, allowed)
        self.key, self.value, self.allowed = key, value, allowed


def register_model(name: str):
    def add(builder):
        MODELS[name] = builder
        return builder

    return add


def architecture(node: DictConfig) -> dict[str, Any]:
    """The architecture of a teacher/student node as a plain dict: {"name": ..., settings...}."""
    spec = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in spec.items() if k not in NOT_ARCHITECTURE}


def build_model(spec: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, role: str = "model") -> nn.Module:
    """role names the config group (teacher/student) in error messages."""
    settings = dict(spec)
    name = settings.pop("name", None)
    if name not in MODELS:
        raise UsageError(f"{role}.name={name!r} is not allowed: it must be one of {', '.join(sorted(MODELS))}")
    builder = MODELS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes")]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise UsageError(f"{role}.{unknown[0]} is not a setting of model {name!r}; its settings are: {', '.join(accepted)}")
    try:
        return builder(input_shape=tuple(input_shape), num_classes=num_classes, **settings)
    except ModelSettingError as err:
        raise setting_error(f"{role}.{err.key}", err.value, err.allowed) from None


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


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ModelSettingError(key, value, "it must be true or false")
    return value


def probability(key: str, value: Any) -> float:
    """A dropout rate: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ModelSettingError(key, value, "it must be a number in [0, 1)")
    return float(value)


@register_model("mlp")
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


@register_model("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int, channels: list[int] = (32, 64), hidden: int = 128,
        batchnorm: bool = True) -> nn.Module:
    """3x3 conv-(BatchNorm)-ReLU blocks, each max-pooled by 2 while the map is at least 4 wide,
    then global average pooling and a one-hidden-layer head. Fits any [C, H, W] input."""
    channels = widths("channels", channels, "[16,32]", allow_empty=False)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise ModelSettingError("hidden", hidden, "it must be an integer >= 0 (0: no hidden layer)")
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


@register_model("lenet5")
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


@register_model("vgg")
def vgg(input_shape: tuple[int, ...], num_classes: int, depth: int = 9, width: float = 1.0,
        batchnorm: bool = True) -> nn.Module:
    """CIFAR-style VGG: 3x3 conv-(BatchNorm)-ReLU layers with 2x2 max pools (see VGG_LAYOUTS), global
    average pooling, one linear classifier. `depth` counts the weight layers: VGG-9 (8 convs, the
    conv stack of VGG-11) and VGG-4 (3 convs) are the ICML 2018 paper's teacher and student; depth 6
    is the layout CRD/mdistiller call vgg8. `width` scales every channel count. A pool is skipped
    where the map is narrower than 2, so small inputs (8x8, 28x28) fit.
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


@register_model("resnet_cifar")
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


@register_model("wrn")
def wrn(input_shape: tuple[int, ...], num_classes: int, depth: int = 16, width: int = 2,
        dropout: float = 0.0) -> nn.Module:
    """Zagoruyko & Komodakis' wide ResNet WRN-depth-width: a 3x3 stem of 16 channels, three stages of
    (depth - 4) / 6 pre-activation blocks with 16, 32 and 64 times `width` channels (the last two
    strided), BN-ReLU, global average pooling, linear. wrn_40_2 and wrn_16_2 are CRD's pair."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ModelSettingError("depth", depth, "it must be 6n+4: 10, 16, 22, 28, 40, ...")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ModelSettingError("width", width, "it must be an integer >= 1")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ModelSettingError("dropout", dropout, "it must be a number in [0, 1)")
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
        # The fused attention kernels have no double backward; the plain one does.
        with sdpa_kernel(SDPBackend.MATH):
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


@register_model("torchvision")
def torchvision_model(input_shape: tuple[int, ...], num_classes: int, arch: str = "resnet18",
                      image_size: int | None = None) -> nn.Module:
    """Any classification network of torchvision.models by name, randomly initialised, with the
    dataset's class count. `image_size`: the square size inputs are resized to; null picks the
    input's own size when at least 32 and the network takes it, else the smallest of 32, 64, 96,
    128, 160, 224, 299 that it takes. In-place activations are switched off and hard-sigmoid/swish
    replaced by equal twice-differentiable ones, for double backward."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if not isinstance(arch, str) or arch not in available:
        raise ModelSettingError("arch", arch, "it must name a classification model of torchvision.models, e.g. "
                                "resnet18, mobilenet_v3_small, shufflenet_v2_x0_5, vgg11_bn, efficientnet_b0, "
                                "convnext_tiny, vit_b_16 (torchvision.models.list_models() lists them all)")
    options: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if arch in ("googlenet", "inception_v3"):
        options.update(aux_logits=False, init_weights=True)
    net = twice_differentiable(torchvision.models.get_model(arch, **options))
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
