"""The console script's surface: command list, per-command Hydra apps, configs from the checkout and a wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from jacdistill_cli.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_top_level_help_lists_commands_without_importing_torch():
    code = ("import sys; from jacdistill_cli.cli import main; main(['--help']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("train", "teacher", "check", "bench"):
        assert f"  {name} " in result.stdout


@pytest.mark.slow
def test_unknown_command_is_one_line(cli):
    result = cli("trian")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"jacdistill: error: unknown command 'trian'; the commands are: {', '.join(COMMANDS)}"]


COMPLETE = r"""
eval "$(jacdistill completion bash)"
complete -p jacdistill
ask() {  # what bash offers for the line "$1", the cursor at its end
    COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$COMP_LINE"
    [[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=(); _jacdistill_complete
    echo "${COMPREPLY[*]}"
}
ask "jacdistill t"
ask "jacdistill completion "
ask "jacdistill train jacobian=e"
ask "jacdistill train alpha=0.3 trainer.ep"
"""


@pytest.mark.slow
def test_bash_completes_the_commands_then_each_commands_overrides_through_hydra(tmp_path):
    """In a real bash: the script registers one completion for `jacdistill`; the first word completes to
    a command, the next ones to the command's overrides as Hydra completes them."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", COMPLETE], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "complete -o default -o nospace -F _jacdistill_complete jacdistill",
        "train teacher", "bash zsh", "jacobian=exact", "trainer.epochs="]
    assert not list(tmp_path.iterdir())  # asking writes nothing


def test_hydra_completion_install_is_refused_in_one_line(capsys):
    """Hydra's own `-sc install=bash` would bind completion to the words `jacdistill` and `train`."""
    assert main(["train", "-sc", "install=bash"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['jacdistill train: error: -sc install=bash is not allowed: it would complete `train` as a '
                   'command of its own; use eval "$(jacdistill completion bash)", which completes the commands '
                   'and their overrides']
    assert main(["completion", "fish"]) == 2
    assert capsys.readouterr().err.startswith("jacdistill completion: error: shell=fish is not allowed: ")
    assert main(["completion", "zsh"]) == 0
    assert "bashcompinit" in capsys.readouterr().out


@pytest.mark.slow
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
    from helpers import objective as Objective
    from omegaconf import OmegaConf

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
