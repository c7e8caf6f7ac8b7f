"""A built model tried on the data before any work, its lazy layers given their shapes, and its logits
picked from what it returns (`output`).

    probe(model, input_shape, num_classes, role, label)     two samples through it, train and eval mode
    initialise_lazy_layers(model, input_shape, what)        one eval-mode pass of two zero samples
    OutputPicker(choice)                                     the forward hook that `output` installs

The probe changes nothing of the run: it works on a copy of the model on the `meta` device (no memory,
no numbers), or, where the model cannot run there (a value read on the host, an op without a meta kernel),
on a copy on the CPU (or the device given) with the model's weights, zeros where they were on `meta`; it
runs without gradients and inside `torch.random.fork_rng`, so that no random generator moves, and the model
given keeps its weights, buffers, lazy layers, modes and hooks as they were.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, UninitializedTensorMixin

from jacdistill_cli.config.checks import SettingError
from jacdistill_cli.errors import UsageError, setting_error

log = logging.getLogger("jacdistill")

PROBE_BATCH = 2   # two samples: train-mode BatchNorm needs more than one value per channel

OUTPUT_ALLOWED = ("it must be null (the model returns its logits), an index (0: the first element of the tuple "
                  "it returns) or a key or field name (logits: of the dict or named tuple it returns)")


# ---------------------------------------------------------------------------------------------- output


def check_output_choice(choice: Any) -> Any:
    """`output` as a setting: null, an integer index, or a non-empty key or field name."""
    if choice is None or (isinstance(choice, int) and not isinstance(choice, bool)) or (
            isinstance(choice, str) and choice):
        return choice
    raise SettingError("output", choice, OUTPUT_ALLOWED)


def pick(output: Any, choice: int | str) -> Tensor:
    """The logits in a model's `output`: element `choice` (an int) of a tuple, list or named tuple (or the
    choice-th value of a dict), value `choice` (a str) of a dict, or field/attribute `choice`. A tensor is
    returned as it is: a model may return more in train mode only (GoogLeNet with aux_logits)."""
    if isinstance(output, Tensor):
        return output
    try:
        if isinstance(choice, int):
            items = list(output.values()) if isinstance(output, Mapping) else output
            value = items[choice] if isinstance(items, (tuple, list)) else None
        else:
            value = output[choice] if isinstance(output, Mapping) else getattr(output, choice)
    except (KeyError, IndexError, AttributeError, TypeError):
        value = None
    if not isinstance(value, Tensor):
        found = "nothing" if value is None else f"a {type(value).__name__}"
        raise SettingError("output", choice, f"the model returns {describe_output(output)}, where it finds "
                           f"{found} instead of a tensor of logits; {OUTPUT_ALLOWED}")
    return value


class OutputPicker:
    """A forward hook that makes a model return the logits `pick` finds in its output. A hook, not a wrapping
    module: the model's class, module paths and state_dict keys stay the same, so its checkpoints load into
    the same config."""

    def __init__(self, choice: int | str):
        self.choice = choice

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Tensor:
        return pick(output, self.choice)

    def __repr__(self) -> str:
        return f"OutputPicker({self.choice!r})"


def pick_output(model: nn.Module, choice: int | str | None) -> nn.Module:
    """The model, returning the logits at `choice` of what it returns (nothing changed for None)."""
    if choice is not None:
        model.register_forward_hook(OutputPicker(choice))
    return model


def _items(output: Any) -> list[tuple[Any, Any]]:
    """(index or key, value) of a tuple, list, named tuple or dict."""
    if isinstance(output, Mapping):
        return list(output.items())
    if isinstance(output, tuple) and hasattr(type(output), "_fields"):
        return list(zip(type(output)._fields, output))
    return list(enumerate(output))


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor {list(value.shape)}"
    if isinstance(value, (tuple, list, Mapping)):
        return f"{type(value).__name__} of {len(value)}"
    return "None" if value is None else type(value).__name__


def describe_output(output: Any) -> str:
    """What a model returned, in a few words: `a tensor [2, 10]`, `a tuple of 2 (tensor [2, 10], tensor
    [2, 64])`, `a GoogLeNetOutputs of 3 (logits: tensor [2, 10], ...)`, `a dict of 2 (logits: ...)`."""
    if isinstance(output, Tensor):
        return f"a tensor {list(output.shape)}"
    if not isinstance(output, (tuple, list, Mapping)):
        return f"a {type(output).__name__}"
    items = _items(output)
    keyed = isinstance(output, Mapping) or hasattr(type(output), "_fields")
    shown = [f"{key}: {_short(value)}" if keyed else _short(value) for key, value in items[:6]]
    more = ", ..." if len(items) > 6 else ""
    return f"a {type(output).__name__} of {len(items)} ({', '.join(shown)}{more})"


def suggested_choice(output: Any, batch: int, num_classes: int) -> int | str:
    """The `output` that most likely picks the logits: an item named `logits`, else the first tensor of
    shape [batch, num_classes], else the first item."""
    items = _items(output)
    keys = [key for key, value in items if isinstance(value, Tensor) and tuple(value.shape) == (batch, num_classes)]
    if "logits" in keys or (not keys and any(key == "logits" for key, _ in items)):
        return "logits"
    return keys[0] if keys else (items[0][0] if items else 0)


# ---------------------------------------------------------------------------------------------- copies


def model_copy(model: nn.Module, place: Callable[[Tensor], Tensor]) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are `place(tensor)` (ties kept): on `meta` it
    copies no numbers. Lazy (uninitialised) ones stay lazy, on the placed tensors' device."""
    device = place(torch.empty(0, device="meta")).device
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if isinstance(tensor, UninitializedTensorMixin):
            kind = UninitializedParameter if isinstance(tensor, nn.Parameter) else UninitializedBuffer
            memo[id(tensor)] = kind(requires_grad=tensor.requires_grad, device=device, dtype=tensor.dtype)
        elif isinstance(tensor, nn.Parameter):
            memo[id(tensor)] = nn.Parameter(place(tensor.detach()), requires_grad=tensor.requires_grad)
        else:
            memo[id(tensor)] = place(tensor.detach())
    return copy.deepcopy(model, memo)


