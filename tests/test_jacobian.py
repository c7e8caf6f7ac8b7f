"""The Jacobian building blocks against torch.func.jacrev and against nn.BatchNorm itself, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jacdistill_cli.engine import batchnorm as B
from jacdistill_cli.engine import jacobian as J
from jacdistill_cli.engine.layers import gate_of, make_jacobian_ready

pytestmark = pytest.mark.usefixtures("float64_one_thread")


def mlp(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, classes))


def cnn_with_batchnorm(classes: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 3 * 3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, classes)).train()


def per_sample_jacrev(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """[batch, classes, *input], one torch.func.jacrev per sample."""
    return torch.stack([torch.func.jacrev(lambda x: model(x.unsqueeze(0)).squeeze(0))(inputs[b])
                        for b in range(len(inputs))])


def held_statistics_copy(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """The per-sample function of `batch` mode, built independently: an eval-mode copy whose
    running statistics are this batch's mean and biased variance."""
    reference = copy.deepcopy(model)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0]))
             for m in reference.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        reference(inputs)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for m, x in seen.items():
            dims = [0, *range(2, x.dim())]
            m.running_mean.copy_(x.mean(dims))
            m.running_var.copy_(x.var(dims, unbiased=False))
    return reference.eval()


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_full_jacobian_equals_jacrev_per_sample(strategy):
    model = mlp()
    inputs = torch.randn(5, 3, 4, requires_grad=True)
    jacobian = J.full_jacobian(model(inputs), inputs, create_graph=False, strategy=strategy)
    assert jacobian.shape == (5, 4, 3, 4)
    torch.testing.assert_close(jacobian, per_sample_jacrev(model, inputs.detach()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(J.func_jacobian(model, inputs.detach()), jacobian, rtol=1e-12, atol=1e-12)


def test_vector_jacobian_products_are_linear_combinations_of_rows():
    model = mlp()
    inputs = torch.randn(3, 3, 4, requires_grad=True)
    vectors = torch.randn(6, 3, 4)
    reference = torch.einsum("kbc,bc...->kb...", vectors, per_sample_jacrev(model, inputs.detach()))
    for strategy in ("loop", "batched"):
        grads = J.vector_jacobian_products(model(inputs), inputs, vectors, create_graph=False, strategy=strategy)
        torch.testing.assert_close(grads, reference, rtol=1e-12, atol=1e-12)


def test_create_graph_keeps_the_result_differentiable_and_retain_graph_does_not():
    model = mlp()
    inputs = torch.randn(2, 3, 4, requires_grad=True)
    logits = model(inputs)
    kept = J.class_gradients(logits, inputs, torch.tensor([0, 1]), create_graph=True)
    constant = J.class_gradients(logits, inputs, torch.tensor([0, 1]), create_graph=False)
    assert kept.requires_grad and not constant.requires_grad
    grads = torch.autograd.grad(kept.pow(2).sum(), list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_gated_batchnorm_is_nn_batchnorm_outside_closed_statistics():
    """Outputs, running statistics (momentum and cumulative) and the ordinary backward pass."""
    for momentum in (0.1, None):
        native = nn.BatchNorm2d(3, momentum=momentum).train()
        with torch.no_grad():
            native.weight.uniform_(0.5, 1.5)
            native.bias.uniform_(-0.5, 0.5)
        gated = make_jacobian_ready(nn.Sequential(copy.deepcopy(native)))
        x = torch.randn(6, 3, 4, 4) * 2 + 1
        for step in range(2):
            a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            out_native = native(a)
            with gate_of(gated).forward_pass(batchnorm=True):
                out_gated = gated(b)
            torch.testing.assert_close(out_gated, out_native)
            weights = torch.randn_like(out_native)
            (out_native * weights).sum().backward()
            (out_gated * weights).sum().backward()
            torch.testing.assert_close(b.grad, a.grad)
            torch.testing.assert_close(gated[0].weight.grad, native.weight.grad)
            torch.testing.assert_close(gated[0].bias.grad, native.bias.grad)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(gated[0], name), getattr(native, name))
        assert "forward" not in gated[0].__dict__


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_closed_statistics_give_the_per_sample_jacobian_of_the_batch_statistics(strategy):
    model = make_jacobian_ready(cnn_with_batchnorm())
    inputs = torch.randn(4, 2, 6, 6)
    reference = per_sample_jacrev(held_statistics_copy(model, inputs), inputs)
    x = inputs.clone().requires_grad_(True)
    with gate_of(model).forward_pass(inputs=x, batchnorm=True):
        logits = model(x)
    with gate_of(model).jacobians():
        jacobian = J.full_jacobian(logits, x, create_graph=True, strategy=strategy)
    torch.testing.assert_close(jacobian, reference, rtol=1e-10, atol=1e-12)
    # Outside the closed context the same graph gives the coupled input-gradient, which differs.
    coupled = J.full_jacobian(logits, x, create_graph=False, strategy="loop")
    assert (coupled - reference).abs().max() > 1e-3


@pytest.mark.parametrize("converted", [True, False])
def test_recorded_statistics_make_a_separate_pass_per_sample(converted):
    """Converted BatchNorm layers hold the statistics themselves; others through forward hooks."""
    model = make_jacobian_ready(cnn_with_batchnorm()) if converted else cnn_with_batchnorm()
    inputs = torch.randn(4, 2, 6, 6)
    with B.recorded_batchnorm_statistics(model) as statistics:
        train_logits = model(inputs)
    x = inputs.clone().requires_grad_(True)
    with B.per_sample_batchnorm(model, "batch", statistics):
        logits = model(x)
        torch.testing.assert_close(logits, train_logits)
        jacobian = J.full_jacobian(logits, x, create_graph=False)
    torch.testing.assert_close(jacobian, per_sample_jacrev(held_statistics_copy(model, inputs), inputs),
                               rtol=1e-10, atol=1e-12)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="statistics"):
        with B.per_sample_batchnorm(model, "batch", None):
            pass


def test_running_mode_uses_running_statistics_and_restores_train_mode():
    model = cnn_with_batchnorm()
    inputs = torch.randn(3, 2, 6, 6)
    with B.per_sample_batchnorm(model, "running"):
        assert not any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        running = model(inputs)
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(running, copy.deepcopy(model).eval()(inputs))
    snapshot = B.running_batchnorm_statistics(model)
    with B.per_sample_batchnorm(model, "running", snapshot):
        torch.testing.assert_close(model(inputs), running)


def test_cheap_relu_and_max_pool_give_the_same_second_derivatives():
    """The swapped ReLU/MaxPool2d backward passes skip a derivative that is zero, nothing else."""
    model = make_jacobian_ready(cnn_with_batchnorm().eval())
    inputs = torch.randn(3, 2, 6, 6)

    def parameter_gradients(swap: bool):
        x = inputs.clone().requires_grad_(True)
        model.zero_grad()
        with gate_of(model).forward_pass(batchnorm=False) if swap else torch.enable_grad():
            logits = model(x)
        jacobian = J.full_jacobian(logits, x, create_graph=True)
        (jacobian.pow(2).sum() + logits.pow(2).sum()).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    plain_logits, plain = parameter_gradients(False)
    swapped_logits, swapped = parameter_gradients(True)
    torch.testing.assert_close(swapped_logits, plain_logits)
    for a, b in zip(swapped, plain):
        torch.testing.assert_close(a, b)


def test_affine_batchnorm_is_eval_mode_batchnorm():
    model = make_jacobian_ready(cnn_with_batchnorm())
    with torch.no_grad():
        model(torch.randn(8, 2, 6, 6) * 3 + 1)   # running statistics away from 0 and 1
    model.eval()
    inputs = torch.randn(4, 2, 6, 6)
    a, b = inputs.clone().requires_grad_(True), inputs.clone().requires_grad_(True)
    native = model(a)
    with gate_of(model).forward_pass(activations=False):
        affine = model(b)
    torch.testing.assert_close(affine, native)
    torch.testing.assert_close(J.full_jacobian(affine, b, False), J.full_jacobian(native, a, False))
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_matching_distance_is_finite_at_zero(normalize, squared):
    student = torch.zeros(3, 2, 5, requires_grad=True)
    for teacher in (torch.randn(3, 2, 5), torch.zeros(3, 2, 5)):
        distance = J.matching_distance(student, teacher, normalize, squared)
        assert distance.shape == (3,) and torch.isfinite(distance).all()
        (grad,) = torch.autograd.grad(distance.sum(), student)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_matching_distance_values_and_gradcheck(normalize, squared):
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6)
    s, t = (student / student.norm(dim=1, keepdim=True), teacher / teacher.norm(dim=1, keepdim=True)) \
        if normalize else (student, teacher)
    expected = (s - t).pow(2).sum(1) if squared else (s - t).norm(dim=1)
    torch.testing.assert_close(J.matching_distance(student, teacher, normalize, squared), expected)
    assert torch.autograd.gradcheck(lambda x: J.matching_distance(x, teacher, normalize, squared), (student,))


def test_auto_strategy_rule():
    conv = cnn_with_batchnorm()
    dense = mlp()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert J.resolve_strategy("auto", conv, cpu) == "loop"
    assert J.resolve_strategy("auto", dense, cpu) == "batched"
    assert J.resolve_strategy("auto", conv, cuda) == "batched"
    assert J.resolve_strategy("func", conv, cpu) == "func"
