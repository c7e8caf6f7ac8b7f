"""Feature matching: intermediate features captured by forward hooks and compared between
student and teacher, and the input-gradient of a feature summary (`jacobian.of=features`).

A feature is the output of a module named by its path in `named_modules()`. It is a map
[batch, channels, *spatial] or a vector [batch, units]; a vector is treated as one channel over
`units` positions. Methods (config group `features/`):

- `attention` (Zagoruyko & Komodakis 2017): a(F) = normalize(flatten(mean over channels of F^2)),
  per sample; term = mean over pairs of mean over the batch of ||a_s - a_t||_2 (squared with
  `features.squared=true`). When the spatial sizes differ, the student's channel mean of F^2 is
  resized to the teacher's size (linear/bilinear/trilinear) before it is normalised.
- `hint` (FitNets, Romero et al. 2015): a regressor (1x1 convolution for maps of the same rank,
  otherwise a linear map of the flattened feature) maps the student's feature to the teacher's
  shape; term = mean over pairs of the mean squared error. The regressor is trained with the
  student and saved in the student's checkpoint.

Hooks: the student's features stay in the autograd graph (so the term trains the student), the
teacher's are detached. Each hook keeps only the first output of its module inside a capture,
and every handle is removed when the capture ends, so no tensor survives from one step to the next.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from jacdistill_cli.errors import UsageError, setting_error
from jacdistill_cli.engine import jacobian as jacobians
from jacdistill_cli.engine.jacobian import matching_distance

FEATURE_METHODS = ("none", "attention", "hint")
JACOBIAN_OF = ("logits", "features")
# The feature Jacobian is one input-gradient per sample and pair: the analogue of top1.
FEATURE_JACOBIAN_METHODS = ("top1",)
INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}
# A linear hint regressor between a map and a vector grows with both sizes; beyond this it is refused.
MAX_REGRESSOR_PARAMETERS = 1 << 24


# ----------------------------------------------------------------------------------------------
# Settings


def jacobian_of(cfg: DictConfig) -> str:
    return OmegaConf.select(cfg, "jacobian.of", default="logits")


def parse_pairs(raw: Any, key: str = "features.pairs") -> list[tuple[str, str]] | None:
    """`null` (the architecture pair's defaults) or a non-empty list of [teacher path, student path].

    Integers are accepted as paths ("0" in an nn.Sequential); floats are refused, since a path such
    as 1.10 would already have been read as the number 1.1.
    """
    if raw is None:
        return None
    if isinstance(raw, (DictConfig,)) or isinstance(raw, (str, bytes)):
        raise setting_error(key, raw, "it must be null or a list of [teacher module path, student module path]")
    items = OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw
    if not isinstance(items, (list, tuple)) or not items:
        raise setting_error(key, raw, "it must be null or a non-empty list of [teacher module path, student module path]")
    pairs = []
    for index, item in enumerate(items):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise setting_error(f"{key}[{index}]", item, "each pair must be [teacher module path, student module path]")
        paths = []
        for path in item:
            if isinstance(path, bool) or isinstance(path, float) or not isinstance(path, (str, int)):
                raise setting_error(f"{key}[{index}]", item,
                                    "module paths must be names from named_modules(); quote paths that look "
                                    "like numbers, e.g. ['1.10','2']")
            paths.append(str(path))
        pairs.append((paths[0], paths[1]))
    return pairs


def validate_features(cfg: DictConfig) -> None:
    """Check the `features` node and `jacobian.of`; raises UsageError naming the key and value."""
    from jacdistill_cli.config import settings

    of = jacobian_of(cfg)
    if of not in JACOBIAN_OF:
        raise setting_error("jacobian.of", of, f"it must be one of {', '.join(JACOBIAN_OF)}")
    if OmegaConf.select(cfg, "features") is None:
        if of == "features":
            raise setting_error("jacobian.of", of, "it needs a features group (features=attention or hint)")
        return
    name = settings.choice(cfg, "features.name", FEATURE_METHODS)
    if name != "none":
        settings.real(cfg, "features.weight", low=0, allowed="it must be a number >= 0")
        parse_pairs(OmegaConf.select(cfg, "features.pairs"))
    if name == "attention":
        settings.flag(cfg, "features.squared")
    if of == "features":
        if name == "none":
            raise setting_error("jacobian.of", of, "it takes the Jacobian of the matched features: choose "
                                "features=attention or features=hint (features.weight=0 to match their Jacobians only)")
        method = cfg.jacobian.name
        if method not in FEATURE_JACOBIAN_METHODS:
            raise setting_error("jacobian.of", of, f"with jacobian={method}: the feature Jacobian is one "
                                "input-gradient per sample and pair, as jacobian=top1 is for the logits; "
                                "use jacobian=top1")


# ----------------------------------------------------------------------------------------------
# Modules by path, and hooks


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


def student_feature(output: Tensor) -> Tensor:
    """What the student's hook keeps: the output itself, inside the graph (so the term trains
    the student). `.detach()` or a copy here is the mistake `check` catches."""
    return output


def teacher_feature(output: Tensor) -> Tensor:
    """What the teacher's hook keeps: a detached feature (the teacher is a constant)."""
    return output.detach()


