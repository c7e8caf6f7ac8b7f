"""Attention and the layers the zoo does not use, through `check`'s machinery: input-gradients against
torch.func.jacrev in float64, parameter gradients against finite differences, and bf16 against float64.
Attention runs on a kernel with a double backward only in a second-order pass, per model and per thread."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import objective
from omegaconf import OmegaConf
from torch import nn

from jacdistill_cli.engine.batchnorm import refuse_unconverted
from jacdistill_cli.engine.layers import (
    JacobianMultiheadAttention,
    MathAttention,
    gate_of,
    make_jacobian_ready,
    math_attention,
)
from jacdistill_cli.errors import UsageError
from jacdistill_cli.proofs.verify import PRECISION_TOLERANCE, check_method
from jacdistill_cli.zoo.vit import vit

METHODS = ["top1", "target", "exact", "projected", "noise"]


pytestmark = pytest.mark.usefixtures("one_thread")


def jacobian_settings(name: str, **settings):
    return OmegaConf.merge(OmegaConf.load(f"conf/jacobian/{name}.yaml"), settings)


def batch(shape=(1, 4, 4), size: int = 4, classes: int = 3, seed: int = 0):
    drawn = torch.Generator().manual_seed(seed)
    return torch.randn(size, *shape, generator=drawn), torch.randint(0, classes, (size,), generator=drawn)


def proven(student: nn.Module, teacher: nn.Module, inputs, labels, method: str = "top1", precision: str = "32",
           **settings):
    report = check_method(jacobian_settings(method, **settings), make_jacobian_ready(student),
                          make_jacobian_ready(teacher), inputs, labels, 0, precision)
    assert report.passed, report.failures
    return report


# ---------------------------------------------------------------------------------------------
# Small models of the layers to prove


class Tokens(nn.Module):
    """[batch, 1, 4, 4] -> 4 tokens of width `dim` (a Linear of each row), attention, -> logits."""

    def __init__(self, attention: str, dim: int = 8, classes: int = 3):
        super().__init__()
        self.embed, self.kind = nn.Linear(4, dim), attention
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True) if attention.startswith("mha") else None
        self.qkv = nn.Linear(dim, 3 * dim) if attention == "sdpa" else None
        self.head = nn.Linear(4 * dim, classes)
        self.record = False                      # keep the attention's output of each pass in `last`
        self.last: torch.Tensor | None = None

    def forward(self, x):
        tokens = self.embed(x.flatten(1, 2))                         # [batch, 4, dim]
        if self.kind == "sdpa":
            q, k, v = self.qkv(tokens).view(x.shape[0], 4, 3, 2, -1).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        else:
            out, weights = self.attention(tokens, tokens, tokens, need_weights=self.kind == "mha_weights")
            assert (weights is not None) == (self.kind == "mha_weights")
        if self.record:
            self.last = out
        return self.head((tokens + out).flatten(1))


class Residual(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def conv_model(*middle: nn.Module, width: int = 4, spatial: int = 16, classes: int = 3, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=bias), *middle, nn.Flatten(), nn.Linear(width * spatial, classes))


def mlp_with(layer: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), layer, nn.Linear(8, 3))


LAYERS = {
    "gelu": lambda: mlp_with(nn.GELU()),
    "gelu_tanh": lambda: mlp_with(nn.GELU(approximate="tanh")),
    "silu": lambda: mlp_with(nn.SiLU()),
    "layernorm": lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)),
    "groupnorm": lambda: conv_model(nn.GroupNorm(2, 4), nn.SiLU()),
    "depthwise": lambda: conv_model(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.GELU()),
    "avgpool": lambda: conv_model(nn.AvgPool2d(2), nn.GELU(), spatial=4),
    "adaptive_avgpool": lambda: conv_model(nn.GELU(), nn.AdaptiveAvgPool2d(2), spatial=4),
    "inplace_relu": lambda: conv_model(nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True)),
    "residual": lambda: conv_model(Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GELU())),
                                   Residual(nn.Sequential(nn.GroupNorm(1, 4), nn.Conv2d(4, 4, 1)))),
    "mha_need_weights_true": lambda: Tokens("mha_weights"),
    "mha_need_weights_false": lambda: Tokens("mha"),
    "scaled_dot_product_attention": lambda: Tokens("sdpa"),
    "torchvision_vit": lambda: _torchvision_vit(),
}


def _torchvision_vit() -> nn.Module:
    """torchvision's VisionTransformer (nn.MultiheadAttention with need_weights=False), as vit_b_16 is built."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(4, 2, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3)
    nn.init.normal_(model.heads.head.weight)   # torchvision starts it at zero: no input-gradient to match
    return model


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_is_proven_by_checks_machinery(layer):
    """top1 on a student made of the layer: its input-gradient equals jacrev's (float64), and every parameter
    the term depends on gets autograd's gradient, equal to finite differences'."""
    torch.manual_seed(0)
    student, teacher = LAYERS[layer]().train(), LAYERS[layer]().eval()
    inputs, labels = batch((3, 4, 4) if layer == "torchvision_vit" else (1, 4, 4))
    report = proven(student, teacher, inputs, labels)
    assert report.jacobian_error_student < 1e-9 and report.dependent


