"""`jacdistill check`: passes on the default configuration, fails (exit 1) on planted faults."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from jacdistill_cli.engine.methods import Matched, Top1

sys.path.insert(0, str(Path(__file__).parent))
from run_inprocess import run_command  # noqa: E402

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
    import torch

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
