"""`jacdistill check` for features: does the feature term train the student, and is its gradient right?"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from jacdistill_cli.config.registry import build, label
from jacdistill_cli.engine import features as F
from jacdistill_cli.engine.features import FeatureMatching, feature_jacobian_term, split_features
from jacdistill_cli.engine.pairs import probe_calls
from jacdistill_cli.errors import UsageError
from jacdistill_cli.proofs.finite_differences import (
    FD_ROUNDING,
    FD_STEP,
    analytic_gradients,
    central_difference,
    random_directions,
)


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
        # Central differences resolve a derivative to FD_ROUNDING * max(1, |term|) (float64 rounding).
        difference = abs(self.directional_derivative - self.finite_difference)
        scale = max(abs(self.directional_derivative), abs(self.finite_difference))
        return difference <= self.tolerance * scale + FD_ROUNDING * max(1.0, abs(self.term_value))

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


def _feature_term(matching: FeatureMatching, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                  keep_student=None) -> Tensor:
    """The feature term of one pass of each model; `keep_student` replaces what the student's hooks keep
    (the check's planted mistake)."""
    count = len(matching.pairs)
    with matching.capture(student, teacher, keep_student) as capture:
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
    student = copy.deepcopy(student).double().train()
    teacher = copy.deepcopy(teacher).double().eval()
    matching = copy.deepcopy(matching).double()
    inputs = inputs.detach().double()
    input_shape = tuple(inputs.shape[1:])
    with torch.no_grad():
        calls = {c.path: c for c in probe_calls(student, input_shape, inputs.device, inputs.dtype)}
    deepest = max((p.student_path for p in matching.pairs), key=lambda path: calls[path].ended)
    expected = parameters_up_to(student, deepest, input_shape, inputs.device, inputs.dtype)
    named = dict(student.named_parameters())
    regressor = list(matching.parameters())

    def term(keep_student=None) -> Tensor:
        with torch.random.fork_rng(devices=[inputs.device] if inputs.is_cuda else []):
            torch.manual_seed(seed)  # the same dropout masks for every evaluation
            return _feature_term(matching, student, teacher, inputs, keep_student)

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
    direction = random_directions(all_params, torch.Generator().manual_seed(seed))
    grads = analytic_gradients(value, all_params)
    analytic = sum(((g * d).sum() for g, d in zip(grads, direction)), torch.zeros((), dtype=torch.float64))
    with torch.no_grad():
        finite = central_difference(lambda: term().item(), all_params, direction, FD_STEP)

    # The mistake: the student's hook detaches its feature.
    detached = term(F.teacher_feature)
    detached_trained = sum(trained_by(detached, list(named.values())))

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


@dataclass
class NotChecked:
    """A feature method `check` cannot try on this pair without pairs of the user's."""

    method: str
    reason: str
    passed: bool = True

    def lines(self) -> list[str]:
        return [f"features={self.method}: not checked: {self.reason}"]

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "checked": False, "reason": self.reason}


def feature_checks(configured: Any, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                   jacobian_settings: Any, seed: int = 0) -> list[FeatureGradientCheck]:
    """`jacdistill check` for features: attention and hint, the configured one (`configured`: the `features`
    node, or None) as configured (its pairs, weight, ...) and the other with its shipped defaults; each also
    checks the feature Jacobian term with `jacobian_settings` (normalize, squared, batchnorm).
    inputs [batch, *input]."""
    reports = []
    for method in ("attention", "hint"):
        node = configured if configured is not None and label("features", configured) == method \
            else shipped_features(method)
        try:
            matching = build("features", node).matching(teacher, student, tuple(inputs.shape[1:]), inputs.device)
        except UsageError as err:
            if node.get("pairs") is not None:
                raise   # pairs the user gave that do not fit: their error
            reports.append(NotChecked(method, str(err)))   # no default pairs for this teacher and student
            continue
        reports.append(check_feature_gradients(matching, student, teacher, inputs, jacobian_settings, seed=seed))
    return reports
