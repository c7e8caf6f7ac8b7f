"""The Jacobian-matching methods, one class each, chosen by the `_target_` of conf/jacobian/<name>.yaml.

Every gradient method is one choice of output directions: for each sample b it picks K vectors
v[k, b] in the output space and compares the student's and the teacher's input-gradients along
them, g[k, b] = v[k, b]^T J[b] (J[b] = d logits[b] / d inputs[b], classes x input):

    top1       v = e_{argmax teacher(x_b)}      K = 1
    target     v = e_{y_b}                      K = 1
    loss       v = softmax(own logits_b) - e_{y_b}, each network its own (d CE / dx)   K = 1
    exact      v = e_1 .. e_C                   K = C, the K rows form one vector: the whole Jacobian
    projected  v random, E[v v^T] = I           K = num_projections, K separate estimates averaged

The student's gradients keep `create_graph` so the term trains the student; the teacher's are
computed without a second-order graph and are constants. `noise` needs no input-gradients at
all: it compares the networks on Gaussian-perturbed copies of the batch (see `Noise`).

A method is a class whose constructor takes the keyword settings of its config node
(conf/jacobian/<name>.yaml, `_target_` naming the class) and checks them; a new method subclasses
`GradientMethod` and implements `vectors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from jacdistill_cli.config.checks import boolean, number, one_of, whole
from jacdistill_cli.engine.batchnorm import BATCHNORM_MODES
from jacdistill_cli.engine.jacobian import (
    EXACT_STRATEGIES,
    basis_vectors,
    func_jacobian,
    matching_distance,
    one_hot_vectors,
    vector_jacobian_products,
)


@dataclass
class Passes:
    """What a method needs: both networks' logits with the inputs they were computed from."""

    student_logits: Tensor   # [batch, classes], from student_inputs by a per-sample forward pass
    student_inputs: Tensor   # [batch, *input], a leaf with requires_grad
    teacher_logits: Tensor   # [batch, classes], from teacher_inputs
    teacher_inputs: Tensor   # [batch, *input], a leaf with requires_grad
    labels: Tensor           # [batch]
    create_graph: bool       # False when the term is only logged (alpha = 0)
    generator: torch.Generator | None = None
    student_strategy: str = "loop"   # loop | batched | func, resolved from `auto` per network
    teacher_strategy: str = "loop"
    student_forward: Callable[[Tensor], Tensor] | None = None   # the per-sample function, for `func`
    teacher_forward: Callable[[Tensor], Tensor] | None = None
    scale: float = 1.0   # float16: input-gradients are taken of scale * logits and divided by it (AMP's recipe)
    teacher_gradients: Tensor | None = None   # [K, batch, *input] computed once and reused (teacher.reuse_outputs)


@dataclass
class Matched:
    """The gradients a method compares, and the directions they were taken along."""

    student: Tensor   # [K, batch, *input], differentiable when create_graph
    teacher: Tensor   # [K, batch, *input], constant
    vectors: Tensor   # [K, batch, classes]: student[k, b] = vectors[k, b] @ J_student[b]
    joint: bool       # the K gradients of a sample form one vector (exact), else K estimates averaged
    teacher_vectors: Tensor | None = None   # the teacher's own directions where they differ (loss), else vectors


def matching_term(matched: Matched, normalize: bool, squared: bool) -> Tensor:
    """The per-sample term [batch] from the matched gradients (see `jacobian.matching_distance`)."""
    k, batch = matched.student.shape[:2]
    if matched.joint:
        return matching_distance(matched.student.movedim(0, 1), matched.teacher.movedim(0, 1), normalize, squared)
    distance = matching_distance(matched.student.flatten(0, 1), matched.teacher.flatten(0, 1), normalize, squared)
    return distance.view(k, batch).mean(dim=0)


def _along(logits: Tensor, inputs: Tensor, vectors: Tensor, create_graph: bool, strategy: str,
           forward: Callable[[Tensor], Tensor] | None, scale: float = 1.0) -> Tensor:
    """vectors [K, batch, classes] -> gradients [K, batch, *input] of one network. With `scale`, the
    backward pass starts from scale * vectors (float16 keeps small gradients) and the result is
    divided by it."""
    if strategy == "func":
        if forward is None:
            raise ValueError("strategy 'func' needs the network's forward function")
        jacobian = func_jacobian(forward, inputs)   # [batch, classes, *input]
        grads = torch.einsum("kbc,bc...->kb...", vectors, jacobian)
        return grads if create_graph else grads.detach()
    if scale != 1.0:
        return vector_jacobian_products(logits, inputs, vectors * scale, create_graph, strategy) / scale
    return vector_jacobian_products(logits, inputs, vectors, create_graph, strategy)


def teacher_along(p: Passes, vectors: Tensor) -> Tensor:
    """The teacher's gradients along `vectors` [K, batch, classes]: constants [K, batch, *input]."""
    return _along(p.teacher_logits, p.teacher_inputs, vectors, False, p.teacher_strategy, p.teacher_forward, p.scale)


