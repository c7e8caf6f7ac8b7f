"""Which features are matched: module paths, the pairs' shapes, and the architecture pair's defaults.

A feature is the output of a module named by its path in `named_modules()`. `features.pairs` lists
[teacher path, student path] pairs, or is null for the default pairs found by a probe pass
(`default_pairs`: the ends of the stages of equal spatial size).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from jacdistill_cli.config.checks import SettingError
from jacdistill_cli.errors import UsageError


def parse_pairs(raw: Any, key: str = "pairs") -> list[tuple[str, str]] | None:
    """`null` (the architecture pair's defaults) or a non-empty list of [teacher path, student path].

    Integers are accepted as paths ("0" in an nn.Sequential); floats are refused, since a path such
    as 1.10 would already have been read as the number 1.1.
    """
    if raw is None:
        return None
    if isinstance(raw, (DictConfig,)) or isinstance(raw, (str, bytes)):
        raise SettingError(key, raw, "it must be null or a list of [teacher module path, student module path]")
    items = OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw
    if not isinstance(items, (list, tuple)) or not items:
        raise SettingError(key, raw, "it must be null or a non-empty list of [teacher module path, student module path]")
    pairs = []
    for index, item in enumerate(items):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise SettingError(f"{key}[{index}]", item, "each pair must be [teacher module path, student module path]")
        paths = []
        for path in item:
            if isinstance(path, bool) or isinstance(path, float) or not isinstance(path, (str, int)):
                raise SettingError(f"{key}[{index}]", item,
                                    "module paths must be names from named_modules(); quote paths that look "
                                    "like numbers, e.g. ['1.10','2']")
            paths.append(str(path))
        pairs.append((paths[0], paths[1]))
    return pairs


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def module_at(model: nn.Module, path: str, role: str, key: str) -> nn.Module:
    """The submodule at `path`, or a UsageError naming the nearest valid paths (one line)."""
    modules = dict(model.named_modules())
    if path and path in modules:
        return modules[path]
    nearest = difflib.get_close_matches(path, module_names(model), n=6, cutoff=0.0)
    listed = ", ".join(repr(n) for n in nearest) or "(the model has no submodules)"
    raise UsageError(f"{key}={path!r} is not allowed: the {role} has no module {path!r}; "
                     f"nearest valid names: {listed}")


@dataclass
class ModuleCall:
    """One submodule's first call in a probe pass."""

    path: str
    module: nn.Module
    started: int                   # order in which forward passes began
    ended: int = -1                # order in which they ended (children before parents)
    input: Tensor | None = None    # the first tensor argument
    output: Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample output shape: [channels, *spatial] or [units]."""
        return tuple(self.output.shape[1:])

    def is_map(self) -> bool:
        return self.output is not None and self.output.dim() >= 3

    def changes_resolution(self) -> bool:
        return (self.is_map() and self.input is not None and self.input.dim() == self.output.dim()
                and tuple(self.input.shape[2:]) != tuple(self.output.shape[2:]))


def probe_calls(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> list[ModuleCall]:
    """Every submodule that returns a tensor, with its first call's input and output, from one
    eval-mode pass on zeros [2, *input_shape], in the order their forward passes end. The
    model's train/eval flags and BatchNorm statistics are unchanged. The tensors are kept (so
    that identity tells which module's output feeds which module): use for a probe only."""
    calls: dict[str, ModuleCall] = {}
    counter = {"started": 0, "ended": 0}
    handles = []

    def before(path: str, module: nn.Module):
        def record(module, args):
            if path not in calls:
                first = next((a for a in args if isinstance(a, Tensor)), None)
                calls[path] = ModuleCall(path, module, counter["started"], input=first)
                counter["started"] += 1
        return record

    def after(path: str):
        def record(module, args, output):
            call = calls.get(path)
            if call is not None and call.ended < 0 and isinstance(output, Tensor):
                call.output, call.ended = output, counter["ended"]
                counter["ended"] += 1
        return record

    modes = {m: m.training for m in model.modules()}
    try:
        for path, module in model.named_modules():
            if path:
                handles.append(module.register_forward_pre_hook(before(path, module)))
                handles.append(module.register_forward_hook(after(path)))
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return sorted((c for c in calls.values() if c.output is not None), key=lambda c: c.ended)


def is_activation(module: nn.Module) -> bool:
    """An activation module of torch.nn, or a subclass of one (the Jacobian-ready ReLU)."""
    return any(cls.__module__ == nn.modules.activation.__name__ for cls in type(module).__mro__[:-2])


def _inside(path: str, ancestor: str) -> bool:
    return path.startswith(ancestor + ".")


def stage_ends(calls: list[ModuleCall]) -> tuple[list[ModuleCall], list[ModuleCall]]:
    """The default feature points of a model, shallow to deep: (maps, vectors).

    maps: the end of each stage, i.e. the module output that feeds each change of resolution
    (a pooling layer, a strided block), found by tensor identity: for the innermost module that
    changes the spatial size, the outermost enclosing module that makes only that change (a
    strided residual block, say) is the transition, and the module whose output is the
    transition's input is the stage end. One per spatial size (the deepest); the last map of a
    size not seen yet ends the last stage (pooled by a function, not a module); maps of one
    position are left out.
    vectors: the outputs of activation modules (ReLU, ...) that are vectors.
    """
    changes = [c for c in calls if c.changes_resolution()]
    innermost = [c for c in changes if not any(_inside(o.path, c.path) for o in changes)]

    def resolution_change(call: ModuleCall) -> tuple:
        return tuple(call.input.shape[2:]), tuple(call.output.shape[2:])

    by_path = {c.path: c for c in calls}
    ends: list[ModuleCall] = []
    for change in innermost:
        transition = change
        parts = change.path.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            ancestor = by_path.get(".".join(parts[:depth]))
            if ancestor is None or not ancestor.changes_resolution():
                break
            inner = [c for c in innermost if _inside(c.path, ancestor.path)]
            if any(resolution_change(c) != resolution_change(change) for c in inner):
                break
            transition = ancestor
        producers = [c for c in calls if c.output is transition.input and c.ended < change.ended
                     and not isinstance(c.module, nn.Identity)]
        if producers:
            ends.append(max(producers, key=lambda c: c.ended))
    by_size: dict[tuple, ModuleCall] = {}
    for call in ends:
        spatial = call.shape[1:]
        if call.is_map() and math.prod(spatial) > 1:
            if spatial not in by_size or call.ended > by_size[spatial].ended:
                by_size[spatial] = call
    # The last stage, when no module of its own pools it (functional global pooling).
    maps = [c for c in calls if c.is_map() and math.prod(c.shape[1:]) > 1 and not isinstance(c.module, nn.Identity)]
    if maps and maps[-1].shape[1:] not in by_size:
        by_size[maps[-1].shape[1:]] = maps[-1]
    vectors = [c for c in calls if c.output.dim() == 2 and is_activation(c.module)]
    return sorted(by_size.values(), key=lambda c: c.ended), vectors


def default_pairs(teacher_calls: list[ModuleCall], student_calls: list[ModuleCall]) -> list[tuple[str, str]]:
    """The architecture pair's default pairs (teacher path, student path).

    Both models have spatial maps of the same rank: the stage ends of equal spatial size (each student stage
    end whose resolution the teacher also has), or the deepest stage ends when no size is shared.
    Otherwise (an MLP on either side, a CNN and a transformer): the deepest activation vector of each model,
    and where either has none, no default (one line asks for features.pairs).
    """
    teacher_maps, teacher_vectors = stage_ends(teacher_calls)
    student_maps, student_vectors = stage_ends(student_calls)
    if teacher_maps and student_maps and len(teacher_maps[-1].shape) != len(student_maps[-1].shape):
        # e.g. a CNN's [channels, height, width] against a transformer's [tokens, width]: no maps in common
        teacher_maps, student_maps = [], []
    if teacher_maps and student_maps:
        by_size = {c.shape[1:]: c.path for c in teacher_maps}
        pairs = [(by_size[c.shape[1:]], c.path) for c in student_maps if c.shape[1:] in by_size]
        return pairs or [(teacher_maps[-1].path, student_maps[-1].path)]
    if teacher_vectors and student_vectors:
        return [(teacher_vectors[-1].path, student_vectors[-1].path)]
    raise UsageError("features.pairs=null is not allowed: this teacher and student have no default feature "
                     "pairs (no maps or activation vectors in common); give features.pairs=[[TEACHER_PATH,STUDENT_PATH]]")


@dataclass(frozen=True)
class FeaturePair:
    teacher_path: str
    student_path: str
    teacher_shape: tuple[int, ...]   # per sample: [channels, *spatial] or [units]
    student_shape: tuple[int, ...]

    def describe(self) -> str:
        return (f"teacher {self.teacher_path!r} {list(self.teacher_shape)} <- "
                f"student {self.student_path!r} {list(self.student_shape)}")


def resolve_pairs(raw_pairs: Any, teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...],
                  device: torch.device | str = "cpu") -> list[FeaturePair]:
    """The configured pairs (or the defaults for `null`), checked against both models, with the
    per-sample shapes of their features. Raises UsageError for a path a model does not have."""
    pairs = parse_pairs(raw_pairs)
    dtype = next(student.parameters()).dtype if any(True for _ in student.parameters()) else torch.float32
    teacher_calls = probe_calls(teacher, input_shape, device, dtype)
    student_calls = probe_calls(student, input_shape, device, dtype)
    if pairs is None:
        pairs = default_pairs(teacher_calls, student_calls)
    else:
        for index, (teacher_path, student_path) in enumerate(pairs):
            module_at(teacher, teacher_path, "teacher", f"features.pairs[{index}][0]")
            module_at(student, student_path, "student", f"features.pairs[{index}][1]")
    teacher_shapes = {c.path: c.shape for c in teacher_calls}
    student_shapes = {c.path: c.shape for c in student_calls}
    del teacher_calls, student_calls  # the probe's tensors
    resolved = []
    for index, (teacher_path, student_path) in enumerate(pairs):
        for role, path, shapes, position in (("teacher", teacher_path, teacher_shapes, 0),
                                             ("student", student_path, student_shapes, 1)):
            if path not in shapes:
                raise UsageError(f"features.pairs[{index}][{position}]={path!r} is not allowed: the {role}'s "
                                 "module there does not run in a forward pass or does not return a tensor")
            if len(shapes[path]) < 1:
                raise UsageError(f"features.pairs[{index}][{position}]={path!r} is not allowed: its output "
                                 "has no per-sample values")
        resolved.append(FeaturePair(teacher_path, student_path, teacher_shapes[teacher_path],
                                    student_shapes[student_path]))
    return resolved
