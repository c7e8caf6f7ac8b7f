"""jacobian=loss: each network's input-gradient of its own cross-entropy, d CE(f(x), y) / dx, against
autograd's gradient of the cross-entropy itself (no method, no vectors), through the objective training
uses; its term's parameter-gradients against gradcheck; `check`'s proof of it; the teacher's side
computed once (teacher.reuse_outputs) equal to the one of a step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import objective as Objective
from omegaconf import OmegaConf
from torch import nn

from jacdistill_cli.engine.layers import make_jacobian_ready
from jacdistill_cli.proofs.verify import check_method, checkable_methods

pytestmark = pytest.mark.usefixtures("float64_one_thread")


def settings(**overrides):
    return OmegaConf.create({"name": "loss", "normalize": True, "squared": True, "batchnorm": "batch",
                             "strategy": "auto", **overrides})


def mlp(seed: int, activation=nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), activation(), nn.Linear(8, 4)).train()


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 3, 4)).train()


def cross_entropy_gradient(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d CE(model(x_b), y_b) / d x_b for each b: the summed loss's input-gradient (samples independent)."""
    x = inputs.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(F.cross_entropy(model(x), labels, reduction="sum"), x)
    return gradient


@pytest.mark.parametrize("strategy", ["loop", "func"])
def test_the_gradients_are_each_networks_own_cross_entropy_gradient(strategy):
    student, teacher = mlp(0), mlp(1).eval().requires_grad_(False)
    torch.manual_seed(2)
    inputs, labels = torch.randn(5, 1, 4, 3), torch.randint(0, 4, (5,))
    objective = Objective("kl", 4.0, 0.5, 0.0, settings(strategy=strategy))
    _, terms, matched = objective.evaluate(student, teacher, inputs, labels)
    torch.testing.assert_close(matched.student, cross_entropy_gradient(student, inputs, labels)[None],
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(matched.teacher, cross_entropy_gradient(teacher, inputs, labels)[None],
                               rtol=1e-10, atol=1e-12)
    # the directions are each network's own p - e_y
    assert not torch.allclose(matched.vectors, matched.teacher_vectors)
    torch.testing.assert_close(matched.vectors[0].detach(), F.softmax(student(inputs), 1) - F.one_hot(labels, 4))
    assert matched.student.requires_grad and not matched.teacher.requires_grad
    assert terms["jacobian"].requires_grad


def test_with_train_mode_batchnorm_it_is_the_gradient_of_the_batch_statistics_function():
    student, teacher = make_jacobian_ready(cnn(0)), cnn(1).eval().requires_grad_(False)
    torch.manual_seed(3)
    inputs, labels = torch.randn(6, 1, 4, 3), torch.randint(0, 4, (6,))
    reference = copy.deepcopy(student)
    with torch.no_grad():
        batch = reference[0](inputs)
        reference[1].running_mean.copy_(batch.mean((0, 2, 3)))
        reference[1].running_var.copy_(batch.var((0, 2, 3), unbiased=False))
    reference.eval()
    _, _, matched = Objective("kl", 4.0, 0.5, 0.0, settings()).evaluate(student, teacher, inputs, labels)
    torch.testing.assert_close(matched.student, cross_entropy_gradient(reference, inputs, labels)[None],
                               rtol=1e-9, atol=1e-12)


def test_gradcheck_of_the_term_in_the_student_parameters():
    """Tanh: smooth, so finite differences cross no kink. The term depends on the parameters through the
    student's Jacobian and through its softmax p; gradcheck sees both."""
    student, teacher = mlp(0, nn.Tanh), mlp(1, nn.Tanh).eval().requires_grad_(False)
    names = [n for n, _ in student.named_parameters()]
    torch.manual_seed(4)
    inputs, labels = torch.randn(3, 1, 4, 3), torch.tensor([0, 1, 3])
    objective = Objective("kl", 2.0, 1.0, 0.0, settings(normalize=True, squared=False))

    def term(*values):
        class Call(nn.Module):
            def forward(self, x):
                return torch.func.functional_call(student, dict(zip(names, values)), (x,))
        return objective(Call(), teacher, inputs, labels)[1]["total"]

    values = tuple(p.detach().clone().requires_grad_(True) for p in student.parameters())
    assert torch.autograd.gradcheck(term, values, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_check_proves_it_and_lists_it():
    assert "loss" in checkable_methods()
    student, teacher = cnn(0), cnn(1).eval().requires_grad_(False)
    torch.manual_seed(5)
    inputs, labels = torch.randn(4, 1, 4, 3), torch.randint(0, 4, (4,))
    node = OmegaConf.merge({"_target_": "jacdistill_cli.engine.methods.LossGradient"}, settings())
    report = check_method(node, make_jacobian_ready(student), make_jacobian_ready(teacher), inputs, labels, 0)
    assert report.passed, report.failures
    assert report.jacobian_error_student < 1e-9 and report.jacobian_error_teacher < 1e-9
    assert set(report.receiving) == {n for n, _ in student.named_parameters()}


def test_the_teacher_side_computed_once_is_the_one_of_a_step():
    student, teacher = mlp(0), mlp(1).eval().requires_grad_(False)
    inputs, labels = torch.randn(5, 1, 4, 3), torch.randint(0, 4, (5,))
    objective = Objective("kl", 4.0, 0.5, 0.0, settings())
    assert objective.teacher_reusable
    stored = objective.teacher_outputs(teacher, inputs, labels)
    _, terms, matched = objective.evaluate(student, teacher, inputs, labels)
    _, reused_terms, reused = objective.evaluate(student, teacher, inputs, labels, teacher_outputs=stored)
    torch.testing.assert_close(stored.gradients, matched.teacher)
    torch.testing.assert_close(reused_terms["jacobian"], terms["jacobian"])
