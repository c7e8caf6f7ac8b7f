"""`jacdistill check`: passes on the default configuration, fails (exit 1) on planted faults."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from jacdistill_cli.engine.methods import Matched, Top1
from jacdistill_cli.proofs import vanishing
from jacdistill_cli.proofs.verify import check_method

sys.path.insert(0, str(Path(__file__).parent))
from helpers import run_command

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ROWS = ("top1", "target", "loss", "exact", "projected", "noise")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_check_exits_0_on_the_default_configuration_for_every_method(cli, tmp_path):
    result = cli("check", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for method in ROWS:
        row = next(line for line in lines if line.split()[:1] == [method])
        assert row.endswith("ok"), row
    assert ("the common mistake, the student's gradient taken with retain_graph=True instead of "
            "create_graph=True: 0 of 4 student parameters receive a gradient") in result.stdout
    assert "all checks passed" in result.stdout
    report = json.loads((tmp_path / "run" / "check.json").read_text())
    assert report["passed"] and [m["method"] for m in report["methods"]] == list(ROWS)
    for method in report["methods"]:
        assert method["jacobian_error_student"] is None or method["jacobian_error_student"] < 1e-9
        assert set(method["dependent"]) <= set(method["receiving"]) and method["dependent"]
    # A ReLU MLP's input-gradients do not depend on its biases; the noise term depends on the hidden bias (which
    # ReLUs are active along x + sigma xi), not on the last one, which cancels in D(x + sigma xi) - D(x).
    exact = next(m for m in report["methods"] if m["method"] == "exact")
    assert exact["without_effect"] == ["1.bias", "3.bias"]
    noise = next(m for m in report["methods"] if m["method"] == "noise")
    assert noise["without_effect"] == ["3.bias"] and noise["dependent"] == ["1.weight", "1.bias", "3.weight"]
    # Its term against the sigma -> 0 limit on the same draws, from jvp: within tolerance at the smallest sigma.
    assert set(noise["noise_limit"]) == {"0.001", "0.0001", "1e-05"} and noise["noise_limit"]["1e-05"] < 1e-5
    assert any(line.startswith("noise: the term against its sigma -> 0 limit") for line in lines)


class DetachedStudent(Top1):
    """top1 with the student's gradient cut from the graph (the question's mistake, hidden)."""

    def gradients(self, p) -> Matched:
        matched = super().gradients(p)
        return Matched(matched.student.detach(), matched.teacher, matched.vectors, matched.joint)


class WrongValues(Top1):
    """top1 whose student gradient is slightly off (still differentiable)."""

    def gradients(self, p) -> Matched:
        matched = super().gradients(p)
        return Matched(matched.student * 1.001, matched.teacher, matched.vectors, matched.joint)


@pytest.mark.parametrize("fault,failure", [
    (DetachedStudent, "parameter(s) the term depends on receive no gradient"),
    (WrongValues, "student Jacobian differs from torch.func.jacrev"),
])
def test_check_exits_1_on_a_planted_fault(fault, failure, tmp_path, capsys):
    """A user's method (a `_target_` outside the package) is checked as configured, like a shipped one."""
    name = f"planted_{fault.__name__}"
    with pytest.raises(SystemExit) as exit:
        run_command("check", ["student=cnn", "jacobian=top1", f"jacobian._target_={__name__}.{fault.__name__}",
                              f"jacobian.name={name}", f"methods=[top1,{name}]", "features=none"], tmp_path)
    assert exit.value.code == 1
    out = capsys.readouterr().out
    assert f"{name}: FAILED: " in out and failure in out
    assert f"checks FAILED for: {name}" in out
    report = json.loads((tmp_path / "check.json").read_text())
    by_name = {m["method"]: m for m in report["methods"]}
    assert by_name["top1"]["passed"] and not by_name[name]["passed"]
    assert not report["passed"]


@pytest.mark.parametrize("batchnorm", ["running", "coupled"])
def test_check_passes_with_every_batchnorm_mode(batchnorm, tmp_path, capsys):
    run_command("check", ["student=cnn", "jacobian=exact", f"jacobian.batchnorm={batchnorm}",
                          "methods=[exact,top1]", "features=none"], tmp_path)
    assert "all checks passed" in capsys.readouterr().out
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["methods"][0]["settings"]["batchnorm"] == batchnorm


@pytest.mark.parametrize("override,message", [
    ("methods=[top1,nope]", "methods=['top1', 'nope'] is not allowed: it must be all or a list of"),
    ("batch_size=1", "batch_size=1 is not allowed: it must be an integer >= 2"),
])
def test_check_refuses_bad_settings_in_one_line(override, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        run_command("check", [override], tmp_path)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "check.json").exists()