def on_meta(tensor: Tensor) -> Tensor:
    return torch.empty_like(tensor, device="meta")


def on_device(device: torch.device) -> Callable[[Tensor], Tensor]:
    """Real values copied to `device`; a tensor on `meta` (which holds none) becomes zeros there."""
    def place(tensor: Tensor) -> Tensor:
        if tensor.is_meta:
            return torch.zeros_like(tensor, device=device)
        return tensor.to(device, copy=True)

    return place


def all_on_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())
               if not isinstance(t, UninitializedTensorMixin))


# ---------------------------------------------------------------------------------------------- passes


class ModelFailed(Exception):
    """The model raised `error` on the probe's inputs in `mode` (train/eval)."""

    def __init__(self, mode: str, error: Exception):
        super().__init__(mode, error)
        self.mode, self.error = mode, error


def forward_in_modes(model: nn.Module, inputs: Tensor, modes: tuple[str, ...] = ("train", "eval")) -> list[
        tuple[str, Any]]:
    """[(mode, what the model returns)] for each mode, without gradients; every module's own mode restored.
    The project's errors (UsageError, SettingError: an `output` that finds nothing) pass as they are."""
    modes_before = [(module, module.training) for module in model.modules()]
    results = []
    try:
        with torch.no_grad():
            for mode in modes:
                model.train(mode == "train")
                try:
                    results.append((mode, model(inputs)))
                except (UsageError, SettingError):
                    raise
                except Exception as err:   # noqa: BLE001 - whatever a model raises is a misfit named in one line
                    raise ModelFailed(mode, err) from err
    finally:
        for module, training in modes_before:
            module.training = training
    return results