def keep_graph(output: Tensor) -> Tensor:
    """For input-gradients of the teacher's features: the graph to the input is needed briefly."""
    return output


class CaptureComplete(Exception):
    """Raised by the last hook of a capture with `stop_when_complete`: the rest of the forward
    pass is not needed."""


class FeatureCapture:
    """Context manager: forward hooks that record the first output of each named module.

    `targets`: (model, path, keep) triples; `keep(output)` decides what is recorded (see
    `student_feature`, `teacher_feature`). `features[i]` is the recorded output for targets[i]
    (None until its module runs). On exit every hook handle is removed; the records stay readable
    until `clear` (callers clear them once the term is built), so nothing outlives a step.
    With `stop_when_complete`, the hook that records the last missing feature raises
    `CaptureComplete`, which the context swallows when it reaches the `with` statement.
    """

    def __init__(self, targets: Iterable[tuple[nn.Module, str, Callable[[Tensor], Tensor]]],
                 stop_when_complete: bool = False):
        self.targets = list(targets)
        self.stop_when_complete = stop_when_complete
        self.features: list[Tensor | None] = [None] * len(self.targets)
        self.handles: list[Any] = []

    def _hook(self, index: int, path: str, keep: Callable[[Tensor], Tensor]):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.features[index] is not None:
                return  # later calls (a second pass of the same model) are not the matched feature
            if not isinstance(output, Tensor):
                raise UsageError(f"features.pairs: module {path!r} returns {type(output).__name__}, not a tensor; "
                                 "choose a module whose output is a tensor")
            self.features[index] = keep(output)
            if self.stop_when_complete and all(f is not None for f in self.features):
                raise CaptureComplete

        return record

    def __enter__(self) -> "FeatureCapture":
        try:
            for index, (model, path, keep) in enumerate(self.targets):
                module = model.get_submodule(path)
                self.handles.append(module.register_forward_hook(self._hook(index, path, keep)))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove every hook. The records stay readable until `clear` (or until the capture is freed)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def clear(self) -> None:
        self.features = [None] * len(self.targets)

    def __exit__(self, kind, error, traceback) -> bool:
        self.close()
        if kind is not None and kind is not CaptureComplete:
            self.clear()
        return kind is CaptureComplete


def capture_student(model: nn.Module, path: str) -> tuple[nn.Module, str, Callable[[Tensor], Tensor]]:
    # A lambda so that `student_feature` is looked up when the hook runs, not when it is made.
    return model, path, lambda output: student_feature(output)


def capture_teacher(model: nn.Module, path: str) -> tuple[nn.Module, str, Callable[[Tensor], Tensor]]:
    return model, path, lambda output: teacher_feature(output)


