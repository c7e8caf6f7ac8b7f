"""timm's models as teacher and student: built by name with timm's settings, loaded from a local weights file
the way timm loads its published weights (each adaptation logged), another architecture's file refused, and
the Jacobian step proven on them by check's machinery."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from jacdistill_cli.config.registry import shipped_node
from jacdistill_cli.errors import UsageError
from jacdistill_cli.proofs.verify import check_method
from jacdistill_cli.zoo.models import architecture, build_model

timm = pytest.importorskip("timm")

# Small versions of each family (timm's own keyword arguments), for the proofs.
SMALL = {
    "vit_tiny_patch16_224": {"patch_size": 2, "options": {"embed_dim": 16, "depth": 1, "num_heads": 2}},
    "deit_tiny_patch16_224": {"patch_size": 2, "options": {"embed_dim": 16, "depth": 1, "num_heads": 2}},
    # Layer scale 1: timm's default 1e-6 leaves each block a 1e-6 share of the input-gradient.
    "convnext_atto": {"patch_size": 1, "options": {"dims": [8, 8, 8, 8], "depths": [1, 1, 1, 1], "ls_init_value": 1.0}},
    "resnet18": {"patch_size": None, "options": {"layers": [1, 1, 1, 1], "base_width": 64, "channels": [4, 4, 4, 4]}},
}


pytestmark = pytest.mark.usefixtures("one_thread")


VIT = {"arch": "vit_tiny_patch16_224", "patch_size": 2}


def spec(role: str, **settings) -> dict:
    node = OmegaConf.merge(shipped_node(role, "timm"), settings)
    return architecture(node)


# The README's list: each at a size that fits 8x8 (digits) or 32x32 inputs, as student and as teacher.
TESTED = [
    ("vit_tiny_patch16_224", {"patch_size": 2}, (1, 8, 8)),
    ("vit_tiny_patch16_224", {"patch_size": 4}, (3, 32, 32)),
    ("deit_tiny_patch16_224", {"patch_size": 4}, (3, 32, 32)),
    ("deit_tiny_patch16_224", {"patch_size": 2}, (1, 8, 8)),
    ("convnext_atto", {"patch_size": 1}, (1, 8, 8)),
    ("convnext_atto", {"patch_size": None}, (3, 32, 32)),
    ("resnet18", {"patch_size": None}, (1, 8, 8)),
    ("resnet10t", {"patch_size": None}, (3, 32, 32)),
]


@pytest.mark.parametrize("arch,settings,shape", TESTED)
def test_timm_options_build_the_model_for_the_dataset(arch, settings, shape):
    model = build_model(spec("student", arch=arch, **settings), shape, 10, role="student")
    logits = model(torch.randn(2, *shape))
    assert logits.shape == (2, 10)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == shape[0]
    assert model.jacobian_gate is not None


def test_timm_keyword_settings_reach_the_model():
    model = build_model(spec("student", arch="vit_tiny_patch16_224", img_size=16, patch_size=4, drop_path_rate=0.1,
                             options={"embed_dim": 16, "depth": 2, "num_heads": 2}), (1, 8, 8), 5, role="student")
    assert model.patch_embed.img_size == (16, 16) and model.patch_embed.patch_size == (4, 4)
    assert model.pos_embed.shape == (1, 17, 16) and model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    # Attention is Jacobian-ready: timm's fused_attn switch reads false only in a second-order pass.
    attention = model.blocks[0].attn
    assert type(attention).__name__ == "JacobianAttention" and attention.fused_attn is True
    with model.jacobian_gate.second_order_pass():
        assert attention.fused_attn is False
    assert attention.fused_attn is True


@pytest.mark.parametrize("key,value,allowed", [
    ("arch", "no_such_model", "it must name a model of timm"),
    ("img_size", 0, "it must be null or an integer >= 1"),
    ("patch_size", 2, "resnet18 of timm takes no keyword patch_size"),
    ("drop_path_rate", 2.0, "it must be a number in [0, 1]"),
    ("weights", "/nonexistent/w.pth", "no such file"),
])
def test_a_bad_timm_setting_is_one_line(key, value, allowed):
    with pytest.raises(UsageError) as refused:
        build_model(spec("student", **{key: value}), (1, 8, 8), 10, role="student")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"student.{key}=") and allowed in message


def test_a_weights_file_in_timms_format_loads_with_each_adaptation_logged(tmp_path, caplog):
    """A file written by timm for 3-channel 32x32 images, patch size 4 and 100 classes, loaded into a 1-channel
    8x8, patch size 2, 10-class model: new head, input convolution summed over channels, patch embedding and
    position embeddings resampled, each in one line; every other tensor is the file's."""
    small = {"embed_dim": 16, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=100, img_size=32, patch_size=4, **small)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="jacdistill"):
        model = build_model(spec("student", **VIT, weights=str(path), options=small), (1, 8, 8), 10, role="student")
    lines = [r.getMessage() for r in caplog.records if r.name == "jacdistill"]
    assert any("a new head (head) for 10 classes" in line and "classifies 100" in line for line in lines), lines
    assert any("input convolution (patch_embed.proj) adapted from 3 to 1 channel" in line for line in lines), lines
    assert any(line.startswith("vit_tiny_patch16_224: weights: pos_embed resampled from [1, 65, 16] to [1, 17, 16]")
               for line in lines), lines
    assert any("patch_embed.proj.weight resampled" in line for line in lines), lines
    loaded, original = model.state_dict(), source.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "cls_token", "norm.weight"):
        assert torch.equal(loaded[key], original[key]), key
    assert loaded["head.weight"].shape == (10, 16)
    # The patch embedding summed over the file's 3 channels (timm's adapt_input_conv), then resampled.
    assert model.patch_embed.proj.weight.shape == (16, 1, 2, 2)