class SeededDropout(nn.Module):
    """The network with its dropout masks fixed: the same masks on every pass of a batch of this size."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return self.net(x)


def test_dropout_with_fixed_masks_is_proven_against_the_batch_jacobian():
    """Train-mode dropout couples nothing, but its masks are drawn per batch: with the masks fixed, check's
    `coupled` reference (jacrev of the whole batch) and finite differences see the function training sees."""
    torch.manual_seed(0)
    student = SeededDropout(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.GELU(),
                                          nn.Dropout(0.5), nn.Linear(8, 3))).train()
    teacher = mlp_with(nn.GELU()).eval()
    inputs, labels = batch(size=6)
    report = proven(student, teacher, inputs, labels, batchnorm="coupled")
    assert "net.1.weight" in report.receiving
    # The masks matter: the network without them fixed is not the same function twice.
    with torch.no_grad():
        assert not torch.equal(student.net(inputs), student.net(inputs))


# ---------------------------------------------------------------------------------------------
# A transformer student: check passes every method, in float64 and under bf16


def tiny_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return vit((1, 4, 4), 3, patch_size=2, dim=8, depth=1, heads=2)


@pytest.mark.parametrize("method", METHODS)
def test_check_passes_every_method_on_a_transformer_student_in_float64_and_bf16(method):
    inputs, labels = batch()
    report = proven(tiny_vit(0).train(), tiny_vit(1).eval(), inputs, labels, method, precision="bf16")
    assert any("in_proj_weight" in name for name in report.receiving)
    if method != "noise":
        assert report.jacobian_error_student < 1e-9 and report.precision_error < PRECISION_TOLERANCE["bf16"]


@pytest.mark.parametrize("kind", ["mha", "sdpa"])
def test_strategy_func_runs_attention_on_the_math_kernel_inside_the_jacobians(kind):
    """exact with strategy=func: the forward pass runs under torch.func inside gate.jacobians()."""
    torch.manual_seed(0)
    inputs, labels = batch()
    proven(Tokens(kind).train(), Tokens(kind).eval(), inputs, labels, "exact", strategy="func")


# ---------------------------------------------------------------------------------------------
# Which kernel runs where


def attention_ops(run) -> set[str]:
    """The attention kernels (profiler op names, `_Attention` for double_backward's) that ran during run()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return {e.key for e in profile.key_averages()
            if "scaled_dot_product" in e.key or "multi_head" in e.key or e.key == "_Attention"}


def fused(ops: set[str]) -> bool:
    return any("flash" in op or "efficient" in op or "native_multi_head" in op for op in ops)


def test_teacher_evaluation_and_plain_kd_use_the_fused_kernel_and_the_jacobian_step_does_not():
    from jacdistill_cli.loop.trainer import evaluate
    from jacdistill_cli.zoo.data import TensorSplit

    inputs, labels = batch()
    cnn = make_jacobian_ready(conv_model(nn.ReLU()))
    student, teacher = make_jacobian_ready(tiny_vit(0).train()), make_jacobian_ready(tiny_vit(1).eval())
    top1 = OmegaConf.create({"name": "top1"})

    def step(s, t, alpha, settings=top1):
        objective("kl", 4.0, alpha, 0.0, settings)(s, t, inputs, labels)[1]["total"].backward()

    # The teacher's pass and its input-gradient in a Jacobian step (the student is a CNN).
    teacher_ops = attention_ops(lambda: step(cnn, teacher, 0.5))
    assert fused(teacher_ops) and "aten::_scaled_dot_product_attention_math" not in teacher_ops, teacher_ops
    # A plain KD step of the transformer student.
    kd_ops = attention_ops(lambda: step(student, teacher, 0.0, OmegaConf.create({"name": "none"})))
    assert fused(kd_ops) and "aten::_scaled_dot_product_attention_math" not in kd_ops, kd_ops
    # Evaluation: accuracy, agreement and input-gradient cosine of both networks.
    metrics = {}
    eval_ops = attention_ops(lambda: metrics.update(evaluate(student, teacher, TensorSplit(inputs, labels), 4,
                                                             torch.device("cpu"))))
    assert fused(eval_ops) and "aten::_scaled_dot_product_attention_math" not in eval_ops, eval_ops
    assert 0 <= metrics["accuracy"] <= 1
    # The Jacobian step of the transformer student: its own pass runs double_backward's attention, no fused kernel.
    student_ops = attention_ops(lambda: step(student, cnn.eval(), 0.5))
    assert not fused(student_ops) and "_Attention" in student_ops, student_ops


