"""The console script's surface: command list, per-command Hydra apps, configs from the checkout and a wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from jacdistill_cli.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_commands_without_importing_torch():
    code = ("import sys; from jacdistill_cli.cli import main; main(['--help']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("train", "teacher", "check", "bench"):
        assert f"  {name} " in result.stdout


def test_unknown_command_is_one_line(cli):
    result = cli("trian")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"jacdistill: error: unknown command 'trian'; the commands are: {', '.join(COMMANDS)}"]


def test_each_command_is_its_own_hydra_app(cli):
    result = cli("train", "--help")
    assert result.returncode == 0
    for group in ("dataset", "teacher", "student", "loss", "jacobian", "optim", "trainer"):
        assert f"{group}:" in result.stdout
    job = cli("train", "--cfg", "job", "alpha=0.25", "jacobian=exact")
    assert job.returncode == 0, job.stderr
    assert "alpha: 0.25" in job.stdout and "strategy: auto" in job.stdout
    teacher = cli("teacher", "--cfg", "job")
    assert teacher.returncode == 0 and "alpha" not in teacher.stdout


def test_default_config_composes_with_both_terms():
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        cfg = compose(config_name="train")
    assert cfg.dataset.name == "digits" and cfg.loss.name == "kl" and cfg.jacobian.name != "none"
    assert 0 < cfg.alpha < 1 and cfg.temperature > 0 and cfg.hard_weight == 0
    for key in ("alpha", "temperature", "hard_weight", "seed"):
        assert key in cfg
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        baseline = compose(config_name="train", overrides=["loss=none", "jacobian=none", "hard_weight=1"])
    assert (baseline.loss.name, baseline.jacobian.name, baseline.hard_weight) == ("none", "none", 1)


def test_ce_only_baseline_objective_is_cross_entropy():
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from objectives import objective as Objective

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    inputs, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    objective = Objective("none", 4.0, 0.0, 1.0, OmegaConf.create({"name": "none"}))
    logits, terms = objective(student, teacher, inputs, labels)
    assert terms["total"].item() == pytest.approx(F.cross_entropy(logits, labels).item())
    assert terms["distill"].item() == 0 and terms["jacobian"].item() == 0


@pytest.mark.slow
def test_configs_load_from_a_built_wheel(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(wheel_dir), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheel_dir.glob("jacdistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jacdistill_cli/conf/train.yaml" in names and "jacdistill_cli/conf/jacobian/exact.yaml" in names
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                                str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    # The checkout's editable install must not answer for the wheel: drop its import hooks.
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in getattr(h, '__module__', '')]\n"
        "import jacdistill_cli, jacdistill_cli.commands.train\n"
        f"assert jacdistill_cli.commands.train.__file__.startswith({str(target)!r}), jacdistill_cli.commands.train.__file__\n"
        "from hydra import compose, initialize_config_module\n"
        "with initialize_config_module(config_module='jacdistill_cli.conf', version_base='1.3'):\n"
        "    cfg = compose(config_name='train', overrides=['jacobian=exact'])\n"
        "print(cfg.jacobian.name, cfg.dataset.name)\n"
        "from jacdistill_cli.cli import main\n"
        "sys.exit(main(['train', '--cfg', 'job', 'alpha=0.125']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("exact digits") and "alpha: 0.125" in result.stdout
