"""The transformer's Jacobian step: double_backward.attention (a hand-written double backward), the attention and
patch-embedding paths of the gated passes (engine/layers.py), proven in float64 against PyTorch's own derivatives
and against the plain path (unconverted networks, the math attention kernel) for every method."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import objective
from omegaconf import OmegaConf
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.attention import SDPBackend, sdpa_kernel

from jacdistill_cli.engine import double_backward
from jacdistill_cli.engine.layers import (
    JacobianGate,
    _InputConv2d,
    gate_of,
    make_jacobian_ready,
    patch_convolution_backward,
)
from jacdistill_cli.zoo.vit import vit

pytestmark = pytest.mark.usefixtures("one_thread")
# Each with its shipped settings; top1 also unnormalised, where a gradient's scale shows.
METHODS = ["top1", "target", "projected", "noise", "exact", "loss", "top1_unnormalised"]
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# The functions themselves, in float64


def attention_inputs(seed: int = 0, length: int = 5, keys: int = 6):
    drawn = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, length, 4), (2, 3, keys, 4), (2, 3, keys, 3)]
    return [torch.randn(s, generator=drawn, dtype=F64).requires_grad_() for s in shapes]


def test_attention_has_pytorchs_derivatives_to_the_third_order():
    """gradcheck and gradgradcheck of attention, and of its input-gradients taken with create_graph (the second
    and third derivatives: the hand-written backward and its own derivative)."""
    q, k, v = attention_inputs()
    grad = torch.randn(2, 3, 5, 3, dtype=F64, requires_grad=True)

    def input_gradients(q, k, v, grad):
        return torch.autograd.grad(double_backward.attention(q, k, v), (q, k, v), grad, create_graph=True)

    assert gradcheck(double_backward.attention, (q, k, v)) and gradgradcheck(double_backward.attention, (q, k, v))
    assert gradcheck(input_gradients, (q, k, v, grad)) and gradgradcheck(input_gradients, (q, k, v, grad))


def test_attention_equals_the_math_kernel_to_rounding():
    q, k, v = attention_inputs(1)
    for scale in (None, 0.3):
        ours = double_backward.attention(q, k, v, scale=scale)
        theirs = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, scale=scale)[0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-14)
        weights = torch.randn_like(ours)
        torch.testing.assert_close(torch.autograd.grad((ours * weights).sum(), (q, k, v)),
                                   torch.autograd.grad((theirs * weights).sum(), (q, k, v)), rtol=0, atol=1e-13)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, True], [True, True, True]])
def test_a_patch_embeddings_backward_equals_convolution_backward(mask):
    drawn = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 3, 8, 12, generator=drawn, dtype=F64), torch.randn(5, 3, 4, 4, generator=drawn, dtype=F64)
    grad = torch.randn(2, 5, 2, 3, generator=drawn, dtype=F64)
    ours = patch_convolution_backward(grad, x, weight, 4, mask)
    theirs = torch.ops.aten.convolution_backward(grad, x, weight, [5], [4, 4], [0, 0], [1, 1], False, [0, 0], 1, mask)
    for a, b, wanted in zip(ours, theirs, mask):
        assert (a is None) == (not wanted)
        if wanted:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_the_input_convolution_of_a_patch_embedding_has_a_double_backward():
    """The input-gradient taken inside `jacobians()` (create_graph), differentiated again in the weight and the
    backward's gradient, against autograd's own derivatives."""
    x = torch.randn(2, 3, 8, 8, dtype=F64, requires_grad=True)
    weight, bias = torch.randn(5, 3, 4, 4, dtype=F64, requires_grad=True), torch.randn(5, dtype=F64, requires_grad=True)
    grad = torch.randn(2, 5, 2, 2, dtype=F64, requires_grad=True)
    gate = JacobianGate()

    def input_gradient(x, weight, bias, grad):
        with gate.jacobians():
            out = _InputConv2d.apply(x, weight, bias, (4, 4), (0, 0), (1, 1), 1, gate)
            return torch.autograd.grad(out, x, grad, create_graph=True)[0]

    assert gradcheck(input_gradient, (x, weight, bias, grad)) and gradgradcheck(input_gradient, (x, weight, bias, grad))


# ---------------------------------------------------------------------------------------------
# Every method on transformers, against the plain path


def plain(model: nn.Module) -> nn.Module:
    """The network unconverted, with a gate of its own and nothing behind it (the objective converts nothing):
    PyTorch's own layers, timm's attention on its explicit path (its matmul and softmax)."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module.__dict__.get("fused_attn"), bool):
            module.fused_attn = False
    reference.jacobian_gate = JacobianGate()
    return reference


def bench_vit_pair(classes: int):
    """conf/bench_pair/vit.yaml's teacher and student, in float64."""
    pair = OmegaConf.load("conf/bench_pair/vit.yaml")
    torch.manual_seed(0)
    teacher = vit((3, 32, 32), classes, **OmegaConf.to_container(pair.teacher)).double().eval().requires_grad_(False)
    student = vit((3, 32, 32), classes, **OmegaConf.to_container(pair.student)).double().train()
    return student, teacher


def timm_vit_pair(classes: int):
    timm = pytest.importorskip("timm")
    small = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": classes}
    torch.manual_seed(1)
    teacher = timm.create_model("vit_tiny_patch16_224", **small).double().eval().requires_grad_(False)
    student = timm.create_model("vit_tiny_patch16_224", **small).double().train()
    return student, teacher