def matched_along(p: Passes, vectors: Tensor, joint: bool) -> Matched:
    """Both networks' gradients along the same vectors [K, batch, classes]."""
    student = _along(p.student_logits, p.student_inputs, vectors, p.create_graph, p.student_strategy,
                     p.student_forward, p.scale)
    teacher = p.teacher_gradients if p.teacher_gradients is not None else teacher_along(p, vectors)
    return Matched(student, teacher, vectors, joint)


class JacobianMethod:
    """What every method has: whether it takes input-gradients, and whether it perturbs the inputs."""

    name: ClassVar[str] = "?"
    uses_gradients: ClassVar[bool] = False
    perturbs_inputs: ClassVar[bool] = False
    # The teacher's side is a function of the sample alone (no random draws) and small enough to keep
    # for every sample of the training split: teacher.reuse_outputs may compute it once.
    reusable_teacher: ClassVar[bool] = True
    of: str = "logits"
    batchnorm: str = "batch"
    strategy: str = "auto"


class NoJacobian(JacobianMethod):
    """No Jacobian term (loss/jacobian is logged as 0)."""

    name = "none"


class Noise(JacobianMethod):
    """The Jacobian penalty by Gaussian perturbations of the inputs (the noise equivalence of
    Srinivas & Fleuret 2018), with no input-gradient and no second-order graph.

    With D(x) = S(x) - T(x) the student's logits minus the teacher's and xi ~ N(0, I) over the input,

        E_xi ||D(x + sigma xi)||^2 = ||D(x)||^2 + sigma^2 ||J_D(x)||_F^2
                                     + sigma^2 sum_k D_k(x) tr(Hessian of D_k at x) + O(sigma^4),

    where the curvature sum vanishes where D(x) = 0 or the networks are piecewise linear (ReLU, max
    pooling). Distillation on noisy inputs is thus distillation plus sigma^2 times the unnormalised
    full-Jacobian penalty of `exact` (`normalize=false squared=true`). The term, per sample, is

        difference (default): mean over the copies of ||D(x + sigma xi) - D(x)||^2 / sigma^2
        expansion:            mean over the copies of (||D(x + sigma xi)||^2 - ||D(x)||^2) / sigma^2

    Both approach ||J_D(x) xi||^2 on each draw as sigma shrinks, and ||J_D(x)||_F^2 over the draws:
    `difference` for every network (error O(sigma^2) with antithetic pairs), `expansion` (the left side
    of the expansion minus its clean part) where the curvature sum vanishes. The two differ by
    2 D . (D(x + sigma xi) - D(x)) / sigma^2, whose mean is the curvature sum: `expansion` rewards a
    student that makes the clean error large where that sum is negative, and in training it does so
    (`difference` is never negative). `alpha` weighs the term as it weighs the other methods: the step
    is (1 - alpha) * distill(clean batch) + (alpha / sigma^2) * perturbed squared error (less its
    clean part): a perturbed term of weight alpha / sigma^2, so that the Jacobian penalty weighs alpha.

    With `antithetic` the copies come in pairs xi, -xi: the odd orders in sigma cancel pairwise (for
    `expansion`, the first-order part 2 sigma D . J_D xi, whose variance grows as 1 / sigma^2 without
    them). `sigma` is in units of the normalised input (each channel has standard deviation 1 after
    the dataset's mean/std normalisation). In train-mode BatchNorm the perturbed copies are normalised
    with the clean batch's statistics (the function `exact` takes with `batchnorm=batch`). Cost: `copies`
    extra forward passes of both networks (2 * samples with `antithetic`) and the student's backward
    pass through them.
    """

    name = "noise"
    perturbs_inputs = True
    reusable_teacher = False

    def __init__(self, sigma: float = 0.1, samples: int = 4, antithetic: bool = True, form: str = "difference"):
        self.sigma = number("sigma", sigma, low=0, low_open=True, allowed="it must be a number > 0")
        self.samples = whole("samples", samples, low=1, allowed="it must be an integer >= 1")
        self.antithetic = boolean("antithetic", antithetic)
        self.form = one_of("form", form, ("difference", "expansion"))

    @property
    def copies(self) -> int:
        return 2 * self.samples if self.antithetic else self.samples

    def draws(self, inputs: Tensor, generator: torch.Generator | None) -> Tensor:
        """The directions xi of the perturbed copies, [copies, batch, *input] (xi then -xi when antithetic)."""
        xi = torch.randn((self.samples, *inputs.shape), generator=generator, device=inputs.device, dtype=inputs.dtype)
        return torch.cat([xi, -xi]) if self.antithetic else xi

    def term(self, clean: Tensor, perturbed: Tensor) -> Tensor:
        """clean D(x) [batch, classes] and perturbed D(x + sigma xi) [copies, batch, classes] -> the
        per-sample term [batch] (see the class). `expansion` is computed as 2 D . d + ||d||^2 with
        d = D(x + sigma xi) - D(x), which keeps the small difference."""
        change = perturbed - clean
        squared = change.pow(2).sum(-1)
        if self.form == "expansion":
            squared = squared + 2 * (clean * change).sum(-1)
        return squared.mean(0) / self.sigma ** 2


