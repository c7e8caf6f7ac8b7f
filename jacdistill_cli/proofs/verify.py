"""The proofs behind `jacdistill check`: each Jacobian method against independent references.

For one method, on one small batch, in float64:

- jacobian error: the student's and the teacher's matched input-gradients against
  `torch.func.jacrev`, per sample, of the function the method documents (for BatchNorm in train
  mode: `batch` is the network normalising with this batch's statistics, built here by copying
  the network and setting its running statistics to them; `running` the network in eval mode
  after the train-mode forward pass of the step; `coupled` the whole batch as one function);
- gradient flow: which student parameters receive a non-zero gradient from the term, against
  which ones the term depends on, by central finite differences along a random direction in
  each parameter tensor (a ReLU network's input-gradients do not depend on its biases except
  through BatchNorm statistics, so not every parameter can receive one);
- finite differences: d(term)/d(parameters) along one random direction in all parameters;
- for `noise`, which takes no input-gradient: its term at sigma = 1e-3, 1e-4, 1e-5 (antithetic pairs) against
  its sigma -> 0 limit on the same draws xi, ||(J_S - J_T) xi||^2 per sample (plus D . xi^T H_D xi for
  `form=expansion`), computed independently by forward-mode derivatives (torch.func.jvp) of the per-sample
  functions; over the draws that limit is ||J_S - J_T||_F^2, the penalty of `exact` with normalize=false.
  Both are averaged over the pairs (xi, -xi) on whose segments no ReLU or max pooling of either network
  changes (`kinks`): where one does within sigma of x, the limit does not describe the term at any sigma
  that small, and the check says how many pairs it left out.

Every term is evaluated as training evaluates it, through the objective of training (alpha = 1,
no distillation term), with BatchNorm buffers and random draws restored before each evaluation.
`jacdistill check` hands these checks the networks of `vanishing.proof_networks`: a network whose
input-gradients vanish on the batch (a zero-initialised last layer) is checked at a documented perturbation.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from jacdistill_cli.engine.batchnorm import training_batchnorms
from jacdistill_cli.engine.jacobian import matching_distance, one_hot_vectors
from jacdistill_cli.engine.layers import gate_of
from jacdistill_cli.engine.losses import no_distillation
from jacdistill_cli.engine.methods import JacobianMethod, Matched
from jacdistill_cli.engine.objective import distillation_objective
from jacdistill_cli.proofs import kinks
from jacdistill_cli.proofs.finite_differences import (
    analytic_gradients,
    beyond_rounding,
    directional_check,
    resolution,
)

JACOBIAN_TOLERANCE = 1e-9      # relative to the largest reference entry, float64
# Under trainer.precision: ||ours - reference|| / ||reference|| over the batch, the networks in float32
# under autocast (bf16 keeps 8 bits of mantissa, float16 11), against the float64 reference.
# Attention needs no wider bound: the zoo's ViT students (math attention, LayerNorm, GELU) measured
# 0.004-0.014 in bf16 where the digits CNN measured 0.06-0.20 (docs/concepts/engine.md, layers and attention).
PRECISION_TOLERANCE = {"32": 1e-4, "bf16": 0.25, "16": 0.01}
FD_RELATIVE_TOLERANCE = 1e-5   # central differences in float64 agree to ~1e-9 where smooth
NOISE_SIGMAS = (1e-3, 1e-4, 1e-5)
# Relative, at the smallest sigma, over the pairs on one piece: the error is O(sigma^2) for smooth networks,
# ~1e-11 for ReLU ones, and float64 rounding of the clean and perturbed outputs adds ~1e-16 |D|^2 / sigma^2
# for form=expansion.
NOISE_LIMIT_TOLERANCE = 1e-5
ONE_SIDED = 1e-9


@dataclass
class MethodReport:
    method: str
    settings: dict[str, Any]
    jacobian_error_student: float | None = None   # None for methods without input-gradients
    jacobian_error_teacher: float | None = None
    parameters: list[str] = field(default_factory=list)   # the student's parameter tensors
    receiving: list[str] = field(default_factory=list)    # non-zero gradient from the term
    dependent: list[str] = field(default_factory=list)    # the term changes with them (finite differences)
    parameter_fd_error: float = 0.0      # worst relative disagreement over the parameter tensors
    fd_error: float = 0.0                # along one random direction in all parameters
    fd_analytic: float = 0.0
    fd_numeric: float = 0.0
    precision: str = "32"
    precision_error: float | None = None   # worst of student and teacher, under `precision` (None: not run)
    noise_limit: NoiseLimit | None = None   # noise: its term against its limit
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "settings": self.settings, "passed": self.passed, "failures": self.failures,
            "jacobian_error_student": self.jacobian_error_student,
            "jacobian_error_teacher": self.jacobian_error_teacher,
            "parameters": len(self.parameters), "receiving": self.receiving, "dependent": self.dependent,
            "without_effect": [n for n in self.parameters if n not in self.dependent],
            "parameter_fd_error": self.parameter_fd_error, "fd_error": self.fd_error,
            "fd_analytic": self.fd_analytic, "fd_numeric": self.fd_numeric,
            "precision": self.precision, "precision_error": self.precision_error,
            "precision_tolerance": PRECISION_TOLERANCE[self.precision],
            "noise_limit": {} if self.noise_limit is None else {str(s): e for s, e in self.noise_limit.errors.items()},
            "noise_pairs": None if self.noise_limit is None else self.noise_limit.pairs,
            "noise_pairs_left_out": ({} if self.noise_limit is None
                                     else {str(s): n for s, n in self.noise_limit.left_out.items()}),
            "noise_limit_every_pair": ({} if self.noise_limit is None
                                       else {str(s): e for s, e in self.noise_limit.every_pair.items()}),
        }

    def notes(self) -> list[str]:
        """Lines for below the table (the noise method's limit)."""
        if self.noise_limit is None:
            return []
        limit = self.noise_limit
        errors = ", ".join(f"sigma {sigma:g}: {error:.1e}" for sigma, error in limit.errors.items())
        left_out = ", ".join(str(n) for n in limit.left_out.values())
        return [f"{self.method}: the term against its sigma -> 0 limit ||(J_S - J_T) xi||^2 on the same draws "
                f"(torch.func.jvp, antithetic pairs), relative error {errors} (tolerance {NOISE_LIMIT_TOLERANCE:g} "
                f"at the smallest); pairs left out, where a ReLU or max pooling of either network changes between "
                f"x and x +- sigma xi: {left_out} of {limit.pairs}"]


# ---------------------------------------------------------------------------------------------
# The term as a function of the student's parameters
# ---------------------------------------------------------------------------------------------

class TermFunction:
    """The method's term (loss/jacobian) on a fixed batch, as training computes it, evaluated
    any number of times with the same BatchNorm buffers and the same random draws."""

    def __init__(self, method: JacobianMethod, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                 labels: Tensor, seed: int):
        self.student, self.teacher, self.inputs, self.labels, self.seed = student, teacher, inputs, labels, seed
        self.generator = torch.Generator(device=inputs.device)
        self.objective = distillation_objective(no_distillation, 1.0, 0.0, method, generator=self.generator)
        self.buffers = {name: b.detach().clone() for name, b in student.named_buffers()}

    def restore(self) -> None:
        """BatchNorm buffers as they were before the first evaluation."""
        with torch.no_grad():
            for name, b in self.student.named_buffers():
                b.copy_(self.buffers[name])

    def __call__(self) -> tuple[Tensor, Matched | None]:
        self.restore()
        self.generator.manual_seed(self.seed)
        _, terms, matched = self.objective.evaluate(self.student, self.teacher, self.inputs, self.labels)
        return terms["jacobian"], matched

    def value(self) -> float:
        with torch.enable_grad():
            return float(self()[0].detach())


# ---------------------------------------------------------------------------------------------
# Independent references for the Jacobians
# ---------------------------------------------------------------------------------------------

def per_sample_reference(model: nn.Module, inputs: Tensor, batchnorm: str) -> nn.Module | None:
    """A copy of `model` in eval mode that computes, sample by sample, the function the methods
    document for `batchnorm`; None for `coupled` with train-mode BatchNorm (not per-sample)."""
    norms = training_batchnorms(model)
    reference = copy.deepcopy(model)
    if not norms:
        return reference
    if batchnorm == "coupled":
        return None
    copies = training_batchnorms(reference)
    if batchnorm == "batch":
        seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}

        def keep(module: nn.Module, args: tuple) -> None:
            x = args[0]
            dims = [0, *range(2, x.dim())]
            seen[module] = (x.mean(dim=dims), x.var(dim=dims, unbiased=False))

        handles = [m.register_forward_pre_hook(keep) for m in copies]
        with torch.no_grad():
            reference(inputs)
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for m in copies:
                m.running_mean.copy_(seen[m][0])
                m.running_var.copy_(seen[m][1])
    # running: the running statistics as they were before the step's train-mode pass
    return reference.eval()


