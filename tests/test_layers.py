"""The Jacobian-ready layers and the per-model gate: true gradients outside the gate, objectives in
two threads, mixed precision, and no patching of modules at run time."""

from __future__ import annotations

import ast
import copy
import re
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import objective
from omegaconf import OmegaConf
from torch import nn

from jacdistill_cli.engine.layers import JacobianBatchNorm2d, JacobianConv2d, JacobianReLU, gate_of, make_jacobian_ready

PACKAGE = Path(__file__).resolve().parents[1] / "jacdistill_cli"
METHODS = ["top1", "target", "loss", "exact", "projected", "noise"]


def cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, classes))


def test_conversion_keeps_state_dict_keys_parameters_and_shows_in_print():
    plain = cnn()
    keys = {k: v.clone() for k, v in plain.state_dict().items()}
    parameters = list(plain.parameters())
    converted = make_jacobian_ready(plain)
    assert converted is plain and make_jacobian_ready(converted) is converted   # once, in place
    assert set(converted.state_dict()) == set(keys)
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in keys.items())
    assert list(converted.parameters()) == parameters                      # the same Parameter objects
    assert isinstance(converted[0], JacobianConv2d) and isinstance(converted[1], JacobianBatchNorm2d)
    assert isinstance(converted[2], JacobianReLU) and isinstance(converted[2], nn.ReLU)
    assert "JacobianBatchNorm2d" in repr(converted)
    fresh = cnn()
    fresh.load_state_dict(converted.state_dict())                           # checkpoints stay compatible
    copied = copy.deepcopy(converted)
    assert gate_of(copied) is not gate_of(converted) and gate_of(copied) is copied[1].jacobian_gate


@pytest.mark.parametrize("allow_unused", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_input_gradient_outside_the_gate_is_the_true_one(mode, allow_unused):
    """A model run inside the objective's forward pass (input convolution, gated BatchNorm, cheap
    ReLU/MaxPool) still gives the true input-gradient when it is taken outside the gate: never None,
    never zero, with or without allow_unused; and the same outside any pass."""
    reference = cnn().train(mode == "train")
    model = make_jacobian_ready(copy.deepcopy(reference))
    inputs = torch.randn(6, 3, 8, 8)
    x_ref = inputs.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(x_ref).pow(2).sum(), x_ref)
    for inside in (True, False):
        x = inputs.clone().requires_grad_(True)
        pass_ = gate_of(model).forward_pass(inputs=x, batchnorm=True) if inside else torch.enable_grad()
        with pass_:
            out = model(x)
        (gradient,) = torch.autograd.grad(out.pow(2).sum(), x, allow_unused=allow_unused)
        assert gradient is not None and gradient.abs().sum() > 0
        torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-6)


def test_the_loss_backward_skips_only_the_input_batch_gradient():
    """Inside `gate.loss(...)`'s backward the input convolution leaves the input batch without a
    gradient (nobody reads it); the parameters' gradients are those of plain layers."""
    reference = cnn().train()
    model = make_jacobian_ready(copy.deepcopy(reference))
    inputs = torch.randn(6, 3, 8, 8)
    x = inputs.clone().requires_grad_(True)
    with gate_of(model).forward_pass(inputs=x, batchnorm=True):
        loss = gate_of(model).loss(model(x).pow(2).sum())
    loss.backward()
    reference(inputs).pow(2).sum().backward()
    assert x.grad is None and gate_of(model).loss_backward == 0
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad)


def step_gradients(student: nn.Module, teacher: nn.Module, method: str, steps: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    data = torch.Generator().manual_seed(1)
    built = objective("kl", 4.0, 0.5, 0.0, OmegaConf.create({"name": method}), generator)
    for _ in range(steps):
        inputs, labels = torch.randn(6, 3, 8, 8, generator=data), torch.randint(0, 5, (6,), generator=data)
        student.zero_grad(set_to_none=True)
        built(student, teacher, inputs, labels)[1]["total"].backward()
        with torch.no_grad():
            for p in student.parameters():
                p -= 0.01 * p.grad
    return [p.grad.clone() for p in student.parameters()]


def test_two_objectives_in_two_threads_give_the_gradients_of_one_after_the_other():
    pairs = [(make_jacobian_ready(cnn(seed)).train(), make_jacobian_ready(cnn(seed + 10)).eval())
             for seed in (0, 1)]
    sequential = [step_gradients(copy.deepcopy(s), copy.deepcopy(t), "top1") for s, t in pairs]
    threads, results = [], [None, None]
    for index, (student, teacher) in enumerate(pairs):
        def work(index=index, student=student, teacher=teacher):
            results[index] = step_gradients(student, teacher, "top1", steps=3)
        threads.append(threading.Thread(target=work))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ours, expected in zip(results, sequential):
        for a, b in zip(ours, expected):
            assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_step_trains_a_cnn_with_batchnorm(method):
    """Under torch.autocast(bf16) on the CPU every method's step runs, its gradients are finite and
    point the way float32's do (bf16 keeps 8 bits of mantissa)."""
    drawn = torch.Generator().manual_seed(0)   # the same inputs whatever ran before on this worker
    inputs, labels = torch.randn(8, 3, 8, 8, generator=drawn), torch.randint(0, 5, (8,), generator=drawn)

    def gradients(precision: bool) -> torch.Tensor:
        student, teacher = make_jacobian_ready(cnn(0)).train(), make_jacobian_ready(cnn(1)).eval()
        built = objective("kl", 4.0, 0.5, 0.0, OmegaConf.create({"name": method}), torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision):
            _, terms = built(student, teacher, inputs, labels)
        terms["total"].backward()
        assert all(torch.isfinite(v).all() for v in terms.values())
        return torch.cat([p.grad.flatten() for p in student.parameters()])

    mixed, full = gradients(True), gradients(False)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    assert F.cosine_similarity(mixed, full, dim=0) > 0.95


def package_sources(folder: str = "") -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def test_no_forward_is_assigned_or_deleted_anywhere_in_the_package():
    pattern = re.compile(r"\.forward\s*=[^=]|\bdel\s+\S*\.forward\b|setattr\([^)]*['\"]forward['\"]")
    offenders = [f"{path.name}:{n}" for path in package_sources()
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_the_engine_keeps_no_module_level_mutable_state():
    """No `global` statement, and no module-level list, dict or set (a constant is a tuple or a
    read-only mapping), in engine/."""
    offenders = []
    for path in package_sources("engine"):
        tree = ast.parse(path.read_text())
        offenders += [f"{path.name}:{node.lineno} global" for node in ast.walk(tree) if isinstance(node, ast.Global)]
        for node in tree.body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
            called = isinstance(value, ast.Call) and getattr(value.func, "id", "") in ("list", "dict", "set")
            if isinstance(value, mutable) or called:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