def test_a_model_calling_sdpa_itself_gets_a_double_backward_inside_its_gate_only():
    """Inside the objective's forward pass double_backward's attention, in another second-order pass (a feature
    Jacobian's) the math kernel, outside both the fused kernel."""
    model = make_jacobian_ready(Tokens("sdpa"))
    inputs, _ = batch()
    gate = gate_of(model)
    inside = attention_ops(lambda: _inside(model, inputs, gate.forward_pass()))
    assert inside == {"_Attention"}, inside
    second_order = attention_ops(lambda: _inside(model, inputs, gate.second_order_pass()))
    assert "aten::_scaled_dot_product_attention_math" in second_order and "_Attention" not in second_order
    outside = attention_ops(lambda: model(inputs.requires_grad_()).sum().backward())
    assert fused(outside) and "aten::_scaled_dot_product_attention_math" not in outside


def _inside(model, inputs, context):
    with context:
        model(inputs)


def test_math_attention_equals_the_fused_kernel():
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    mask = torch.randn(5, 5)
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}, {"scale": 0.3}):
        assert torch.allclose(math_attention(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs),
                              atol=1e-6)


def grad_fn_names(tensor: torch.Tensor) -> set[str]:
    """The autograd nodes `tensor` was computed by, back to its leaves."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kind", ["sdpa", "mha"])
def test_two_threads_one_model_inside_its_gate_and_one_outside(kind):
    """While thread A holds its model's second-order pass open, thread B runs another attention model at the
    same time: B's attention is the fused kernel (its backward node), A's the math one (which differentiates
    twice)."""
    inside, outside = make_jacobian_ready(Tokens(kind)), make_jacobian_ready(Tokens(kind))
    inside.record = outside.record = True
    inputs, _ = batch()
    both = threading.Barrier(2, timeout=30)
    results: dict[str, object] = {}

    def thread_a():
        x = inputs.clone().requires_grad_()
        with gate_of(inside).forward_pass(inputs=x):
            both.wait()                  # B runs while A's pass is open
            logits = inside(x)
            both.wait()
        (gradient,) = torch.autograd.grad(logits[:, 0].sum(), x, create_graph=True)
        gradient.pow(2).sum().backward()  # the double backward: fails on the fused kernels
        results["a"] = (grad_fn_names(inside.last), inside.embed.weight.grad)

    def thread_b():
        both.wait()
        x = inputs.clone().requires_grad_()
        logits = outside(x)
        results["b"] = grad_fn_names(outside.last)
        both.wait()
        logits.sum().backward()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    names_a, weight_grad = results["a"]
    assert any("FlashAttention" in n for n in results["b"]), results["b"]
    assert not any("FlashAttention" in n for n in names_a), names_a
    assert weight_grad is not None and weight_grad.abs().sum() > 0


def test_multihead_attention_keeps_its_outputs_in_a_second_order_pass():
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(8, 2, batch_first=True)
    converted = make_jacobian_ready(nn.Sequential(plain))[0]
    assert isinstance(converted, JacobianMultiheadAttention)
    x = torch.randn(2, 5, 8)
    expected, none = converted(x, x, x, need_weights=False)
    with gate_of(converted).second_order_pass():
        out, weights = converted(x, x, x, need_weights=False)
    assert none is None and weights is None and torch.allclose(out, expected, atol=1e-6)
    assert isinstance(MathAttention(), torch.overrides.TorchFunctionMode)


# ---------------------------------------------------------------------------------------------
# Subclasses of converted types: converted, or refused in one line


class MyBatchNorm(nn.BatchNorm2d):
    """A subclass that keeps BatchNorm's forward."""


class ScaledBatchNorm(nn.BatchNorm2d):
    """A subclass with a forward of its own."""

    def forward(self, x):
        return 2 * super().forward(x)


def bn_model(norm: nn.Module) -> nn.Module:
    return conv_model(norm, nn.GELU(), bias=False)   # a bias before BatchNorm has no effect to check