def test_check_under_bf16_reports_each_methods_error_within_its_tolerance(tmp_path, capsys):
    """`check trainer.precision=bf16`: the input-gradients computed by float32 copies under autocast(bf16)
    against the float64 reference, a column and a stated tolerance; passes on a CNN student with BatchNorm."""
    from jacdistill_cli.proofs.verify import PRECISION_TOLERANCE

    run_command("check", ["student=cnn", "methods=[top1,exact]", "features=none", "trainer.precision=bf16"],
                tmp_path)
    out = capsys.readouterr().out
    assert "error at bf16" in out and f"tolerance {PRECISION_TOLERANCE['bf16']}" in out
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["passed"]
    for method in report["methods"]:
        assert method["precision"] == "bf16" and 0 < method["precision_error"] <= PRECISION_TOLERANCE["bf16"]


def test_finite_differences_forgive_rounding_but_not_a_wrong_derivative():
    """A derivative small against its term (a LayerNorm bias deep in a transformer) disagrees with central
    differences by float64's rounding, relatively far above the tolerance; a wrong one by more."""
    from jacdistill_cli.proofs.finite_differences import beyond_rounding, directional_check
    from jacdistill_cli.proofs.verify import FD_RELATIVE_TOLERANCE

    p = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    value = lambda: float(1e6 + 1e-3 * p.detach().sum() + torch.sin(p.detach()).sum() * 1e-3)  # noqa: E731
    right = [torch.full_like(p, 1e-3 * (1 + torch.cos(p.detach()).item()))]
    analytic, numeric, error = directional_check(value, [p], right, torch.Generator().manual_seed(0), 1e6)
    assert error > FD_RELATIVE_TOLERANCE and not beyond_rounding(analytic, numeric, 1e6)
    wrong = [2 * right[0]]
    analytic, numeric, error = directional_check(value, [p], wrong, torch.Generator().manual_seed(0), 1e6)
    assert error > FD_RELATIVE_TOLERANCE and beyond_rounding(analytic, numeric, 1e6)


# ---------------------------------------------------------------------------------------------
# Networks whose input-gradients vanish at initialisation (a zero-initialised last layer)
# ---------------------------------------------------------------------------------------------

def torchvision_vit(input_shape, num_classes, image_size=32, patch_size=8, num_layers=2, hidden_dim=32, num_heads=2,
                    mlp_dim=64):
    """A `_target_` builder of torchvision's VisionTransformer, whose classification head is zero-initialised."""
    import torchvision

    return torchvision.models.VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                                                num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                                                num_classes=num_classes)


# The student a torchvision ViT on fake 3x32x32 data, the teacher the default CNN.
TORCHVISION_VIT = ["dataset=fake", f"student._target_={__name__}.torchvision_vit", "student.name=torchvision_vit",
                   "~student.hidden", "~student.batchnorm"]


@pytest.mark.slow
def test_check_passes_every_method_on_a_torchvision_vit_whose_head_is_zero_initialised(tmp_path, capsys):
    """At the fresh student every input-gradient is 0 (the head's weight is 0): the check says so, names the head,
    and checks at the head perturbed by 0.02 N(0, 1) (seed 0), where every method passes and the retain_graph
    mistake still trains no parameter."""
    assert run_command("check", [*TORCHVISION_VIT, "batch_size=4"], tmp_path) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert ("student: its input-gradients vanish on this batch (largest entry 0.0e+00 <= 1.0e-08): heads.head.weight "
            "is all zero (zero-initialised) and every input-gradient passes through it; checked with 0.02 x N(0, 1) "
            "added to it (seed 0), where the largest is ") in out
    for method in ROWS:
        row = next(line for line in lines if line.split()[:1] == [method])
        assert row.endswith("ok"), row
    assert "all checks passed" in out
    report = json.loads((tmp_path / "check.json").read_text())
    (perturbed,) = report["perturbed"]
    assert (perturbed["network"], perturbed["parameters"], perturbed["zero_initialised"], perturbed["std"],
            perturbed["seed"], perturbed["largest_gradient"]) == ("student", ["heads.head.weight"], True, 0.02, 0, 0.0)
    assert perturbed["largest_gradient_after"] > 1e-3
    parameters = report["methods"][0]["parameters"]
    for method in report["methods"]:
        assert "heads.head.weight" in method["receiving"] and set(method["dependent"]) <= set(method["receiving"])
        assert len(method["receiving"]) >= 30
    # The mistake's row: its term trains none of the parameters every method above trains.
    assert report["retain_graph_mistake"] == {"receiving": 0, "parameters": parameters}
    assert (f"create_graph=True: 0 of {parameters} student parameters receive a gradient") in out