def reference_gradients(model: nn.Module, inputs: Tensor, vectors: Tensor, batchnorm: str) -> Tensor:
    """sum_c vectors[k, b, c] d model(x)[b, c] / d x by torch.func.jacrev, in the dtype of inputs.

    inputs [batch, *input], vectors [K, batch, classes] -> [K, batch, *input]. Per sample where
    the documented function is per-sample; for `coupled` BatchNorm the Jacobian of the whole
    batch, so that sample b's row mixes in the other samples' outputs as training does.
    """
    reference = per_sample_reference(model, inputs, batchnorm)
    if reference is not None:
        rows = [torch.func.jacrev(lambda x: reference(x.unsqueeze(0)).squeeze(0))(inputs[b])
                for b in range(inputs.shape[0])]
        jacobian = torch.stack(rows)   # [batch, classes, *input]
        return torch.einsum("kbc,bc...->kb...", vectors, jacobian)
    coupled = copy.deepcopy(model)
    for m in training_batchnorms(coupled):
        # Batch statistics without updating running ones, which torch.func would refuse.
        m.track_running_stats = False
        m.running_mean = m.running_var = m.num_batches_tracked = None
    jacobian = torch.func.jacrev(coupled)(inputs)   # [batch, classes, batch, *input]
    return torch.einsum("kbc,bcn...->kn...", vectors, jacobian)