def total_hooks(model: nn.Module) -> int:
    """Forward hooks registered on the model and all its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----------------------------------------------------------------------------------------------
# Shapes, and the architecture pair's default pairs


def as_map(feature: Tensor) -> Tensor:
    """[batch, channels, *spatial] as it is; [batch, units] as [batch, 1, units]."""
    if feature.dim() == 2:
        return feature.unsqueeze(1)
    if feature.dim() < 2:
        raise UsageError(f"features.pairs: a feature of shape {list(feature.shape)} has no per-sample values")
    return feature


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
    return type(module).__module__ == nn.modules.activation.__name__


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

    Both models have spatial maps: the stage ends of equal spatial size (each student stage end
    whose resolution the teacher also has), or the deepest stage ends when no size is shared.
    Otherwise (an MLP on either side): the deepest activation vector of each model.
    """
    teacher_maps, teacher_vectors = stage_ends(teacher_calls)
    student_maps, student_vectors = stage_ends(student_calls)
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


def validate_paths(cfg: DictConfig, teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Stop early (before a teacher is trained) when a configured module path does not exist."""
    if OmegaConf.select(cfg, "features.name", default="none") == "none":
        return
    resolve_pairs(OmegaConf.select(cfg, "features.pairs"), teacher, student, input_shape)


# ----------------------------------------------------------------------------------------------
# The terms


def spatial_energy(feature: Tensor, size: tuple[int, ...] | None = None) -> Tensor:
    """Mean over channels of F^2, resized to `size` when given and different.

    feature [batch, channels, *spatial] or [batch, units] -> [batch, *size or spatial].
    """
    energy = as_map(feature).pow(2).mean(dim=1)
    if size is not None and tuple(energy.shape[1:]) != tuple(size):
        if len(size) != energy.dim() - 1 or len(size) not in INTERPOLATION:
            raise UsageError(f"features.pairs: cannot resize a feature with spatial shape {list(energy.shape[1:])} "
                             f"to {list(size)}; pair features of the same rank")
        energy = F.interpolate(energy.unsqueeze(1), size=tuple(size), mode=INTERPOLATION[len(size)],
                               align_corners=False).squeeze(1)
    return energy


def attention_map(feature: Tensor, size: tuple[int, ...] | None = None) -> Tensor:
    """a(F) = normalize(flatten(mean over channels of F^2)), per sample (l2 norm; a zero map stays
    zero). feature [batch, channels, *spatial] or [batch, units] -> [batch, positions]."""
    return F.normalize(spatial_energy(feature, size).flatten(1), dim=1)


def spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample [channels, *spatial] -> spatial; [units] -> (units,)."""
    return tuple(shape[1:]) if len(shape) >= 2 else tuple(shape)


def attention_distance(student: Tensor, teacher: Tensor, squared: bool) -> Tensor:
    """||a(student) - a(teacher)||_2 (or squared) per sample, the student's map resized to the
    teacher's spatial size. student [batch, *s], teacher [batch, *t] -> [batch]."""
    size = spatial_shape(tuple(teacher.shape[1:]))
    return matching_distance(attention_map(student, size), attention_map(teacher), False, squared)


class HintRegressor(nn.Module):
    """Maps a student feature to the teacher's shape: [batch, *student_shape] -> [batch, *teacher_shape].

    Maps of the same rank: a 1x1 convolution (channels), then resizing to the teacher's spatial
    size if it differs. Anything else: a linear map of the flattened feature."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        rank = len(teacher_shape) - 1
        self.convolutional = len(student_shape) == len(teacher_shape) and 1 <= rank <= 3
        if self.convolutional:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
            self.map = conv(student_shape[0], teacher_shape[0], kernel_size=1)
        else:
            size = math.prod(student_shape) * math.prod(teacher_shape)
            if size > MAX_REGRESSOR_PARAMETERS:
                raise UsageError(f"features.pairs: a linear hint regressor from {list(student_shape)} to "
                                 f"{list(teacher_shape)} would have {size} weights; pair maps with maps "
                                 "(a 1x1 convolution) or vectors with vectors")
            self.map = nn.Linear(math.prod(student_shape), math.prod(teacher_shape))

    def forward(self, feature: Tensor) -> Tensor:
        if self.convolutional:
            mapped = self.map(feature)
            spatial = self.teacher_shape[1:]
            if tuple(mapped.shape[2:]) != spatial:
                mapped = F.interpolate(mapped, size=spatial, mode=INTERPOLATION[len(spatial)], align_corners=False)
            return mapped
        return self.map(feature.flatten(1)).view(feature.shape[0], *self.teacher_shape)


class FeatureMatching(nn.Module):
    """The feature term for a list of pairs; holds the hint regressors (its parameters).

    `term(student_features, teacher_features)` -> scalar: mean over pairs of the per-pair term
    (attention: mean over the batch of the attention distance; hint: mean squared error).
    """

    def __init__(self, method: str, pairs: list[FeaturePair], weight: float, squared: bool = False):
        super().__init__()
        if method not in FEATURE_METHODS or method == "none":
            raise ValueError(f"feature method must be attention or hint, got {method!r}")
        self.method = method
        self.pairs = list(pairs)
        self.weight = float(weight)
        self.squared = bool(squared)
        self.regressors = nn.ModuleList(
            [HintRegressor(p.student_shape, p.teacher_shape) for p in pairs] if method == "hint" else [])

    def pair_terms(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> Tensor:
        """[pairs]: each pair's term."""
        terms = []
        for index, (student, teacher) in enumerate(zip(student_features, teacher_features)):
            if self.method == "attention":
                terms.append(attention_distance(student, teacher, self.squared).mean())
            else:
                terms.append(F.mse_loss(self.regressors[index](student), teacher))
        return torch.stack(terms)

    def term(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> Tensor:
        return self.pair_terms(student_features, teacher_features).mean()

    def capture(self, student: nn.Module, teacher: nn.Module) -> FeatureCapture:
        """Hooks on both models: features[:n] are the student's, features[n:] the teacher's."""
        return FeatureCapture([capture_student(student, p.student_path) for p in self.pairs]
                              + [capture_teacher(teacher, p.teacher_path) for p in self.pairs])

    def checkpoint_entry(self) -> dict[str, Any]:
        """What the student's checkpoint keeps: plain containers and tensors (weights_only-safe)."""
        return {"method": self.method, "pairs": [[p.teacher_path, p.student_path] for p in self.pairs],
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}


def split_features(capture: FeatureCapture, count: int) -> tuple[list[Tensor], list[Tensor]]:
    """(the first `count` records, the rest): the student's and the teacher's features."""
    missing = [i for i, f in enumerate(capture.features) if f is None]
    if missing:
        _, path, _ = capture.targets[missing[0]]
        raise RuntimeError(f"feature {path!r} was not computed: the module did not run in the forward pass")
    return capture.features[:count], capture.features[count:]


# ----------------------------------------------------------------------------------------------
# Jacobians of features


def attention_summary(feature: Tensor, locations: Tensor | None, size: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """The attention map's value at one location per sample.

    feature [batch, ...] -> (summary [batch], locations [batch]); without `locations`, each
    sample's most-attended location is taken (the teacher's side).
    """
    attention = attention_map(feature, size)
    if locations is None:
        locations = attention.detach().argmax(dim=1)
    return attention.gather(1, locations.view(-1, 1)).squeeze(1), locations


@contextlib.contextmanager
def batchnorm_buffers_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics as they were after the context: a train-mode pass inside it
    updates copies. (The buffers are swapped, not restored in place: the step's first pass keeps
    them for its backward, and an in-place write would invalidate that graph.)"""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    originals = [{name: buffer for name, buffer in m.named_buffers(recurse=False)} for m in norms]
    for m, buffers in zip(norms, originals):
        for name, buffer in buffers.items():
            setattr(m, name, buffer.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, originals):
            for name, buffer in buffers.items():
                setattr(m, name, buffer)


def feature_input_gradients(model: nn.Module, paths: list[str], inputs: Tensor, keep: Callable[[Tensor], Tensor],
                            locations: list[Tensor] | None, sizes: list[tuple[int, ...] | None],
                            create_graph: bool) -> tuple[list[Tensor], list[Tensor]]:
    """d summary_k[b] / d inputs[b] for each feature path k (see `attention_summary`).

    inputs [batch, *input] -> ([batch, *input] per path, locations [batch] per path). The forward
    pass stops after the deepest requested module. With `create_graph` the gradients stay in the
    graph (the student's side); otherwise they are constants.
    """
    leaf = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        with FeatureCapture([(model, path, keep) for path in paths], stop_when_complete=True) as capture:
            model(leaf)
        features = list(capture.features)
        capture.clear()
        if any(f is None for f in features):
            raise RuntimeError("a matched feature was not computed in the forward pass")
        summaries, found = [], []
        for index, feature in enumerate(features):
            summary, where = attention_summary(feature, None if locations is None else locations[index], sizes[index])
            summaries.append(summary)
            found.append(where)
        gradients = []
        for index, summary in enumerate(summaries):
            if not summary.requires_grad:  # a feature cut from the input (a detaching hook): a zero gradient
                gradients.append(torch.zeros_like(leaf))
                continue
            (gradient,) = torch.autograd.grad(summary.sum(), leaf, create_graph=create_graph,
                                              retain_graph=create_graph or index < len(summaries) - 1)
            gradients.append(gradient if create_graph else gradient.detach())
    return gradients, found


def needs_batch_statistics(student: nn.Module, settings: Any) -> bool:
    return settings.batchnorm == "batch" and jacobians.has_training_batchnorm(student)


def record_batch_statistics(student: nn.Module, inputs: Tensor) -> Any:
    """The statistics a train-mode pass of `student` on `inputs` normalises with (running
    statistics untouched): for `jacobian.batchnorm=batch` outside an objective's own pass."""
    with batchnorm_buffers_kept(student), jacobians.recorded_batchnorm_statistics(student) as statistics:
        student(inputs)
    return statistics


def feature_jacobian_term(student: nn.Module, teacher: nn.Module, pairs: list[FeaturePair], inputs: Tensor,
                          settings: Any, create_graph: bool, statistics: Any = None) -> Tensor:
    """Per-sample distance between the student's and the teacher's input-gradients of the
    attention map at the teacher's most-attended location, mean over pairs.

    inputs [batch, *input] -> [batch]. `settings` is the `jacobian` node (normalize, squared,
    batchnorm). The student's BatchNorm in train mode is handled as for the logit Jacobian
    (`jacobian.batchnorm`; `batch` uses `statistics` recorded by the step's train-mode pass, or
    records them); its running statistics are left as they were.
    """
    teacher_gradients, locations = feature_input_gradients(
        teacher, [p.teacher_path for p in pairs], inputs, keep_graph, None, [None] * len(pairs), False)
    if statistics is None and needs_batch_statistics(student, settings):
        statistics = record_batch_statistics(student, inputs)
    with batchnorm_buffers_kept(student), jacobians.per_sample_batchnorm(student, settings.batchnorm, statistics):
        student_gradients, _ = feature_input_gradients(
            student, [p.student_path for p in pairs], inputs, lambda output: student_feature(output), locations,
            [spatial_shape(p.teacher_shape) for p in pairs], create_graph)
    distances = [matching_distance(s, t, bool(settings.normalize), bool(settings.squared))
                 for s, t in zip(student_gradients, teacher_gradients)]
    return torch.stack(distances).mean(dim=0)


# ----------------------------------------------------------------------------------------------
# The objective with features


class FeatureObjective:
    """Wraps a distillation objective: (student, teacher, inputs, labels) -> (logits, terms).

    Hooks are registered around the base objective's call; the first forward pass of each model
    there gives the matched features (the student's train-mode pass that also gives the logits;
    a second pass the base may run for its Jacobian, with BatchNorm statistics held, is ignored).

        total = base total + features.weight * features [+ alpha * jacobian, with jacobian.of=features]

    With `jacobian.of=features`, the base is built without a Jacobian term and terms["jacobian"]
    is the feature Jacobian term (`feature_jacobian_term`).
    """

    def __init__(self, base: Callable, matching: FeatureMatching, alpha: float,
                 feature_jacobian: Any | None = None):
        self.base = base
        self.matching = matching
        self.alpha = float(alpha)
        self.feature_jacobian = feature_jacobian   # the `jacobian` node when jacobian.of=features

    def __call__(self, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                 labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        count = len(self.matching.pairs)
        record = self.feature_jacobian is not None and needs_batch_statistics(student, self.feature_jacobian)
        with self.matching.capture(student, teacher) as capture, contextlib.ExitStack() as stack:
            # jacobian.batchnorm=batch: the feature Jacobian uses the statistics of this train-mode pass.
            statistics = stack.enter_context(jacobians.recorded_batchnorm_statistics(student)) if record else None
            logits, terms = self.base(student, teacher, inputs, labels)
            student_features, teacher_features = split_features(capture, count)
            features = self.matching.term(student_features, teacher_features)
        capture.clear()
        del student_features, teacher_features
        total = terms.pop("total") + self.matching.weight * features
        terms["features"] = features
        if self.feature_jacobian is not None:
            jacobian = feature_jacobian_term(student, teacher, self.matching.pairs, inputs, self.feature_jacobian,
                                             create_graph=self.alpha > 0, statistics=statistics).mean()
            total = total - self.alpha * terms["jacobian"] + self.alpha * jacobian
            terms["jacobian"] = jacobian
        terms["total"] = total
        return logits, terms


def build_feature_matching(cfg: DictConfig, teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...],
                           device: torch.device | str = "cpu") -> FeatureMatching | None:
    """The configured feature matching (regressors on `device`), or None for features=none."""
    node = OmegaConf.select(cfg, "features")
    if node is None or node.name == "none":
        return None
    pairs = resolve_pairs(node.pairs, teacher, student, input_shape, device)
    matching = FeatureMatching(node.name, pairs, node.weight, bool(node.get("squared", False)))
    dtype = next(student.parameters()).dtype
    return matching.to(device=device, dtype=dtype)


def build_objective_with_features(cfg: DictConfig, teacher: nn.Module, student: nn.Module,
                                  input_shape: tuple[int, ...], device: torch.device | str = "cpu",
                                  generator: torch.Generator | None = None) -> tuple[Callable, FeatureMatching | None]:
    """The run's objective: the distillation objective, wrapped with feature matching when
    features != none. Returns (objective, matching or None); the matching's parameters (hint
    regressors) are to be optimised with the student."""
    from jacdistill_cli.engine.objective import build_objective

    matching = build_feature_matching(cfg, teacher, student, input_shape, device)
    if matching is None:
        return build_objective(cfg, generator), None
    feature_jacobian = None
    base_cfg = cfg
    if jacobian_of(cfg) == "features":
        feature_jacobian = cfg.jacobian
        base_cfg = OmegaConf.merge(cfg, {"jacobian": {"name": "none"}})
    return FeatureObjective(build_objective(base_cfg, generator), matching, cfg.alpha, feature_jacobian), matching


def check_feature_paths(cfg: DictConfig, student: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Before a teacher is trained: the configured module paths exist in the student and in an
    untrained model of the teacher's architecture (one line naming the nearest valid paths if not)."""
    if OmegaConf.select(cfg, "features.name", default="none") == "none":
        return
    from jacdistill_cli.zoo.models import architecture, build_model

    teacher = build_model(architecture(cfg.teacher), input_shape, num_classes, "teacher")
    validate_paths(cfg, teacher, student, input_shape)


# ----------------------------------------------------------------------------------------------
# `jacdistill check`: does the feature term train the student?


@dataclass
class FeatureGradientCheck:
    """What the feature term's gradient reaches, and whether it is right.

    expected: the student's parameters that compute its deepest matched feature (those of every
    module whose forward pass ends no later than that module's); trained: those of them with a
    non-zero gradient from the feature term; detached_trained: how many student parameters the
    same term trains when the student's hook detaches its feature (the mistake: 0).
    directional_derivative / finite_difference: d term / d parameters along a random direction,
    by autograd and by central differences in float64.
    """

    method: str
    deepest: str
    expected: list[str]
    trained: list[str]
    detached_trained: int
    regressor_trained: int
    regressor_total: int
    directional_derivative: float
    finite_difference: float
    term_value: float = 0.0
    tolerance: float = 1e-5
    jacobian_expected: int = 0     # with jacobian.of=features: the same count for the feature Jacobian term
    jacobian_trained: int = -1

    @property
    def untrained(self) -> list[str]:
        trained = set(self.trained)
        return [name for name in self.expected if name not in trained]

    @property
    def relative_error(self) -> float:
        scale = max(abs(self.directional_derivative), abs(self.finite_difference), 1e-12)
        return abs(self.directional_derivative - self.finite_difference) / scale

    @property
    def finite_differences_agree(self) -> bool:
        # Central differences with a step of 1e-6 carry a rounding error of about 1e-16 * |term| / 1e-6.
        difference = abs(self.directional_derivative - self.finite_difference)
        scale = max(abs(self.directional_derivative), abs(self.finite_difference))
        return difference <= self.tolerance * scale + 1e-9 * max(1.0, abs(self.term_value))

    @property
    def passed(self) -> bool:
        jacobian_ok = self.jacobian_trained < 0 or self.jacobian_trained == self.jacobian_expected
        return (bool(self.expected) and not self.untrained and self.detached_trained == 0
                and self.regressor_trained == self.regressor_total and self.finite_differences_agree
                and jacobian_ok)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "passed": self.passed, "deepest": self.deepest,
                "expected": self.expected, "untrained": self.untrained, "detached_trained": self.detached_trained,
                "regressor_trained": self.regressor_trained, "regressor_total": self.regressor_total,
                "finite_difference_error": self.relative_error, "jacobian_trained": self.jacobian_trained,
                "jacobian_expected": self.jacobian_expected}

    def lines(self) -> list[str]:
        mark = "ok" if self.passed else "FAILED"
        rows = [f"features={self.method}: the feature term trains {len(self.trained)}/{len(self.expected)} student "
                f"parameters up to the deepest matched layer {self.deepest!r}"
                + (f" and {self.regressor_trained}/{self.regressor_total} regressor parameters"
                   if self.regressor_total else "")
                + f"; d(term)/d(parameters) vs finite differences: rel. error {self.relative_error:.1e}  [{mark}]"]
        if self.untrained:
            rows.append(f"  no gradient reaches: {', '.join(self.untrained[:8])}"
                        + (" ..." if len(self.untrained) > 8 else ""))
        if self.jacobian_trained >= 0:
            rows.append(f"  jacobian.of=features: the feature Jacobian term trains {self.jacobian_trained}/"
                        f"{self.jacobian_expected} of them")
        rows.append(f"  the common mistake, a hook that detaches the student's feature: trains "
                    f"{self.detached_trained} student parameters")
        return rows


def parameters_up_to(model: nn.Module, path: str, input_shape: tuple[int, ...], device, dtype) -> list[str]:
    """Names of the parameters of every module whose forward pass ends no later than `path`'s
    (the modules that run before it, and its own submodules)."""
    calls = {c.path: c for c in probe_calls(model, input_shape, device, dtype)}
    limit = calls[path].ended
    names = []
    for module_path, module in model.named_modules():
        call = calls.get(module_path)
        if call is not None and call.ended <= limit:
            names += [f"{module_path}.{name}" for name, _ in module.named_parameters(recurse=False)]
    return names


def _feature_term(matching: FeatureMatching, student: nn.Module, teacher: nn.Module, inputs: Tensor) -> Tensor:
    count = len(matching.pairs)
    with matching.capture(student, teacher) as capture:
        with torch.no_grad():
            teacher(inputs)
        student(inputs)
        student_features, teacher_features = split_features(capture, count)
        term = matching.term(student_features, teacher_features)
    capture.clear()
    return term


def check_feature_gradients(matching: FeatureMatching, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                            jacobian_settings: Any | None = None, seed: int = 0) -> FeatureGradientCheck:
    """Run the feature term on `inputs` [batch, *input] (student in train mode, as in training)
    and report what its gradient reaches; see FeatureGradientCheck. Works on float64 copies, so
    the models themselves are untouched."""
    import copy

    student = copy.deepcopy(student).double().train()
    teacher = copy.deepcopy(teacher).double().eval()
    matching = copy.deepcopy(matching).double()
    inputs = inputs.detach().double()
    input_shape = tuple(inputs.shape[1:])
    with torch.no_grad():
        calls = {c.path: c for c in probe_calls(student, input_shape, inputs.device, inputs.dtype)}
    deepest = max((p.student_path for p in matching.pairs), key=lambda path: calls[path].ended)
    del calls
    expected = parameters_up_to(student, deepest, input_shape, inputs.device, inputs.dtype)
    named = dict(student.named_parameters())
    regressor = list(matching.parameters())

    def term() -> Tensor:
        with torch.random.fork_rng(devices=[inputs.device] if inputs.is_cuda else []):
            torch.manual_seed(seed)  # the same dropout masks for every evaluation
            return _feature_term(matching, student, teacher, inputs)

    def trained_by(value: Tensor, params: list[nn.Parameter]) -> list[bool]:
        if not value.requires_grad:
            return [False] * len(params)
        grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
        return [g is not None and bool(g.abs().sum() > 0) for g in grads]

    value = term()
    student_params = [named[name] for name in expected]
    reached = trained_by(value, student_params + regressor)
    trained = [name for name, ok in zip(expected, reached) if ok]
    regressor_trained = sum(reached[len(expected):])

    # Along a random direction over every parameter the term depends on.
    all_params = list(named.values()) + regressor
    generator = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in all_params]
    scale = torch.sqrt(sum((d * d).sum() for d in direction))
    direction = [d / scale for d in direction]
    grads = torch.autograd.grad(value, all_params, allow_unused=True) if value.requires_grad else [None] * len(all_params)
    analytic = sum(((g * d).sum() for g, d in zip(grads, direction) if g is not None), torch.zeros((), dtype=torch.float64))
    step = 1e-6
    with torch.no_grad():
        values = []
        for sign in (1.0, -1.0):
            for p, d in zip(all_params, direction):
                p.add_(sign * step * d)
            values.append(term().item())
            for p, d in zip(all_params, direction):
                p.sub_(sign * step * d)
    finite = (values[0] - values[1]) / (2 * step)

    # The mistake: the student's hook detaches its feature.
    global student_feature
    kept = student_feature
    student_feature = teacher_feature
    try:
        detached = term()
        detached_trained = sum(trained_by(detached, list(named.values())))
    finally:
        student_feature = kept

    report = FeatureGradientCheck(matching.method, deepest, expected, trained, detached_trained, regressor_trained,
                                  len(regressor), float(analytic), float(finite), float(value.detach()))
    if jacobian_settings is not None:
        jacobian_term = feature_jacobian_term(student, teacher, matching.pairs, inputs, jacobian_settings,
                                              create_graph=True).mean()
        report.jacobian_expected = len(expected)
        report.jacobian_trained = sum(trained_by(jacobian_term, student_params))
    return report


def shipped_features(name: str) -> DictConfig:
    """conf/features/<name>.yaml as shipped."""
    from importlib.resources import files

    return OmegaConf.create((files("jacdistill_cli.conf") / "features" / f"{name}.yaml").read_text())


def feature_checks(cfg: DictConfig, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                   jacobian_settings: Any) -> list[FeatureGradientCheck]:
    """`jacdistill check` for features: attention and hint, the configured one as configured (its
    pairs, weight, ...) and the other with its shipped defaults; each also checks the feature
    Jacobian term with `jacobian_settings` (normalize, squared, batchnorm). inputs [batch, *input]."""
    configured = OmegaConf.select(cfg, "features")
    reports = []
    for method in ("attention", "hint"):
        node = configured if configured is not None and configured.name == method else shipped_features(method)
        pairs = resolve_pairs(node.pairs, teacher, student, tuple(inputs.shape[1:]), inputs.device)
        matching = FeatureMatching(method, pairs, node.weight, bool(node.get("squared", False))).to(inputs.device)
        reports.append(check_feature_gradients(matching, student, teacher, inputs, jacobian_settings,
                                               seed=int(OmegaConf.select(cfg, "seed", default=0))))
    return reports