@pytest.mark.slow
@pytest.mark.parametrize("fault,failure", [
    (DetachedStudent, "parameter(s) the term depends on receive no gradient"),
    (WrongValues, "student Jacobian differs from torch.func.jacrev"),
])
def test_check_still_fails_a_planted_fault_on_the_perturbed_torchvision_vit(fault, failure, tmp_path, capsys):
    name = f"planted_{fault.__name__}"
    with pytest.raises(SystemExit) as exit:
        run_command("check", [*TORCHVISION_VIT, "batch_size=2", "jacobian=top1", f"jacobian.name={name}",
                              f"jacobian._target_={__name__}.{fault.__name__}", f"methods=[{name}]"], tmp_path)
    assert exit.value.code == 1
    out = capsys.readouterr().out
    assert f"{name}: FAILED: " in out and failure in out
    assert json.loads((tmp_path / "check.json").read_text())["perturbed"][0]["parameters"] == ["heads.head.weight"]


def zero_head_mlp() -> nn.Module:
    """Flatten, Linear(16, 6), Tanh, Linear(6, 3) whose last Linear is zero-initialised, weight and bias."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3))
    nn.init.zeros_(network[3].weight)
    nn.init.zeros_(network[3].bias)
    return network


def small_batch() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Inputs [8, 1, 4, 4], labels [8] and a frozen linear teacher."""
    generator = torch.Generator().manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).requires_grad_(False)
    return torch.randn(8, 1, 4, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator), teacher


def top1_settings(target: str = "jacdistill_cli.engine.methods.Top1", name: str = "top1"):
    return OmegaConf.create({"_target_": target, "name": name, "normalize": True, "squared": True,
                             "batchnorm": "batch", "of": "logits"})


def test_a_zero_initialised_last_layer_is_named_and_perturbed_as_documented():
    """The last weight alone brings the input-gradients back (its bias does not): it alone gets 0.02 N(0, 1),
    drawn by a generator seeded with the check's seed; a network whose input-gradients do not vanish is left as
    it is."""
    inputs, _, teacher = small_batch()
    student = zero_head_mlp()
    moved, perturbation = vanishing.proof_point(student, inputs, 3, "student")
    assert (perturbation.parameters, perturbation.zero_initialised) == (["3.weight"], True)
    assert perturbation.largest_gradient == 0 and perturbation.largest_gradient_after > 1e-3
    expected = 0.02 * torch.randn((3, 6), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(moved[3].weight, expected.float())
    for name, p in student.named_parameters():
        if name != "3.weight":
            assert torch.equal(dict(moved.named_parameters())[name], p)
    assert not student[3].weight.any(), "the network itself is left as it was"
    assert torch.equal(vanishing.proof_point(student, inputs, 3, "student")[0][3].weight, moved[3].weight)
    assert not torch.equal(vanishing.proof_point(student, inputs, 4, "student")[0][3].weight, moved[3].weight)
    assert vanishing.proof_point(teacher, inputs, 3, "teacher") == (teacher, None)


def test_zero_layers_in_series_are_perturbed_together_and_a_dead_network_is_said_to_stay_dead():
    inputs, _, _ = small_batch()
    series = zero_head_mlp()
    nn.init.zeros_(series[1].weight)   # neither zero weight alone brings the input-gradients back
    _, perturbation = vanishing.proof_point(series, inputs, 0, "student")
    assert (perturbation.parameters, perturbation.zero_initialised) == (["1.weight", "3.weight", "3.bias"], False)
    assert perturbation.largest_gradient_after > perturbation.tolerance
    dead = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
    nn.init.constant_(dead[1].bias, -100.0)   # every ReLU off: no perturbation of 0.02 turns one on
    _, perturbation = vanishing.proof_point(dead, inputs, 0, "student")
    assert perturbation.parameters == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert "where they still vanish (0.0e+00): the checks cannot tell right from wrong" in perturbation.line()


def test_a_zero_head_fails_every_check_where_it_is_drawn_and_the_perturbed_point_tells_right_from_wrong():
    """At the zero head, top1's derivative with respect to the head is not defined (autograd 0, central
    differences a large number); at the perturbed head top1 passes and planted faults still fail."""
    inputs, labels, teacher = small_batch()
    student = zero_head_mlp()
    at_zero = check_method(top1_settings(), student, teacher, inputs, labels, 0)
    assert "1 parameter(s) the term depends on receive no gradient: 3.weight" in at_zero.failures
    moved, teacher, perturbations = vanishing.proof_networks(student, teacher, inputs, 0)
    assert [p.network for p in perturbations] == ["student"]
    assert check_method(top1_settings(), moved, teacher, inputs, labels, 0).passed
    for fault, failure in ((DetachedStudent, "parameter(s) the term depends on receive no gradient"),
                           (WrongValues, "student Jacobian differs from torch.func.jacrev")):
        report = check_method(top1_settings(f"{__name__}.{fault.__name__}", fault.__name__), moved, teacher, inputs,
                              labels, 0)
        assert any(failure in f for f in report.failures), report.failures


def test_the_proofs_functions_are_at_most_60_lines():
    import ast

    import jacdistill_cli.proofs

    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(Path(jacdistill_cli.proofs.__file__).parent.glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long