class GradientMethod(JacobianMethod):
    """A method that compares input-gradients along output directions (see the module's docstring)."""

    uses_gradients = True

    def __init__(self, normalize: bool = True, squared: bool = True, batchnorm: str = "batch",
                 strategy: str = "auto", of: str = "logits"):
        self.normalize = boolean("normalize", normalize)
        self.squared = boolean("squared", squared)
        self.batchnorm = one_of("batchnorm", batchnorm, BATCHNORM_MODES)
        self.strategy = one_of("strategy", strategy, EXACT_STRATEGIES)
        self.of = one_of("of", of, ("logits", "features"))

    def vectors(self, p: Passes) -> tuple[Tensor, bool]:
        """(directions [K, batch, classes], joint: whether the K gradients of a sample form one vector)."""
        raise NotImplementedError

    def gradients(self, p: Passes) -> Matched:
        vectors, joint = self.vectors(p)
        return matched_along(p, vectors, joint)

    def term(self, p: Passes) -> tuple[Tensor, Matched]:
        """(per-sample term [batch], the matched gradients)."""
        matched = self.gradients(p)
        return matching_term(matched, self.normalize, self.squared), matched


class Top1(GradientMethod):
    """Gradient of the teacher's top-1 class logit, for both networks (Srinivas & Fleuret 2018)."""

    name = "top1"

    def vectors(self, p: Passes) -> tuple[Tensor, bool]:
        return one_hot_vectors(p.teacher_logits.detach().argmax(dim=1), p.teacher_logits), True


class Target(GradientMethod):
    """Gradient of the true class logit, for both networks."""

    name = "target"

    def vectors(self, p: Passes) -> tuple[Tensor, bool]:
        return one_hot_vectors(p.labels, p.teacher_logits), True


class Exact(GradientMethod):
    """The full per-sample Jacobian [classes, *input] of both networks."""

    name = "exact"
    reusable_teacher = False   # classes x input per sample

    def vectors(self, p: Passes) -> tuple[Tensor, bool]:
        return basis_vectors(p.teacher_logits), True


def projection_vectors(shape: tuple[int, ...], distribution: str, generator: torch.Generator | None,
                       device: torch.device, dtype: torch.dtype) -> Tensor:
    """Random vectors with E[v v^T] = I: Rademacher (+-1) or standard Gaussian, shape `shape`."""
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    signs = torch.randint(0, 2, shape, generator=generator, device=device)
    return (signs * 2 - 1).to(dtype)


class Projected(GradientMethod):
    """v^T J for `num_projections` random v per sample (Sobolev training); the term averages the
    K distances, so unnormalized and squared it is an unbiased estimate of ||J_S - J_T||_F^2."""

    name = "projected"
    reusable_teacher = False   # random directions, drawn anew each step

    def __init__(self, num_projections: int = 1, distribution: str = "rademacher", **common):
        super().__init__(**common)
        self.num_projections = whole("num_projections", num_projections, low=1,
                                     allowed="it must be an integer >= 1")
        self.distribution = one_of("distribution", distribution, ("rademacher", "gaussian"))

    def vectors(self, p: Passes) -> tuple[Tensor, bool]:
        batch, classes = p.teacher_logits.shape
        return projection_vectors((self.num_projections, batch, classes), self.distribution, p.generator,
                                  p.teacher_logits.device, p.teacher_logits.dtype), False


class LossGradient(GradientMethod):
    """Each network's input-gradient of its own cross-entropy, d CE(f(x), y) / dx = (p - e_y)^T J with p
    the network's own softmax (the quantity IGAM and KDIGA align): the student's direction depends on its
    parameters, and the term is differentiated through it as well."""

    name = "loss"

    @staticmethod
    def directions(logits: Tensor, labels: Tensor) -> Tensor:
        """softmax(logits) - one_hot(labels): [1, batch, classes], differentiable in logits."""
        return (torch.softmax(logits, dim=1) - one_hot_vectors(labels, logits)[0]).unsqueeze(0)

    def vectors(self, p: Passes) -> tuple[Tensor, bool]:
        # The teacher's directions (what Objective.teacher_outputs asks for): constants.
        return self.directions(p.teacher_logits.detach(), p.labels), True

    def gradients(self, p: Passes) -> Matched:
        student_vectors = self.directions(p.student_logits, p.labels)
        if not p.create_graph:
            student_vectors = student_vectors.detach()
        student = _along(p.student_logits, p.student_inputs, student_vectors, p.create_graph, p.student_strategy,
                         p.student_forward, p.scale)
        teacher_vectors, _ = self.vectors(p)
        teacher = p.teacher_gradients if p.teacher_gradients is not None else teacher_along(p, teacher_vectors)
        return Matched(student, teacher, student_vectors, True, teacher_vectors)
