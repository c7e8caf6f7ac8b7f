"""Feature matching: intermediate features captured by forward hooks and compared between
student and teacher, and the input-gradient of a feature summary (`jacobian.of=features`).

A feature is the output of a module named by its path (engine/pairs.py). It is a map
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
import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacdistill_cli.config.checks import boolean, number
from jacdistill_cli.engine.batchnorm import (
    batchnorm_buffers_kept,
    has_training_batchnorm,
    per_sample_batchnorm,
    recorded_batchnorm_statistics,
)
from jacdistill_cli.engine.jacobian import matching_distance
from jacdistill_cli.engine.layers import gate_of
from jacdistill_cli.engine.pairs import FeaturePair, parse_pairs, resolve_pairs
from jacdistill_cli.errors import UsageError

FEATURE_METHODS = ("none", "attention", "hint")
INTERPOLATION = ("", "linear", "bilinear", "trilinear")   # by the number of spatial dimensions
# A linear hint regressor between a map and a vector grows with both sizes; beyond this it is refused.
MAX_REGRESSOR_PARAMETERS = 1 << 24


# ----------------------------------------------------------------------------------------------
# Hooks


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


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (module paths are the model's own)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
                module = unwrapped(model).get_submodule(path)
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


def as_map(feature: Tensor) -> Tensor:
    """[batch, channels, *spatial] as it is; [batch, units] as [batch, 1, units]."""
    if feature.dim() == 2:
        return feature.unsqueeze(1)
    if feature.dim() < 2:
        raise UsageError(f"features.pairs: a feature of shape {list(feature.shape)} has no per-sample values")
    return feature


# ----------------------------------------------------------------------------------------------
# The terms


def spatial_energy(feature: Tensor, size: tuple[int, ...] | None = None) -> Tensor:
    """Mean over channels of F^2, resized to `size` when given and different.

    feature [batch, channels, *spatial] or [batch, units] -> [batch, *size or spatial].
    """
    energy = as_map(feature).pow(2).mean(dim=1)
    if size is not None and tuple(energy.shape[1:]) != tuple(size):
        if len(size) != energy.dim() - 1 or not 1 <= len(size) <= 3:
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

    def capture(self, student: nn.Module, teacher: nn.Module,
                keep_student: Callable[[Tensor], Tensor] | None = None) -> FeatureCapture:
        """Hooks on both models: features[:n] are the student's, features[n:] the teacher's.
        `keep_student` replaces `student_feature` (for a check's planted mistake)."""
        student_targets = ([(student, p.student_path, keep_student) for p in self.pairs] if keep_student
                           else [capture_student(student, p.student_path) for p in self.pairs])
        return FeatureCapture(student_targets
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
    return settings.batchnorm == "batch" and has_training_batchnorm(student)


def record_batch_statistics(student: nn.Module, inputs: Tensor) -> Any:
    """The statistics a train-mode pass of `student` on `inputs` normalises with (running
    statistics untouched): for `jacobian.batchnorm=batch` outside an objective's own pass."""
    with batchnorm_buffers_kept(student), recorded_batchnorm_statistics(student) as statistics:
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
    gate = gate_of(student)
    second_order = gate.second_order_pass(create_graph) if gate is not None else contextlib.nullcontext()
    with batchnorm_buffers_kept(student), per_sample_batchnorm(student, settings.batchnorm, statistics), \
            second_order:   # attention on a kernel with a double backward (the student's gradients keep the graph)
        student_gradients, _ = feature_input_gradients(
            student, [p.student_path for p in pairs], inputs, lambda output: student_feature(output), locations,
            [spatial_shape(p.teacher_shape) for p in pairs], create_graph)
    distances = [matching_distance(s, t, bool(settings.normalize), bool(settings.squared))
                 for s, t in zip(student_gradients, teacher_gradients)]
    return torch.stack(distances).mean(dim=0)



# ----------------------------------------------------------------------------------------------
# The options of the `features` group: each checks its settings and builds the matching


class FeatureMethod:
    """`features=attention|hint`: the settings of the feature term; `matching` builds it for a pair of models."""

    name = "?"

    def __init__(self, pairs: Any = None, weight: float = 1.0, squared: bool = False):
        self.pairs = parse_pairs(pairs)
        self.weight = number("weight", weight, low=0, allowed="it must be a number >= 0")
        self.squared = boolean("squared", squared)

    def matching(self, teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...],
                 device: torch.device | str = "cpu") -> "FeatureMatching":
        """The feature matching of the resolved pairs (regressors on `device`, in the student's dtype)."""
        pairs = resolve_pairs(self.pairs, teacher, student, input_shape, device)
        dtype = next(student.parameters()).dtype
        return FeatureMatching(self.name, pairs, self.weight, self.squared).to(device=device, dtype=dtype)


class Attention(FeatureMethod):
    name = "attention"


class Hint(FeatureMethod):
    name = "hint"

    def __init__(self, pairs: Any = None, weight: float = 1.0):
        super().__init__(pairs, weight, False)


class NoFeatures:
    """`features=none`: no feature term."""

    name = "none"

    def __init__(self, pairs: Any = None, weight: float = 0.0):
        pass