def directional_derivatives(function: Callable[[Tensor], Tensor], inputs: Tensor,
                            direction: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(f(x), f'(x) v, f''(x)[v, v]) by nested forward-mode derivatives; inputs and direction [batch, *input]."""
    def first(x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(function, (x,), (direction,))

    (value, slope), (_, curvature) = torch.func.jvp(first, (inputs,), (direction,))
    return value, slope, curvature


def second_order(model: nn.Module):
    """The model's gate's second-order pass (attention on kernels with every derivative), if it has a gate."""
    gate = gate_of(model)
    return gate.second_order_pass() if gate is not None else contextlib.nullcontext()


def noise_limit_errors(method: Any, student: nn.Module, teacher: nn.Module, inputs: Tensor, labels: Tensor,
                       seed: int) -> NoiseLimit:
    """For sigma in NOISE_SIGMAS: the noise term with antithetic pairs (the method's samples and form), each
    copy and sample as training computes it, against its limit on the same draws xi: ||D'(x; xi)||^2
    (+ D(x) . D''(x)[xi, xi] for form=expansion), D = S - T the per-sample functions of the step (train-mode
    BatchNorm with the batch's statistics), D'(x; xi) the one-sided derivative along xi. Both are averaged
    over the pairs (xi, -xi) of each sample on whose segments x -> x + sigma xi and x -> x - sigma xi both
    networks stay on one piece (`kinks`): the limit describes the term on no other pair, however small
    sigma, where a ReLU or a max pooling of the sample changes within sigma of x."""
    student_reference = per_sample_reference(student, inputs, "batch")
    teacher_reference = per_sample_reference(teacher, inputs, "batch")

    def difference(x: Tensor) -> Tensor:
        return student_reference(x) - teacher_reference(x)

    result = NoiseLimit(pairs=method.samples * inputs.shape[0])
    at_sigma = copy.copy(method)
    at_sigma.antithetic = True
    draws = at_sigma.draws(inputs, torch.Generator(device=inputs.device).manual_seed(seed))   # the same for all sigma
    pieces = Pieces([student_reference, teacher_reference], inputs, draws)
    for sigma in NOISE_SIGMAS:
        at_sigma.sigma = sigma
        limits = []
        for xi in draws:
            # One-sided: taken at x + 1e-9 xi, where ties of max pooling (a constant region of an image) are
            # broken as the perturbation breaks them; for smooth networks the shift changes nothing visible.
            # Attention on its math kernel (forward-mode derivatives of the fused kernels are not implemented).
            with second_order(student_reference), second_order(teacher_reference):
                value, slope, curvature = directional_derivatives(difference, inputs + ONE_SIDED * xi, xi)
            limit = slope.pow(2).sum(-1)
            if method.form == "expansion":
                limit = limit + (value * curvature).sum(-1)
            limits.append(limit.detach())
        kept = pieces.kept(sigma)                                                   # [copies, batch]
        result.left_out[sigma] = result.pairs - int(kept.sum()) // 2
        terms, limits = per_copy_terms(at_sigma, student, teacher, inputs, labels, seed), torch.stack(limits)
        result.every_pair[sigma] = mean_error(terms, limits)
        result.errors[sigma] = mean_error(terms[kept], limits[kept]) if bool(kept.any()) else float("inf")
    return result


def mean_error(terms: Tensor, limits: Tensor) -> float:
    term, reference = float(terms.mean()), float(limits.mean())
    return abs(term - reference) / max(abs(reference), 1e-300)


@dataclass
class NoiseLimit:
    """The noise term against its limit: {sigma: relative error}, {sigma: pairs left out} of `pairs`, and
    {sigma: relative error over every pair} (what the kinks do to it)."""
    pairs: int
    errors: dict[float, float] = field(default_factory=dict)
    every_pair: dict[float, float] = field(default_factory=dict)
    left_out: dict[float, int] = field(default_factory=dict)


class Pieces:
    """Which perturbed copies x + sigma xi lie on the piece of x + ONE_SIDED xi (where the one-sided limit is
    taken) for every network, sample by sample (one sample per forward pass, so that no op's choice has to
    be assigned to a sample); pairs xi, -xi are kept or left out together."""

    def __init__(self, networks: list[nn.Module], inputs: Tensor, draws: Tensor):
        # A network without choices (GELU, attention, no max pooling) is one smooth piece.
        self.networks = [n for n in networks if kinks.choices(n, inputs[:1])]
        self.inputs, self.draws = inputs, draws
        self.start = [[self.choices(inputs[b] + ONE_SIDED * xi[b]) for b in range(inputs.shape[0])] for xi in draws]

    def choices(self, x: Tensor) -> list[list[Tensor]]:
        return [kinks.choices(network, x.unsqueeze(0)) for network in self.networks]

    def kept(self, sigma: float) -> Tensor:
        copies, batch = self.draws.shape[:2]
        same = torch.ones(copies, batch, dtype=torch.bool)
        if self.networks:
            for c, b in ((c, b) for c in range(copies) for b in range(batch)):
                at = self.choices(self.inputs[b] + sigma * self.draws[c, b])
                same[c, b] = all(kinks.same_piece(x, y) for x, y in zip(self.start[c][b], at))
        pairs = same[:copies // 2] & same[copies // 2:]
        return torch.cat([pairs, pairs]).to(self.inputs.device)


def per_copy_terms(method: Any, student: nn.Module, teacher: nn.Module, inputs: Tensor, labels: Tensor,
                   seed: int) -> Tensor:
    """The noise term of each copy and sample, [copies, batch], as training computes it: the objective of
    training calls the method's `term`, here once per copy (the per-sample term of one copy is that copy's
    value), and loss/jacobian is their mean."""
    recorded: list[Tensor] = []
    whole = method.term

    def term(clean: Tensor, perturbed: Tensor) -> Tensor:
        per_copy = torch.stack([whole(clean, perturbed[c:c + 1]) for c in range(perturbed.shape[0])])
        recorded.append(per_copy.detach())
        return per_copy.mean(0)

    method = copy.copy(method)
    method.term = term
    TermFunction(method, student, teacher, inputs, labels, seed).value()
    return recorded[-1]


def relative_error(value: Tensor, reference: Tensor) -> float:
    reference = reference.detach()
    scale = reference.abs().max().clamp_min(1e-300)
    return float((value.detach() - reference).abs().max() / scale)


# ---------------------------------------------------------------------------------------------
# One method
# ---------------------------------------------------------------------------------------------

def l2_error(value: Tensor, reference: Tensor) -> float:
    reference = reference.detach().double()
    return float((value.detach().double() - reference).norm() / reference.norm().clamp_min(1e-300))


def precision_error(method: JacobianMethod, student: nn.Module, teacher: nn.Module, inputs: Tensor, labels: Tensor,
                    seed: int, precision: str) -> float | None:
    """The method's input-gradients as training computes them under `precision` (float32 copies of the
    networks, autocast; float16 with the loss scale's recipe) against the float64 reference: the worse
    relative l2 error of student and teacher. None for a method without input-gradients."""
    from jacdistill_cli.loop.precision import Precision

    if not method.uses_gradients:
        return None
    student32, teacher32 = copy.deepcopy(student).float(), copy.deepcopy(teacher).float()
    objective = distillation_objective(no_distillation, 1.0, 0.0, method,
                                       generator=torch.Generator(device=inputs.device).manual_seed(seed))
    with Precision(precision, inputs.device.type).autocast():
        _, _, matched = objective.evaluate(student32, teacher32, inputs.float(), labels,
                                           gradient_scale=1024.0 if precision == "16" else 1.0)
    vectors, teacher_vectors = (v.detach().double() for v in directions(matched))
    student64, teacher64, inputs64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double(), inputs.double()
    return max(l2_error(matched.student, reference_gradients(student64, inputs64, vectors, method.batchnorm)),
               l2_error(matched.teacher, reference_gradients(teacher64, inputs64, teacher_vectors, method.batchnorm)))


def directions(matched: Matched) -> tuple[Tensor, Tensor]:
    """(the student's, the teacher's) output directions: the same for every method but `loss`, whose
    directions are each network's own p - e_y."""
    teacher = matched.vectors if matched.teacher_vectors is None else matched.teacher_vectors
    return matched.vectors, teacher


@contextlib.contextmanager
def torch_notices_off():
    """torch's own notices on paths the references take, not about the user's networks: forward-mode AD loads
    its decompositions with the deprecated torch.jit.script, and vmap (jacrev) over a fused attention's backward
    has no batching rule (the reference is slower, not wrong)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                                "the batching rule", category=UserWarning)
        yield


@torch_notices_off()
def check_method(settings: Any, student: nn.Module, teacher: nn.Module, inputs: Tensor, labels: Tensor,
                 seed: int, precision: str = "32") -> MethodReport:
    """All checks of one method (its `jacobian` node) on float64 copies of the networks; with a
    `precision` other than 32, also its input-gradients under that precision (`precision_error`)."""
    from jacdistill_cli.config import registry

    method = registry.build("jacobian", settings)
    error_at_precision = (precision_error(method, student, teacher, inputs, labels, seed, precision)
                          if precision != "32" else None)
    student, teacher, inputs = copy.deepcopy(student).double(), copy.deepcopy(teacher).double(), inputs.double()
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    report = new_report(settings, [n for n, _ in named], precision, error_at_precision)
    term = TermFunction(method, student, teacher, inputs, labels, seed)
    value, matched = term()
    # Before the buffers are restored: BatchNorm's backward checks they were not modified.
    gradients = analytic_gradients(value, [p for _, p in named])
    term.restore()
    if matched is not None:
        check_jacobians(report, matched, student, teacher, inputs, method.batchnorm)
    if method.perturbs_inputs:
        check_noise_limit(report, method, student, teacher, inputs, labels, seed)
    check_parameters(report, term, named, gradients, torch.Generator().manual_seed(seed), abs(float(value.detach())))
    return report


def new_report(settings: Any, names: list[str], precision: str, error_at_precision: float | None) -> MethodReport:
    """The method's report before its checks: its label, settings and parameters, and its error under
    `precision` against that precision's tolerance."""
    from omegaconf import OmegaConf

    from jacdistill_cli.config import registry

    plain = OmegaConf.to_container(settings, resolve=True) if OmegaConf.is_config(settings) else dict(settings)
    report = MethodReport(registry.label("jacobian", settings), {k: v for k, v in plain.items() if k != "_target_"},
                          parameters=names, precision=precision, precision_error=error_at_precision)
    if error_at_precision is not None and error_at_precision > PRECISION_TOLERANCE[precision]:
        report.failures.append(f"under precision {precision} the input-gradients differ from the float64 reference "
                               f"by {error_at_precision:.1e} (relative l2; tolerance {PRECISION_TOLERANCE[precision]})")
    return report


def check_jacobians(report: MethodReport, matched: Matched, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                    batchnorm: str) -> None:
    """The matched input-gradients of both networks against torch.func.jacrev, and the teacher's as constants."""
    student_vectors, teacher_vectors = directions(matched)
    expected_student = reference_gradients(student, inputs, student_vectors.detach(), batchnorm)
    expected_teacher = reference_gradients(teacher, inputs, teacher_vectors.detach(), batchnorm)
    report.jacobian_error_student = relative_error(matched.student, expected_student)
    report.jacobian_error_teacher = relative_error(matched.teacher, expected_teacher)
    for network, error in (("student", report.jacobian_error_student), ("teacher", report.jacobian_error_teacher)):
        if error > JACOBIAN_TOLERANCE:
            report.failures.append(f"{network} Jacobian differs from torch.func.jacrev by {error:.1e} (relative)")
    if matched.teacher.requires_grad:
        report.failures.append("the teacher's gradients are not constants (they carry a graph)")


def check_noise_limit(report: MethodReport, method: Any, student: nn.Module, teacher: nn.Module, inputs: Tensor,
                      labels: Tensor, seed: int) -> None:
    """The noise term against its sigma -> 0 limit (`noise_limit_errors`), at the smallest sigma."""
    report.noise_limit = noise_limit_errors(method, student, teacher, inputs, labels, seed)
    smallest = NOISE_SIGMAS[-1]
    report.jacobian_error_student = report.noise_limit.errors[smallest]
    if report.noise_limit.left_out[smallest] == report.noise_limit.pairs:
        report.failures.append(f"at sigma {smallest:g} every pair crosses a ReLU's or max pooling's "
                               "kink: no pair is left to compare with the limit")
    elif report.jacobian_error_student > NOISE_LIMIT_TOLERANCE:
        report.failures.append(f"the noise term at sigma {smallest:g} differs from its limit "
                               f"||(J_S - J_T) xi||^2 by {report.jacobian_error_student:.1e} (relative)")


def check_parameters(report: MethodReport, term: TermFunction, named: list[tuple[str, nn.Parameter]],
                     gradients: list[Tensor], generator: torch.Generator, scale: float) -> None:
    """Which parameters receive a gradient and which the term depends on; autograd's derivative against central
    differences along a random direction in each parameter tensor, then in all of them at once."""
    report.receiving = [name for (name, _), g in zip(named, gradients) if bool(g.ne(0).any())]
    for (name, p), g in zip(named, gradients):
        analytic, numeric, error = directional_check(term.value, [p], [g], generator, scale)
        if abs(numeric) > resolution(scale):
            report.dependent.append(name)
        report.parameter_fd_error = max(report.parameter_fd_error, error)
        # Both zero to the check's resolution: float64 rounding of a term without the parameter (noise's last
        # bias, which cancels in D(x + sigma xi) - D(x)) is no disagreement.
        resolved = max(abs(analytic), abs(numeric)) > resolution(scale)
        if error > FD_RELATIVE_TOLERANCE and resolved and beyond_rounding(analytic, numeric, scale):
            report.failures.append(f"d(term)/d({name}) is {analytic:.6g} by autograd but {numeric:.6g} by "
                                   "finite differences")
    missing = [n for n in report.dependent if n not in report.receiving]
    if missing:
        report.failures.append(f"{len(missing)} parameter(s) the term depends on receive no gradient: "
                               f"{', '.join(missing)}")
    if not report.dependent:
        report.failures.append("the term depends on no student parameter")
    report.fd_analytic, report.fd_numeric, report.fd_error = directional_check(
        term.value, [p for _, p in named], gradients, generator, scale)
    if report.fd_error > FD_RELATIVE_TOLERANCE and beyond_rounding(report.fd_analytic, report.fd_numeric, scale):
        report.failures.append(f"along a random direction, autograd gives {report.fd_analytic:.6g} and finite "
                               f"differences {report.fd_numeric:.6g}")


def retain_graph_mistake(student: nn.Module, teacher: nn.Module, inputs: Tensor, normalize: bool = True,
                         squared: bool = True) -> tuple[int, int]:
    """The common mistake: the student's input-gradient taken with retain_graph=True (no
    create_graph), then forced to require grad. Returns (parameters receiving a non-zero
    gradient from the resulting term, parameters)."""
    student = copy.deepcopy(student).double()
    teacher = copy.deepcopy(teacher).double()
    x_student = inputs.double().detach().requires_grad_(True)
    x_teacher = inputs.double().detach().requires_grad_(True)
    teacher_logits = teacher(x_teacher)
    student_logits = student(x_student)
    vectors = one_hot_vectors(teacher_logits.detach().argmax(dim=1), teacher_logits)[0]
    (teacher_grads,) = torch.autograd.grad(teacher_logits, x_teacher, grad_outputs=vectors)
    (student_grads,) = torch.autograd.grad(student_logits, x_student, grad_outputs=vectors, retain_graph=True)
    student_grads.requires_grad_(True)   # what the question does to make backward() run
    term = matching_distance(student_grads, teacher_grads, normalize, squared).mean()
    params = [p for p in student.parameters() if p.requires_grad]
    gradients = analytic_gradients(term, params)
    return sum(bool(g.ne(0).any()) for g in gradients), len(params)


def method_settings(name: str, configured: Any, load: Callable[[str], Any]) -> Any:
    """The configured `jacobian` node when it is this method, else the method's shipped defaults."""
    from jacdistill_cli.config.registry import label

    if configured is not None and label("jacobian", configured) == name:
        return configured
    return load(name)


def checkable_methods() -> list[str]:
    """The shipped methods with a term to check (all but `none`), in the order the docs give them (docs/concepts/jacobian-methods.md)."""
    from hydra.utils import get_object

    from jacdistill_cli.config import registry

    order = ["top1", "target", "loss", "exact", "projected", "noise"]
    names = [name for name, target in registry.shipped_options("jacobian").items()
             if get_object(target).uses_gradients or get_object(target).perturbs_inputs]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))
