"""Each Jacobian method, through the objective that training uses, against independent references:
torch.func.jacrev per sample, torch.autograd.gradcheck, the Sobolev estimator's expectation, the noise
identity; and the failure modes of the question (NaN at a zero norm, a term that trains nothing)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import objective as Objective
from omegaconf import OmegaConf
from torch import nn

from jacdistill_cli.errors import UsageError
from jacdistill_cli.proofs.verify import retain_graph_mistake

GRADIENT_METHODS = ["top1", "target", "exact", "projected"]


pytestmark = pytest.mark.usefixtures("float64_one_thread")


def settings(name: str, **overrides):
    base = {"name": name, "normalize": True, "squared": True, "batchnorm": "batch", "strategy": "auto",
            "num_projections": 3, "distribution": "rademacher", "sigma": 0.1, "samples": 1, "antithetic": True, "form": "difference"}
    return OmegaConf.create({**base, **overrides})


def mlp(classes: int = 4, seed: int = 0, activation=nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), activation(), nn.Linear(8, classes)).train()


def cnn(classes: int = 4, seed: int = 0, activation=nn.ReLU) -> nn.Module:
    """A CNN with BatchNorm (train mode) after each layer but the last."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), activation(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 6), nn.BatchNorm1d(6), activation(),
                         nn.Linear(6, classes)).train()


def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def jacrev_rows(model: nn.Module, inputs: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """sum_c vectors[k, b, c] d model(x_b)_c / d x_b by torch.func.jacrev, one sample at a time."""
    jacobian = torch.stack([torch.func.jacrev(lambda x: model(x.unsqueeze(0)).squeeze(0))(inputs[b])
                            for b in range(len(inputs))])
    return torch.einsum("kbc,bc...->kb...", vectors, jacobian)


def documented_function(student: nn.Module, inputs: torch.Tensor, batchnorm: str) -> nn.Module:
    """The per-sample function the methods document, built without the engine: an eval-mode copy
    holding the batch's statistics (`batch`) or the running ones from before the step (`running`)."""
    reference = copy.deepcopy(student)
    if batchnorm == "batch":
        seen = {}
        norms = [m for m in reference.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0])) for m in norms]
        with torch.no_grad():
            reference(inputs)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for m in norms:
                x = seen[m]
                dims = [0, *range(2, x.dim())]
                m.running_mean.copy_(x.mean(dims))
                m.running_var.copy_(x.var(dims, unbiased=False))
    return reference.eval()


CASES = [("mlp", "batch", "auto"), ("mlp", "batch", "loop"), ("mlp", "batch", "func"),
         ("cnn", "batch", "auto"), ("cnn", "batch", "batched"), ("cnn", "batch", "func"),
         ("cnn", "running", "auto")]


