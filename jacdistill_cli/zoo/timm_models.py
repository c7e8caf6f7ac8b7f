"""Models of timm (PyTorch Image Models) by name, with timm's own keyword settings and its own way of
loading pretrained weights.

    teacher=timm teacher.arch=vit_tiny_patch16_224 teacher.img_size=32 teacher.patch_size=4
    student=timm student.arch=convnext_atto student.weights=/path/convnext_atto.pth

`in_chans` and `num_classes` come from the dataset. `weights` is null (random initialisation) or a local
state_dict file of the architecture, loaded by timm.create_model(pretrained=True) with the file as its
pretrained source: timm then adapts it as it adapts its published weights (a new head when the class count
differs, the input convolution summed or repeated to the input's channels, position embeddings and patch
embedding resampled to img_size and patch_size, by the model's own checkpoint filter). Each adaptation is
named in one log line; a file of another architecture is refused in one line. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from jacdistill_cli.config.checks import SettingError, number
from jacdistill_cli.zoo.models import did_you_mean, twice_differentiable

log = logging.getLogger("jacdistill")

WEIGHTS_ALLOWED = "it must be null (random initialisation) or the path of a state_dict file of the architecture"


def timm_model(input_shape: tuple[int, ...], num_classes: int, arch: str = "resnet18", img_size: int | None = None,
               patch_size: int | None = None, drop_path_rate: float = 0.0, drop_rate: float = 0.0,
               weights: str | None = None, options: dict[str, Any] | None = None) -> nn.Module:
    """timm.create_model(arch, in_chans=C, num_classes=num_classes, **settings) for inputs [C, H, W] ->
    logits [batch, num_classes]. `img_size`: the size a model with position embeddings is built for (null:
    the input's own [height, width] when the model takes an img_size); `patch_size`: a ViT's patch size (null: the
    model's); `options`: any other keyword argument of the model. In-place activations are switched off."""
    import timm

    if not isinstance(arch, str) or not timm.is_model(arch):
        raise SettingError("arch", arch, "it must name a model of timm, e.g. vit_tiny_patch16_224, "
                           "deit_tiny_patch16_224, convnext_atto, resnet18 (timm.list_models() lists them all)"
                           + did_you_mean(arch, timm.list_models()))
    settings: dict[str, Any] = {"in_chans": input_shape[0], "num_classes": num_classes,
                                "drop_path_rate": number("drop_path_rate", drop_path_rate, 0.0, 1.0,
                                                         allowed="it must be a number in [0, 1]"),
                                "drop_rate": number("drop_rate", drop_rate, 0.0, 1.0,
                                                    allowed="it must be a number in [0, 1]")}
    for key, value in (("img_size", img_size), ("patch_size", patch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SettingError(key, value, "it must be null or an integer >= 1")
    if patch_size is not None:
        settings["patch_size"] = patch_size
    if options is not None and not isinstance(options, dict):
        raise SettingError("options", options, "it must be a mapping of timm keyword arguments, e.g. {qkv_bias: false}")
    settings.update(options or {})
    automatic = img_size is None and len(input_shape) == 3
    if img_size is not None or automatic:
        settings["img_size"] = img_size if img_size is not None else tuple(input_shape[1:3])
    state = None if weights is None else read_weights(weights)
    try:
        net = _create(arch, settings, weights, state)
    except TypeError as err:
        if not (automatic and "img_size" in str(err)):
            raise _unexpected(arch, settings, err) from None
        del settings["img_size"]   # a model without position embeddings (a CNN): any input size
        try:
            net = _create(arch, settings, weights, state)
        except TypeError as again:
            raise _unexpected(arch, settings, again) from None
    return twice_differentiable(net)


def _unexpected(arch: str, settings: dict[str, Any], err: TypeError) -> SettingError:
    """A keyword the model does not take, named as the setting it came from."""
    found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    key = found.group(1) if found else "arch"
    where = key if key in ("img_size", "patch_size", "drop_path_rate", "drop_rate") else f"options.{key}"
    if not found:
        return SettingError("arch", arch, f"timm cannot build it with {settings}: {err}")
    return SettingError(where, settings.get(key), f"{arch} of timm takes no keyword {key}; set it to null "
                        "(or leave it out of options)")


def read_weights(weights: Any) -> dict[str, Tensor]:
    """The state_dict in a weights file (a bare state_dict, or one under `state_dict`/`model`, as timm reads)."""
    if not isinstance(weights, str) or not weights:
        raise SettingError("weights", weights, WEIGHTS_ALLOWED)
    path = os.path.expanduser(weights)
    if not os.path.isfile(path):
        raise SettingError("weights", weights, f"no such file; {WEIGHTS_ALLOWED}")
    from jacdistill_cli.errors import ReadError
    from jacdistill_cli.storage import load_torch

    try:
        state = load_torch(path)   # the project's one safe load
    except ReadError as err:
        raise SettingError("weights", weights, f"{err.reason}; {WEIGHTS_ALLOWED}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise SettingError("weights", weights, f"the file holds no state_dict; {WEIGHTS_ALLOWED}")
    return state


def _create(arch: str, settings: dict[str, Any], weights: str | None, state: dict[str, Tensor] | None) -> nn.Module:
    import timm

    if state is None:
        return timm.create_model(arch, pretrained=False, **settings)
    # The architecture as the file holds it: refused unless every tensor but the head's is one of it.
    bare = timm.create_model(arch, pretrained=False, **{**settings, "in_chans": 3})
    config = bare.pretrained_cfg
    heads = _names(config.get("classifier"))
    convs = _names(config.get("first_conv"))
    own = {k for k in bare.state_dict()}
    theirs = set(state)
    if not _same_architecture(own, theirs, heads):
        missing = sorted(own - theirs - {f"{h}.{p}" for h in heads for p in ("weight", "bias")})
        extra = sorted(theirs - own)
        example = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise SettingError("weights", weights, f"its tensors are not those of {arch} ({len(missing)} of the model's "
                           f"missing, {len(extra)} it does not have, e.g. {example}); give a file of {arch}")
    classes = next((state[f"{h}.weight"].shape[0] for h in heads if f"{h}.weight" in state), None)
    channels = next((state[f"{c}.weight"].shape[1] for c in convs if f"{c}.weight" in state), 3)
    overlay = {"file": os.path.expanduser(weights), "num_classes": classes if classes is not None else 0,
               "input_size": (channels, *config.get("input_size", (3, 224, 224))[1:])}
    timm_log = logging.getLogger("timm")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)   # jacdistill names each adaptation in one line below
    try:
        net = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **settings)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SettingError("weights", weights, f"timm cannot load it into {arch} with {settings}: {first}") from None
    finally:
        timm_log.setLevel(level)
    _log_adaptations(arch, weights, state, net.state_dict(), FileLayout(heads, convs, classes, channels), settings)
    return net


@dataclass(frozen=True)
class FileLayout:
    """What a weights file's tensors say of the network it was made for: its heads and input convolutions (by
    timm's pretrained config), its class count (None: no head in the file) and its input channels."""

    heads: tuple[str, ...]
    convs: tuple[str, ...]
    classes: int | None
    channels: int


def _names(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _same_architecture(own: set[str], theirs: set[str], heads: tuple[str, ...]) -> bool:
    head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    return own - head_keys == theirs - head_keys


def _log_adaptations(arch: str, weights: str, state: dict[str, Tensor], loaded: dict[str, Tensor],
                     layout: FileLayout, settings: dict[str, Any]) -> None:
    """One line for each way timm adapted the file to the model."""
    heads, convs, classes, channels = layout.heads, layout.convs, layout.classes, layout.channels
    log.info(f"{arch}: weights from {weights}, loaded by timm")
    num_classes, in_chans = settings["num_classes"], settings["in_chans"]
    if classes is not None and classes != num_classes:
        log.info(f"{arch}: weights: a new head ({', '.join(heads)}) for {num_classes} classes, randomly initialised "
                 f"(the file's classifies {classes})")
    if channels != in_chans:
        log.info(f"{arch}: weights: the input convolution ({', '.join(convs)}) adapted from {channels} to {in_chans} "
                 "channel(s) by timm's adapt_input_conv")
    for key in sorted(state):
        if key in loaded and state[key].shape != loaded[key].shape and not key.startswith(heads) and not any(
                key == f"{c}.weight" for c in convs):
            log.info(f"{arch}: weights: {key} resampled from {list(state[key].shape)} to {list(loaded[key].shape)} "
                     "by the model's checkpoint filter (img_size, patch_size)")
        elif key in loaded and key.startswith(tuple(f"{c}.weight" for c in convs)) and \
                state[key].shape[2:] != loaded[key].shape[2:]:
            log.info(f"{arch}: weights: {key} resampled from {list(state[key].shape)} to {list(loaded[key].shape)} "
                     "by the model's checkpoint filter (patch_size)")