def step(student: nn.Module, teacher: nn.Module, method: str, inputs, labels):
    """(the terms and the student's parameter gradients) of one step of `method`."""
    extra = {"projected": {"num_projections": 2}, "top1_unnormalised": {"name": "top1", "normalize": False}}
    settings = OmegaConf.create({"name": method, **extra.get(method, {})})
    built = objective("kl", 4.0, 0.5, 0.0, settings, torch.Generator().manual_seed(3))
    student.zero_grad(set_to_none=True)
    _, terms = built(student, teacher, inputs, labels)
    terms["total"].backward()
    return {k: v.detach() for k, v in terms.items()}, {n: p.grad for n, p in student.named_parameters()}


@pytest.mark.parametrize("pair", ["bench_vit", "timm_vit"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_equals_the_plain_path_in_float64(pair, method):
    """Values and every parameter gradient of a step, the converted networks against the plain path (unconverted
    networks, the math attention kernel), to 1e-10: on the bench's ViT pair and on a small timm ViT."""
    student, teacher = bench_vit_pair(10) if pair == "bench_vit" else timm_vit_pair(10)
    drawn = torch.Generator().manual_seed(5)
    inputs, labels = torch.randn(3, 3, 32, 32, generator=drawn, dtype=F64), torch.randint(0, 10, (3,), generator=drawn)
    reference_student, reference_teacher = plain(student), plain(teacher)
    ours = step(make_jacobian_ready(student), make_jacobian_ready(teacher), method, inputs, labels)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = step(reference_student, reference_teacher, method, inputs, labels)
    for name in ours[0]:
        torch.testing.assert_close(ours[0][name], theirs[0][name], rtol=0, atol=1e-10)
    assert set(ours[1]) == set(theirs[1]) and all(g is not None for g in ours[1].values())
    for name, gradient in ours[1].items():
        torch.testing.assert_close(gradient, theirs[1][name], rtol=0, atol=1e-10, msg=name)
    assert any(gradient.abs().max() > 1e-3 for name, gradient in ours[1].items() if "in_proj" in name or "qkv" in name)


# ---------------------------------------------------------------------------------------------
# Where the paths run


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def encoder(batch_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, 16, 0.0, activation="gelu", batch_first=batch_first)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)


def torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(8, 4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3)


@pytest.mark.parametrize("kind", ["encoder_batch_first", "encoder_sequence_first", "torchvision_vit", "timm_vit"])
def test_each_transformer_runs_the_hand_written_double_backward_in_the_students_pass_only(kind):
    """nn.TransformerEncoder (either layout), torchvision's and timm's ViT: inside the gated pass their attention is
    double_backward's (the output as PyTorch computes it), in a teacher's pass and outside the gate not."""
    torch.manual_seed(0)
    if kind.startswith("encoder"):
        model, x = encoder(kind == "encoder_batch_first"), torch.randn(3, 5, 8)
    elif kind == "torchvision_vit":
        model, x = torchvision_vit(), torch.randn(3, 3, 8, 8)
    else:
        model, x = timm_vit_pair(3)[0].float(), torch.randn(3, 3, 32, 32)
    expected = model(x)
    model = make_jacobian_ready(model)
    gate = gate_of(model)
    for context, ours in ((gate.forward_pass(), True), (gate.forward_pass(activations=False), False),
                          (contextlib.nullcontext(), False)):
        inputs = x.clone().requires_grad_()
        with context:
            out = model(inputs)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert ("_AttentionBackward" in graph_nodes(out)) == ours, (kind, graph_nodes(out))


def test_the_teachers_pass_keeps_the_fused_kernel_and_its_input_convolution_gives_the_true_gradient():
    torch.manual_seed(0)
    teacher = vit((3, 16, 16), 5, patch_size=4, dim=16, depth=1, heads=2).eval().requires_grad_(False)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    (expected,) = torch.autograd.grad(teacher(x)[:, 2].sum(), x)
    converted = make_jacobian_ready(copy.deepcopy(teacher))
    with gate_of(converted).forward_pass(activations=False):
        out = converted(x)
    nodes = graph_nodes(out)
    assert "_InputConv2dBackward" in nodes and any("FlashAttention" in n for n in nodes), nodes
    (gradient,) = torch.autograd.grad(out[:, 2].sum(), x)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-6)


def test_attention_under_dropout_and_autocast_takes_the_math_kernels_composition():
    q, k, v = [t.detach().float().requires_grad_() for t in attention_inputs(2)]
    assert "_AttentionBackward" in graph_nodes(double_backward.attention(q, k, v))
    assert "_AttentionBackward" not in graph_nodes(double_backward.attention(q, k, v, dropout_p=0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = double_backward.attention(q, k, v)
    assert mixed.dtype == torch.bfloat16 and "_AttentionBackward" not in graph_nodes(mixed)
    torch.testing.assert_close(mixed.float(), F.scaled_dot_product_attention(q, k, v), rtol=0.05, atol=0.05)


def test_the_plain_way_gives_jacdistills_loss_on_the_bench_pair():
    """proofs/plain_way.py compares jacdistill's top1 step with the objective written the plain way: both take the
    same loss from the same weights (what its timing rests on)."""
    from jacdistill_cli.proofs import plain_way

    cfg = plain_way.bench_config("vit")
    cfg.batch_size = 6
    student, teacher, x, y = plain_way.build_pair(cfg, 10)
    ours, plain = plain_way.first_losses(student, teacher, x, y, cfg)
    assert abs(ours - plain) <= plain_way.LOSS_TOLERANCE and plain > 0
    assert gate_of(student) is None and gate_of(teacher) is None   # the networks given stay unconverted