def test_a_weights_file_of_the_same_shape_loads_unchanged(tmp_path, caplog):
    torch.manual_seed(0)
    options = SMALL["resnet18"]["options"]
    source = timm.create_model("resnet18", num_classes=10, in_chans=1, **options)
    torch.save(source.state_dict(), tmp_path / "resnet.pth")
    with caplog.at_level(logging.INFO, logger="jacdistill"):
        model = build_model(spec("teacher", weights=str(tmp_path / "resnet.pth"), options=options), (1, 8, 8), 10,
                            role="teacher")
    assert [r.getMessage() for r in caplog.records if "weights:" in r.getMessage()] == []
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_weights_file_of_another_architecture_is_refused_in_one_line(tmp_path):
    options = SMALL["resnet18"]["options"]
    torch.save(timm.create_model("resnet18", num_classes=10, **options).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UsageError) as refused:
        build_model(spec("student", **VIT, weights=str(tmp_path / "resnet.pth"), options=SMALL["vit_tiny_patch16_224"]
                         ["options"]), (1, 8, 8), 10, role="student")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"student.weights='{tmp_path / 'resnet.pth'}'")
    assert "its tensors are not those of vit_tiny_patch16_224" in message


def small(role: str, arch: str, shape=(3, 8, 8)):
    torch.manual_seed(0)
    return build_model(spec(role, arch=arch, **SMALL[arch]), shape, 3, role=role)


def small_batch(shape=(3, 8, 8), size: int = 4):
    drawn = torch.Generator().manual_seed(0)
    return torch.randn(size, *shape, generator=drawn), torch.randint(0, 3, (size,), generator=drawn)


def test_check_passes_on_a_timm_vit_student_and_a_timm_resnet_teacher():
    """All of check's proofs of top1: both input-gradients against jacrev (float64), every parameter the term
    depends on receiving autograd's gradient, equal to finite differences'."""
    report = check_method(OmegaConf.load("conf/jacobian/top1.yaml"), small("student", "vit_tiny_patch16_224").train(),
                          small("teacher", "resnet18").eval(), *small_batch(), 0)
    assert report.passed, report.failures
    assert report.jacobian_error_student < 1e-9 and report.jacobian_error_teacher < 1e-9
    assert any("attn.qkv.weight" in name for name in report.receiving)


@pytest.mark.parametrize("student,teacher", [("convnext_atto", "deit_tiny_patch16_224"), ("resnet18", "convnext_atto")])
def test_timm_students_and_teachers_input_gradients_equal_jacrevs(student, teacher):
    """The training step's input-gradients of a timm CNN student in train mode (train-mode BatchNorm for the
    ResNet) and of a timm teacher, against check's jacrev reference in float64; the term trains the student."""
    from jacdistill_cli.config.registry import build
    from jacdistill_cli.engine.losses import no_distillation
    from jacdistill_cli.engine.objective import distillation_objective
    from jacdistill_cli.proofs.verify import reference_gradients, relative_error

    nets = [small("student", student).double().train(), small("teacher", teacher).double().eval()]
    inputs, labels = small_batch()
    inputs = inputs.double()
    method = build("jacobian", OmegaConf.load("conf/jacobian/top1.yaml"))
    _, terms, matched = distillation_objective(no_distillation, 1.0, 0.0, method).evaluate(*nets, inputs, labels)
    vectors = matched.vectors.detach()
    for net, gradients in zip(nets, (matched.student, matched.teacher)):
        assert relative_error(gradients, reference_gradients(net, inputs, vectors, method.batchnorm)) < 1e-9
    terms["jacobian"].backward()
    assert sum(bool(p.grad is not None and p.grad.ne(0).any()) for p in nets[0].parameters()) > 10