@pytest.mark.parametrize("network,batchnorm,strategy", CASES)
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_jacobians_equal_jacrev_per_sample(method, network, batchnorm, strategy):
    build = mlp if network == "mlp" else cnn
    student, teacher = build(seed=0), frozen(build(seed=1))
    torch.manual_seed(2)
    inputs, labels = torch.randn(5, 1, 4, 3 if network == "mlp" else 4), torch.randint(0, 4, (5,))
    if network == "cnn":   # running statistics that differ from the batch's
        with torch.no_grad():
            copy.deepcopy(student)(inputs)
            for m in student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    reference = documented_function(student, inputs, batchnorm)
    objective = Objective("kl", 4.0, 0.5, 0.0, settings(method, batchnorm=batchnorm, strategy=strategy),
                          torch.Generator().manual_seed(0))
    _, terms, matched = objective.evaluate(student, teacher, inputs, labels)

    vectors = matched.vectors
    if method == "top1":
        assert torch.equal(vectors[0].argmax(1), teacher(inputs).argmax(1))
    if method == "target":
        assert torch.equal(vectors[0].argmax(1), labels)
    if method == "exact":
        assert torch.equal(vectors, torch.eye(4).unsqueeze(1).expand(4, 5, 4))
    torch.testing.assert_close(matched.student, jacrev_rows(reference, inputs, vectors), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(matched.teacher, jacrev_rows(teacher, inputs, vectors), rtol=1e-10, atol=1e-12)
    assert matched.student.requires_grad and not matched.teacher.requires_grad
    assert torch.isfinite(terms["jacobian"]) and terms["jacobian"].requires_grad


class OwnBatchNorm(nn.BatchNorm2d):
    """A BatchNorm the engine does not gate: it takes the separate per-sample pass."""


def test_other_batchnorm_layers_are_per_sample_too():
    student, teacher = cnn(seed=0), frozen(cnn(seed=1))
    student[1] = OwnBatchNorm(3).train()
    inputs = torch.randn(5, 1, 4, 4)
    reference = documented_function(student, inputs, "batch")
    objective = Objective("kl", 4.0, 0.5, 0.0, settings("exact"))
    _, terms, matched = objective.evaluate(student, teacher, inputs, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(matched.student, jacrev_rows(reference, inputs, matched.vectors), rtol=1e-10,
                               atol=1e-12)
    assert all("forward" not in m.__dict__ for m in student.modules())


def test_coupled_batchnorm_is_the_gradient_of_the_batch_sum():
    """`coupled` keeps train-mode BatchNorm: sample b's row is d sum_b' S(x_b')_c / d x_b."""
    student, teacher = cnn(seed=0), frozen(cnn(seed=1))
    inputs = torch.randn(5, 1, 4, 4)
    objective = Objective("kl", 4.0, 0.5, 0.0, settings("exact", batchnorm="coupled"))
    _, _, matched = objective.evaluate(student, teacher, inputs, torch.zeros(5, dtype=torch.long))
    batch_function = copy.deepcopy(student)
    for m in batch_function.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    whole = torch.func.jacrev(lambda x: batch_function(x).sum(0))(inputs)   # [classes, batch, *input]
    torch.testing.assert_close(matched.student, whole, rtol=1e-10, atol=1e-12)


def test_func_strategy_with_coupled_batchnorm_is_refused():
    objective = Objective("kl", 4.0, 0.5, 0.0, settings("exact", batchnorm="coupled", strategy="func"))
    with pytest.raises(UsageError, match="jacobian.strategy='func' is not allowed"):
        objective(cnn(), frozen(cnn(seed=1)), torch.randn(3, 1, 4, 4), torch.zeros(3, dtype=torch.long))


class Reparametrized(nn.Module):
    """A network whose parameters are given tensors, so that a loss is a function of them."""

    def __init__(self, network: nn.Module, names: list[str]):
        super().__init__()
        self.network, self.names, self.values = network, names, None

    def forward(self, x):
        return torch.func.functional_call(self.network, dict(zip(self.names, self.values)), (x,))


@pytest.mark.parametrize("network", ["mlp", "cnn"])
@pytest.mark.parametrize("method", [*GRADIENT_METHODS, "noise"])
def test_gradcheck_of_the_loss_in_the_student_parameters(method, network):
    """Smooth (tanh) networks: with ReLU, the Jacobian jumps where an activation changes sign,
    and gradcheck's finite differences would cross such kinks. The loss is the whole objective
    (distillation + Jacobian term); the CNN has BatchNorm in train mode (batch statistics)."""
    build = mlp if network == "mlp" else cnn
    student, teacher = build(classes=3, activation=nn.Tanh), frozen(build(classes=3, seed=1, activation=nn.Tanh))
    names = [n for n, _ in student.named_parameters()]
    wrapper = Reparametrized(student, names)
    torch.manual_seed(3)
    inputs, labels = torch.randn(3, 1, 4, 3 if network == "mlp" else 4), torch.tensor([0, 1, 2])
    generator = torch.Generator().manual_seed(0)
    objective = Objective("kl", 2.0, 0.7, 0.0, settings(method, normalize=method != "exact", squared=method != "top1",
                                                        num_projections=2, sigma=0.3, samples=2), generator)

    def loss(*values):
        wrapper.values = values
        generator.manual_seed(0)   # the same projections / noise at every evaluation
        return objective(wrapper, teacher, inputs, labels)[1]["total"]

    values = tuple(p.detach().clone().requires_grad_(True) for p in student.parameters())
    assert torch.autograd.gradcheck(loss, values, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_projected_is_an_unbiased_estimate_of_the_squared_frobenius_distance(distribution):
    student, teacher = mlp(seed=0), frozen(mlp(seed=1))
    inputs, labels = torch.randn(3, 1, 4, 3), torch.zeros(3, dtype=torch.long)
    exact = Objective("kl", 1.0, 1.0, 0.0, settings("exact", normalize=False))
    _, _, full = exact.evaluate(student, teacher, inputs, labels)
    frobenius = (full.student - full.teacher).pow(2).sum(dim=(0, 2, 3, 4))   # [batch]

    draws = 4000
    projected = Objective("kl", 1.0, 1.0, 0.0, settings("projected", normalize=False, num_projections=draws,
                                                        distribution=distribution), torch.Generator().manual_seed(5))
    _, terms, matched = projected.evaluate(student, teacher, inputs, labels)
    per_draw = (matched.student - matched.teacher).pow(2).flatten(2).sum(2)   # [draws, batch]
    torch.testing.assert_close(terms["jacobian"], per_draw.mean())
    mean, error = per_draw.mean(0), per_draw.std(0) / math.sqrt(draws)
    assert ((mean - frobenius).abs() <= 4 * error).all(), (mean, frobenius, error)
    assert (error < 0.1 * frobenius).all(), "enough draws for the comparison to mean something"


def jacobian_difference(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J_S - J_T per sample by torch.func.jacrev: [batch, classes, input]."""
    rows = [torch.func.jacrev(lambda v: student(v.unsqueeze(0)).squeeze(0) - teacher(v.unsqueeze(0)).squeeze(0))(x[b])
            for b in range(len(x))]
    return torch.stack(rows).flatten(2)


@pytest.mark.parametrize("form", ["difference", "expansion"])
@pytest.mark.parametrize("network", ["piecewise linear", "smooth"])
def test_noise_approaches_the_unnormalised_jacobian_penalty_as_sigma_shrinks(network, form):
    """The perturbed-minus-clean term over sigma^2 with antithetic pairs: on the very draws xi it approaches
    ||(J_S - J_T) xi||^2 as sigma shrinks (exactly for ReLU, as sigma^2 for tanh), and over the draws
    ||J_S - J_T||_F^2, the penalty of `exact` with normalize=false. For `expansion` the smooth network's
    outputs agree with the teacher's at the sample, where the curvature part of the expansion vanishes."""
    activation = nn.ReLU if network == "piecewise linear" else nn.Tanh
    student, teacher = mlp(seed=0, activation=activation), frozen(mlp(seed=1, activation=activation))
    torch.manual_seed(4)
    x = torch.randn(2 if network == "piecewise linear" else 1, 1, 4, 3)
    labels = torch.zeros(len(x), dtype=torch.long)
    if network == "smooth" and form == "expansion":
        with torch.no_grad():
            student[-1].bias += teacher(x)[0] - student(x)[0]   # D(x) = 0
    difference = jacobian_difference(student, teacher, x)                 # [batch, classes, input]
    penalty = Objective("none", 1.0, 1.0, 0.0, settings("exact", normalize=False)).evaluate(
        student, teacher, x, labels)[1]["jacobian"]
    torch.testing.assert_close(penalty, difference.pow(2).sum((1, 2)).mean())

    samples, errors = 1000, []
    for sigma in (1e-1, 1e-2, 1e-3):
        objective = Objective("none", 1.0, 1.0, 0.0, settings("noise", sigma=sigma, samples=samples, form=form),
                              torch.Generator().manual_seed(11))
        _, terms, _ = objective.evaluate(student, teacher, x, labels)
        xi = objective.method.draws(x, torch.Generator().manual_seed(11)).flatten(2)   # the same draws
        per_draw = torch.einsum("bcd,sbd->sbc", difference, xi).pow(2).sum(-1).mean(1)   # [copies]
        errors.append(abs(terms["jacobian"].item() - per_draw.mean().item()) / per_draw.mean().item())
    if network == "piecewise linear":
        assert errors[-1] < 1e-9, errors
    else:
        assert errors[1] < 0.02 * errors[0] and errors[2] < 0.02 * errors[1] and errors[2] < 1e-5, errors
    standard_error = per_draw[:samples].std().item() / math.sqrt(samples)   # the antithetic copies repeat the draws
    assert abs(terms["jacobian"].item() - penalty.item()) <= 4 * standard_error
    assert standard_error < 0.05 * penalty.item()


def test_noise_expansion_without_antithetic_pairs_converges_only_in_expectation():
    """One-sided draws: the first-order part 2 D . J_D xi / sigma stays, so on the same draws the term moves
    away from ||J_D xi||^2 as sigma shrinks (its variance grows as 1 / sigma^2) while its mean is unchanged."""
    student, teacher = mlp(seed=0), frozen(mlp(seed=1))
    x, labels = torch.randn(2, 1, 4, 3), torch.zeros(2, dtype=torch.long)
    values = []
    for sigma in (1e-1, 1e-3):
        objective = Objective("none", 1.0, 1.0, 0.0, settings("noise", sigma=sigma, samples=4, antithetic=False,
                                                                    form="expansion"),
                              torch.Generator().manual_seed(3))
        values.append(objective.evaluate(student, teacher, x, labels)[1]["jacobian"].item())
    penalty = jacobian_difference(student, teacher, x).pow(2).sum((1, 2)).mean().item()
    assert abs(values[1] - penalty) > 10 * abs(values[0] - penalty)


@pytest.mark.parametrize("form", ["difference", "expansion"])
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
def test_the_checks_noise_limit_holds_on_piecewise_linear_and_smooth_networks(activation, form):
    """`jacdistill check`'s proof for noise: the term at sigma = 1e-3, 1e-4, 1e-5 against its limit on the same
    draws from forward-mode derivatives (for `expansion` on a smooth network, with the curvature part
    D . xi^T H xi); and a planted error (sigma^2 where sigma is meant) is caught."""
    from jacdistill_cli.engine.methods import Noise
    from jacdistill_cli.proofs.verify import NOISE_LIMIT_TOLERANCE, NOISE_SIGMAS, noise_limit_errors

    student, teacher = cnn(seed=0, activation=activation), frozen(cnn(seed=1, activation=activation))
    x, labels = torch.randn(3, 1, 4, 4), torch.zeros(3, dtype=torch.long)
    errors = noise_limit_errors(Noise(sigma=0.1, samples=1, form=form), student, teacher, x, labels, seed=3).errors
    assert list(errors) == list(NOISE_SIGMAS) and errors[NOISE_SIGMAS[-1]] < NOISE_LIMIT_TOLERANCE, errors
    if activation is nn.Tanh and form == "difference":   # O(sigma^2): 100x smaller per step of the ladder
        assert errors[NOISE_SIGMAS[1]] < 0.02 * errors[NOISE_SIGMAS[0]], errors

    class Misscaled(Noise):
        def term(self, clean, perturbed):
            return super().term(clean, perturbed) * self.sigma / 0.1

    assert noise_limit_errors(Misscaled(form=form), student, teacher, x, labels,
                              seed=3).errors[NOISE_SIGMAS[-1]] > 0.5


def test_noise_keeps_the_distillation_term_on_the_clean_batch():
    student, teacher = mlp(seed=0), frozen(mlp(seed=1))
    x, labels = torch.randn(3, 1, 4, 3), torch.zeros(3, dtype=torch.long)
    with_noise = Objective("kl", 2.0, 0.3, 0.0, settings("noise", sigma=0.5, samples=2), torch.Generator())
    without = Objective("kl", 2.0, 0.3, 0.0, settings("top1"))
    assert torch.equal(with_noise(student, teacher, x, labels)[1]["distill"],
                       without(student, teacher, x, labels)[1]["distill"])


def test_noise_perturbed_copies_use_the_clean_batch_statistics():
    """With train-mode BatchNorm the term is that of the per-sample function `exact` takes with batchnorm=batch."""
    student, teacher = cnn(seed=0), frozen(cnn(seed=1))
    x, labels = torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    reference = documented_function(student, x, "batch")
    objective = Objective("none", 1.0, 1.0, 0.0, settings("noise", sigma=0.2, samples=3),
                          torch.Generator().manual_seed(7))
    _, terms, _ = objective.evaluate(student, teacher, x, labels)
    xi = objective.method.draws(x, torch.Generator().manual_seed(7))
    with torch.no_grad():
        clean = reference(x) - teacher(x)
        perturbed = torch.stack([reference(x + 0.2 * v) - teacher(x + 0.2 * v) for v in xi])
        expected = (perturbed - clean).pow(2).sum(-1).mean() / 0.2 ** 2
    torch.testing.assert_close(terms["jacobian"].detach(), expected)


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_an_all_zero_jacobian_gives_a_finite_loss_and_gradients(method, normalize, squared):
    student, teacher = cnn(seed=0), frozen(cnn(seed=1))
    with torch.no_grad():
        student[-1].weight.zero_()   # the student's logits no longer depend on its input
    objective = Objective("kl", 4.0, 0.5, 0.0, settings(method, normalize=normalize, squared=squared),
                          torch.Generator().manual_seed(0))
    _, terms, matched = objective.evaluate(student, teacher, torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
    assert matched.student.abs().max() == 0
    terms["total"].backward()
    assert torch.isfinite(terms["total"]) and torch.isfinite(terms["jacobian"])
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_the_jacobian_term_alone_trains_the_student(method):
    """alpha = 1 and loss = none: only the Jacobian term, and a short training lowers it."""
    from jacdistill_cli.zoo.data import digits_arrays

    torch.set_default_dtype(torch.float32)
    try:
        images, labels = digits_arrays()
        images, labels = images[:256], labels[:256]
        torch.manual_seed(0)
        student = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        teacher = frozen(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))
        objective = Objective("none", 1.0, 1.0, 0.0, settings(method, num_projections=4),
                              torch.Generator().manual_seed(0))
        optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
        history = []
        for epoch in range(6):
            for start in range(0, 256, 32):
                _, terms = objective(student, teacher, images[start:start + 32], labels[start:start + 32])
                optimizer.zero_grad()
                terms["total"].backward()
                optimizer.step()
                history.append(terms["jacobian"].item())
        assert all(k == "distill" or v.requires_grad for k, v in terms.items() if k != "distill")
        first, last = sum(history[:8]) / 8, sum(history[-8:]) / 8
        assert last < 0.7 * first, (first, last)
    finally:
        torch.set_default_dtype(torch.float64)


def test_the_retain_graph_mistake_trains_nothing():
    student, teacher = cnn(seed=0), frozen(cnn(seed=1))
    receiving, parameters = retain_graph_mistake(student, teacher, torch.randn(4, 1, 4, 4))
    assert (receiving, parameters) == (0, len(list(student.parameters())))


def test_every_shipped_method_builds_from_its_config_file():
    from importlib.resources import files

    from jacdistill_cli.config.registry import build
    from jacdistill_cli.engine.methods import JacobianMethod

    folder = files("jacdistill_cli.conf") / "jacobian"
    shipped = {p.name.removesuffix(".yaml"): OmegaConf.create(p.read_text()) for p in folder.iterdir()
               if p.name.endswith(".yaml")}
    assert {"none", "top1", "target", "exact", "projected", "noise"} <= set(shipped)
    for name, node in shipped.items():
        built = build("jacobian", node)
        assert isinstance(built, JacobianMethod) and built.name == name == node.name