def test_a_batchnorm_subclass_keeping_its_forward_is_converted_and_proven():
    torch.manual_seed(0)
    student = make_jacobian_ready(bn_model(MyBatchNorm(4)).train())
    assert isinstance(student[1], MyBatchNorm) and type(student[1]).__mro__[1].__name__ == "JacobianBatchNorm2d"
    proven(student, bn_model(nn.BatchNorm2d(4)).eval(), *batch(size=6))


def test_a_batchnorm_subclass_with_its_own_forward_is_refused_in_one_line():
    torch.manual_seed(0)
    student = make_jacobian_ready(bn_model(ScaledBatchNorm(4)).train())
    teacher = make_jacobian_ready(bn_model(nn.BatchNorm2d(4)).eval())
    inputs, labels = batch(size=6)
    with pytest.raises(UsageError) as refused:
        objective("kl", 4.0, 0.5, 0.0, OmegaConf.create({"name": "top1"}))(student, teacher, inputs, labels)
    message = str(refused.value)
    assert "\n" not in message and "module '1'" in message and "ScaledBatchNorm" in message
    # The same line before any step, for a command to call once the student is built.
    with pytest.raises(UsageError) as early:
        refuse_unconverted(student, None, "batch")
    assert str(early.value) == message
    refuse_unconverted(student, None, "coupled")
    assert "jacobian.batchnorm=coupled" in message and "eval mode" in message
    # What the line offers works: the batch as one function, and the module in eval mode.
    proven(student, teacher, inputs, labels, batchnorm="coupled")
    student[1].eval()
    proven(student, teacher, inputs, labels)


def test_timm_batchnorm_act_is_converted_and_conv2d_same_left_and_both_proven():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    student = make_jacobian_ready(nn.Sequential(timm_layers.Conv2dSame(1, 4, 3, stride=2, bias=False),
                                                timm_layers.BatchNormAct2d(4, act_layer=nn.GELU),
                                                nn.Flatten(), nn.Linear(16, 3)).train())
    assert type(student[0]) is timm_layers.Conv2dSame            # a forward of its own: its true gradients
    assert isinstance(student[1], timm_layers.BatchNormAct2d) and type(student[1]).__name__ == "JacobianBatchNormAct2d"
    teacher = mlp_with(nn.GELU()).eval()
    inputs, labels = batch(size=6)
    proven(student, teacher, inputs, labels)
    proven(student, teacher, inputs, labels, batchnorm="running")


# ---------------------------------------------------------------------------------------------
# The console script: a user's transformer student, by `_target_`

USER_TRANSFORMER = '''
import torch
from torch import nn


class Transformer(nn.Module):
    """Rows of the image as tokens, torch's own encoder (need_weights=False: the fused kernels), a linear head."""

    def __init__(self, input_shape, num_classes, width):
        super().__init__()
        channels, height, row = input_shape
        self.embed = nn.Linear(channels * row, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width * height, num_classes)

    def forward(self, x):
        tokens = self.embed(x.permute(0, 2, 1, 3).flatten(2))
        return self.head(self.encoder(tokens).flatten(1))


def transformer(input_shape, num_classes, width=16):
    torch.manual_seed(123)   # the initial weights, known to the test
    return Transformer(input_shape, num_classes, width)
'''


@pytest.mark.slow
def test_a_target_transformer_student_trains_its_attention_by_the_jacobian_term(cli, tmp_path):
    """Jacobian term only (alpha=1, no distillation, no labels): loss/jacobian is logged non-zero every step,
    and the attention's input projection moved, so the term's gradient reached it through the double backward."""
    import importlib.util
    import json
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "mytransformer.py").write_text(USER_TRANSFORMER)
    (tmp_path / "myconf" / "student").mkdir(parents=True)
    (tmp_path / "myconf" / "student" / "transformer.yaml").write_text("_target_: mytransformer.transformer\nwidth: 16\n")
    run_dir = tmp_path / "run"
    result = cli("train", "--config-dir", str(tmp_path / "myconf"), "student=transformer", "jacobian=top1",
                 "alpha=1.0", "hard_weight=0", "trainer.epochs=1", "teacher.epochs=1", "trainer.threads=1",
                 "trainer.log_every_steps=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    jacobian = [e.value for e in events.Scalars("loss/jacobian")]
    steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
    assert len(jacobian) == steps and all(math.isfinite(v) and v > 0 for v in jacobian)

    spec = importlib.util.spec_from_file_location("mytransformer", tmp_path / "mytransformer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    initial = module.transformer((1, 8, 8), 10).state_dict()
    trained = torch.load(run_dir / "student.pt", weights_only=True)["state_dict"]
    key = "encoder.layers.0.self_attn.in_proj_weight"
    assert trained[key].shape == initial[key].shape and (trained[key] - initial[key]).abs().max() > 1e-4