def first_line(error: BaseException) -> str:
    """`Type: first line of its message` (an AssertionError without a message: `AssertionError`)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def probe_inputs(input_shape: tuple[int, ...], device: torch.device) -> Tensor:
    """PROBE_BATCH samples of the dataset's shape: empty on `meta`, else drawn from a private generator
    (the global ones do not move)."""
    if device.type == "meta":
        return torch.empty(PROBE_BATCH, *input_shape, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(PROBE_BATCH, *input_shape, generator=generator, device=device)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def probe_outputs(model: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                  what: str = "model") -> list[tuple[str, Any]]:
    """What the model returns in train and eval mode for two samples of `input_shape`: on a `meta` copy,
    else (an op without a meta kernel, a tensor attribute the copy cannot move) on a copy on `device`,
    whose error, if it fails too, is the one raised (ModelFailed): meta kernels word errors less clearly."""
    with torch.random.fork_rng(devices=_rng_devices(device)):
        on_meta_copy = copied(model, on_meta)
        if on_meta_copy is None and all_on_meta(model):
            on_meta_copy = model   # nothing on `meta` holds a number, and the modes are restored
        failed = None
        if on_meta_copy is not None:
            try:
                return forward_in_modes(on_meta_copy, probe_inputs(input_shape, torch.device("meta")))
            except ModelFailed as err:
                failed = err
        on_device_copy = copied(model, on_device(device))
        if on_device_copy is None:
            if failed is not None:
                raise failed
            log.warning(f"{what}: not tried on the data before the run (it cannot be copied)")
            return []
        return forward_in_modes(on_device_copy, probe_inputs(input_shape, device))


def copied(model: nn.Module, place: Callable[[Tensor], Tensor]) -> nn.Module | None:
    """`model_copy`, or None for a model that cannot be deep-copied."""
    try:
        return model_copy(model, place)
    except Exception:   # noqa: BLE001 - whatever deepcopy of a user's module raises
        return None


# ---------------------------------------------------------------------------------------------- probe


def probe(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, role: str = "model",
          label: str | None = None, device: torch.device | str = "cpu") -> None:
    """Refuse in one line (UsageError) a model that does not map two samples [2, *input_shape] to logits
    [2, num_classes] in train and in eval mode: an exception it raises (named with `label`, the model as
    the user selected it, e.g. `student=timm student.arch=vit_tiny_patch16_224`, the input shape and its own
    message), a tuple, dict or other non-tensor (with the `<role>.output` that would pick its logits), a
    tensor of another shape or class count. `device`: where a model that cannot run on `meta` is tried
    (a copy; the run's device for a model whose ops exist only there). The model and every random
    generator are left as they were."""
    label = label or role
    try:
        outputs = probe_outputs(model, tuple(input_shape), torch.device(device), label)
    except ModelFailed as failed:
        raise UsageError(f"{label} does not take the dataset's inputs {list(input_shape)} (a batch of "
                         f"{PROBE_BATCH}, {failed.mode} mode): {first_line(failed.error)}") from None
    except SettingError as err:
        raise setting_error(f"{role}.{err.key}", err.value, err.allowed) from None
    for mode, output in outputs:
        check_logits(output, mode, tuple(input_shape), num_classes, role, label)


def check_logits(output: Any, mode: str, input_shape: tuple[int, ...], num_classes: int, role: str,
                 label: str) -> None:
    """One line unless `output` is logits [PROBE_BATCH, num_classes]."""
    inputs = [PROBE_BATCH, *input_shape]
    if not isinstance(output, Tensor):
        choice = suggested_choice(output, PROBE_BATCH, num_classes) if isinstance(output, (tuple, list, Mapping)) \
            else None
        how = (f"choose them with {role}.output={choice} (++{role}.output={choice} on the command line, "
               f"`output: {choice}` in the option's file), or " if choice is not None else "")
        raise UsageError(f"{label} returns {describe_output(output)} in {mode} mode on inputs {inputs}, not logits "
                         f"[batch, {num_classes}]: {how}give a `_target_` of your own that returns the logits")
    shape = list(output.shape)
    if output.dim() == 2 and shape[0] == PROBE_BATCH and shape[1] != num_classes:
        raise UsageError(f"{label} returns logits for {shape[1]} classes ({shape} on inputs {inputs}, {mode} mode); "
                         f"the dataset has {num_classes}: build its classifier with the num_classes it is given")
    if output.dim() != 2 or shape[0] != PROBE_BATCH:
        raise UsageError(f"{label} returns a tensor {shape} on inputs {inputs} ({mode} mode), not logits "
                         f"[batch, classes] = {[PROBE_BATCH, num_classes]}")


# ---------------------------------------------------------------------------------------------- lazy layers


def lazy_modules(model: nn.Module) -> list[str]:
    """The paths of the lazy modules still waiting for their shapes ('' for the model itself)."""
    return [path for path, module in model.named_modules()
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()]


def initialise_lazy_layers(model: nn.Module, input_shape: tuple[int, ...], what: str) -> nn.Module:
    """Give the lazy layers (nn.LazyLinear, nn.LazyConv2d, ...) of a just-built model their shapes by one
    pass of two zero inputs [2, *input_shape] on the device they were made on, in eval mode (no BatchNorm
    statistic moves, no dropout draws), without gradients, every module's mode restored. The only random
    numbers drawn are those of the layers' own initialisation, from the global generator, as an eager
    layer draws them when it is built. `what` names the model in a refusal. Returns `model`."""
    lazy = lazy_modules(model)
    if not lazy:
        return model
    device = next((t.device for t in itertools.chain(model.parameters(), model.buffers())
                   if isinstance(t, UninitializedTensorMixin)), torch.get_default_device())
    try:
        forward_in_modes(model, torch.zeros(PROBE_BATCH, *input_shape, device=device), modes=("eval",))
    except ModelFailed as failed:
        raise UsageError(f"{what}: its lazy layers ({', '.join(p or '(the model)' for p in lazy)}) cannot take their "
                         f"shapes from the dataset's inputs {list(input_shape)}: {first_line(failed.error)}") from None
    left = lazy_modules(model)
    if left:
        raise UsageError(f"{what}: its lazy layers {', '.join(left)} are not reached by an eval-mode pass of the "
                         f"dataset's inputs {list(input_shape)}, so they get no shape; give them their sizes "
                         "(nn.Linear for nn.LazyLinear, ...)")
    return model
