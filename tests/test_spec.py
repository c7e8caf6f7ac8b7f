"""The run spec: every key a command composes is read by its builder (or refused), the teacher cache's keys are
what they were, each command's --help lists its own groups, a sweep is checked whole before its first job, and
a part of weight 0 is not computed."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from helpers import run_command, run_in_process, teacher_cache_path
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from jacdistill_cli.cli import main
from jacdistill_cli.config.resolvers import register_resolvers
from jacdistill_cli.spec.build import teacher_run_spec, train_spec
from jacdistill_cli.spec.reader import Reader, leaf_keys
from jacdistill_cli.spec.sweep import checked_jobs, expanded, same_runs, task_config
from jacdistill_cli.spec.tools import bench_spec, check_spec, evaluate_spec

register_resolvers()
BUILDERS = {"train": train_spec, "teacher": teacher_run_spec, "check": check_spec, "bench": bench_spec,
            "evaluate": evaluate_spec}


def composed(command: str, *overrides: str):
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        return compose(config_name=command, overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("command,overrides", [
    ("train", []), ("teacher", []), ("check", []), ("bench", []), ("evaluate", ["checkpoint=student.pt"]),
    ("train", ["experiment=digits_fewshot"]), ("train", ["features=hint", "robustness=digits", "explain=digits"]),
    ("train", ["teacher.training=adversarial", "loss=dkd", "optim=sgd", "optim.schedule=multistep",
               "optim.milestones=[2]"]),
])
def test_every_key_a_command_composes_is_read_by_its_spec(command, overrides):
    """What `--cfg job` shows for the command: each key read where the spec takes it, or refused in one line."""
    cfg, choices = task_config(composed(command, *overrides))
    reader = Reader(cfg)
    BUILDERS[command](cfg, choices, reader)
    assert reader.unread() == [], f"{command} composes keys its spec never reads"
    assert len(leaf_keys(cfg)) > 5


@pytest.mark.parametrize("override,line", [
    ("trainer.epochs=50", "trainer.epochs=50 is not allowed: there is no such setting; did you mean teacher.epochs?"),
    ("dataset.samples_per_class=5", "dataset.samples_per_class=5 is not allowed: jacdistill teacher trains on the "
                                    "full training split; use teacher.samples_per_class=5"),
])
def test_jacdistill_teacher_refuses_what_it_would_not_use(override, line):
    status, stderr = run_in_process(["teacher", override])
    assert status == 2 and len(stderr.strip().splitlines()) == 1
    assert stderr.strip().startswith(f"jacdistill teacher: error: {line}")


# The teacher cache's file names as the code before the run spec computed them, for these train overrides (each
# with cache_dir=/cache): a teacher trained then is found now.
CACHED_BEFORE = {
    "": "cnn-digits-c2412ef2469b0329.pt", "dataset=fake": "cnn-fake-cbaa13b619d672f6.pt",
    "teacher=resnet20 dataset=cifar100 dataset.root=/data": "resnet_cifar-cifar100-d20df49f74c9fb88.pt",
    "teacher.training=adversarial": "cnn-digits-d58bea5095ccf844.pt",
    "teacher.training=trades teacher.adversarial.norm=l2 teacher.adversarial.eps=1.0":
        "cnn-digits-29976c8fc5322a23.pt",
    "teacher.samples_per_class=10": "cnn-digits-a2831b642631248c.pt",
    "dataset.samples_per_class=5 seed=3": "cnn-digits-f52822d470034717.pt",
    "teacher=vit dataset=fake": "vit-fake-4a532cefcde08c07.pt",
    "teacher=wrn_40_2 dataset=cifar10 dataset.root=/data": "wrn-cifar10-587d8751254f9677.pt",
    "teacher=torchvision dataset=fake": "torchvision-fake-6703d560affd77b4.pt",
    "teacher=timm teacher.arch=resnet18 dataset=fake": "timm-fake-88a4c2e2fe444636.pt",
    "teacher=lenet5 teacher.lr=0.01 teacher.epochs=5": "lenet5-digits-ced7bb5b203f5158.pt",
    "teacher.weight_decay=0 teacher.lr=1": "cnn-digits-54d29a7abf1e7e8f.pt",
}


@pytest.mark.parametrize("overrides", list(CACHED_BEFORE))
def test_every_teacher_cache_key_is_what_it_was(overrides):
    cfg, _ = task_config(composed("train", *overrides.split(), "cache_dir=/cache"))
    assert teacher_cache_path(cfg).name == CACHED_BEFORE[overrides]


def help_of(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as done:
        main([*args, "--help"])   # Hydra exits after printing the help
    assert done.value.code in (0, None)
    return out.getvalue()


@pytest.mark.parametrize("command,groups", [
    ("train", ["dataset", "teacher", "student", "loss", "jacobian", "optim", "trainer", "features", "robustness",
               "explain", "crd_pair", "recipe", "experiment"]),
    ("teacher", ["dataset", "teacher"]), ("check", ["dataset", "teacher", "student", "jacobian", "features"]),
    ("bench", ["dataset", "bench_pair", "comparison"]), ("evaluate", ["dataset", "robustness", "explain"]),
    ("report", []),
])
def test_each_commands_help_lists_the_groups_it_uses_and_no_others(command, groups):
    text = help_of(command)
    listed = text.split("== Config groups ==")[1].split("== Config ==")[0]
    found = [line.split(":")[0] for line in listed.strip().splitlines()[2:] if ": " in line]
    assert sorted(found) == sorted(groups), found
    assert "jacobian: exact, loss, noise, none, projected, target, top1" in text or "jacobian" not in groups


def test_a_users_config_dir_options_are_listed_in_help(tmp_path):
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "tiny.yaml").write_text("_target_: mymodels.tiny\nwidth: 8\n")
    listed = help_of("train", "--config-dir", str(tmp_path))
    assert "tiny" in next(line for line in listed.splitlines() if line.startswith("student: "))


def compose_jobs(command: str, *arguments: str):
    """Every job of `jacdistill COMMAND -m ARGUMENTS` checked, as jacdistill's sweeper checks them."""
    base = composed(command, *[a.split("=")[0] + "=" + a.split("=")[1].split(",")[0] for a in arguments])
    params = OmegaConf.to_container(base.hydra.sweeper.params) if base.hydra.sweeper.params else {}
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        return checked_jobs(command, expanded(params, list(arguments)),
                            lambda job: compose(config_name=command, overrides=job, return_hydra_config=True))


def test_a_sweep_with_a_bad_value_is_refused_naming_its_job_before_any_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, stderr = run_in_process(["train", "-m", "alpha=0.3,1.3", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert status == 2 and stderr.strip().splitlines() == [
        "jacdistill train: error: job 1 of the sweep (alpha=1.3) is refused, so no job runs: alpha=1.3 is not "
        "allowed: alpha must be a number in [0, 1]"]
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "outputs").exists()
    status, stderr = run_in_process(["train", "-m", "jacobian=top1,exactt", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "job 1 of the sweep (jacobian=exactt)" in stderr and "Could not find 'jacobian/exactt'" in stderr


def test_jobs_that_would_be_the_same_run_are_named_before_the_sweep():
    jobs = compose_jobs("train", "alpha=0,0.3", "jacobian=top1,exact")
    assert [len(j.overrides) for j in jobs] == [2, 2, 2, 2]
    assert same_runs(jobs) == ["jobs 0 (alpha=0,jacobian=top1), 1 (alpha=0,jacobian=exact) are the same run: alpha=0 "
                               "gives the Jacobian term weight 0, so the jacobian settings make no difference; each "
                               "is trained and reported"]
    assert same_runs(compose_jobs("train", "alpha=0.1,0.3", "jacobian=top1,exact")) == []


def test_a_jacobian_term_of_weight_0_is_not_computed(tmp_path, caplog):
    """alpha=0 jacobian=exact trains as jacobian=none: the same metrics, and no Jacobian computed."""
    caplog.set_level("INFO", logger="jacdistill")
    fast = ["trainer.epochs=1", "teacher.epochs=1", "trainer.threads=1", "alpha=0", f"cache_dir={tmp_path / 'c'}"]
    run_command("train", [*fast, "jacobian=exact"], tmp_path / "exact")
    assert "alpha=0 gives the Jacobian term weight 0: jacobian=exact is not computed" in caplog.text
    run_command("train", [*fast, "jacobian=none"], tmp_path / "none")
    exact, none = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("exact", "none"))
    for key in ("test_accuracy", "agreement", "jacobian_cosine", "val_accuracy", "explanation_rank_correlation"):
        assert exact[key] == none[key], key


def test_the_spec_is_frozen_and_reads_nothing_below_it():
    cfg, choices = task_config(composed("train"))
    spec = train_spec(cfg, choices)
    with pytest.raises(AttributeError):
        spec.seed = 1
    assert spec.student.architecture["name"] == "mlp" and spec.teacher.name == "cnn"
    assert spec.loop.log_every_steps == 50 and spec.objective.idle == ()
    assert isinstance(spec.config, dict) and "hydra" not in spec.config


def test_the_readme_add_a_model_example_trains_as_teacher_and_student_and_evaluates(tmp_path, monkeypatch):
    """A user's module and group files, as the README writes them (no `name`): teacher, student, evaluate."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n\n\ndef tiny(input_shape, num_classes, width=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(width), nn.ReLU(), nn.Linear(width, num_classes))\n")
    for role in ("teacher", "student"):
        (tmp_path / "myconf" / role).mkdir(parents=True)
        (tmp_path / "myconf" / role / "tiny.yaml").write_text("_target_: mymodels.tiny\nwidth: 8\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["train", "--config-dir", str(tmp_path / "myconf"), "teacher=tiny", "student=tiny", "trainer.epochs=1",
            "teacher.epochs=1", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    status, stderr = run_in_process(args)
    assert status == 0, stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert Path(metrics["teacher_checkpoint"]).name.startswith("tiny-digits-")
    refused, stderr = run_in_process(["evaluate", f"checkpoint={tmp_path / 'run' / 'student.pt'}",
                                      f"hydra.run.dir={tmp_path / 'refused'}"])
    assert refused == 2 and "add trust=[mymodels.tiny]" in stderr and len(stderr.strip().splitlines()) == 1
    status, stderr = run_in_process(["evaluate", f"checkpoint={tmp_path / 'run' / 'student.pt'}",
                                     "trust=[mymodels.tiny]", f"hydra.run.dir={tmp_path / 'evaluated'}"])
    assert status == 0, stderr
    assert json.loads((tmp_path / "evaluated" / "evaluation.json").read_text())["accuracy"] == pytest.approx(
        metrics["test_accuracy"])


MISFITS = [  # (overrides, what the one line names)
    (["student=timm", "student.arch=vit_tiny_patch16_224", "student.img_size=32", "+student.options={depth:1}"],
     "student=timm student.arch=vit_tiny_patch16_224 student.img_size=32"),
    (["student=torchvision", "student.arch=resnet_18"], "did you mean resnet18"),
]


@pytest.mark.parametrize("overrides,named", MISFITS, ids=["vit img_size", "arch"])
def test_a_model_that_does_not_fit_the_data_is_refused_before_any_teacher_epoch(tmp_path, monkeypatch, overrides,
                                                                                named):
    """In one line naming the model as selected (and the data's input shape), before the teacher trains (no cache
    entry) and with no run directory."""
    monkeypatch.chdir(tmp_path)
    status, stderr = run_in_process(["train", *overrides, f"cache_dir={tmp_path / 'cache'}",
                                     f"hydra.run.dir={tmp_path / 'run'}"])
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert named in stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_readme_add_a_model_example_through_the_console_script(cli, tmp_path):
    """The README's own example, as a user runs it: trained as teacher and student, then evaluated."""
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n\n\ndef tiny(input_shape, num_classes, width=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(width), nn.ReLU(), nn.Linear(width, num_classes))\n")
    for role in ("teacher", "student"):
        (tmp_path / "myconf" / role).mkdir(parents=True)
        (tmp_path / "myconf" / role / "tiny.yaml").write_text("_target_: mymodels.tiny\nwidth: 8\n")
    trained = cli("train", "--config-dir", "myconf", "teacher=tiny", "student=tiny", "trainer.epochs=1",
                  "teacher.epochs=1", "hydra.run.dir=run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    evaluated = cli("evaluate", "checkpoint=run/student.pt", "trust=[mymodels.tiny]", "hydra.run.dir=eval",
                    cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["accuracy"] == pytest.approx(
        json.loads((tmp_path / "run" / "metrics.json").read_text())["test_accuracy"])
    misfit = cli("train", "student=timm", "student.arch=vit_tiny_patch16_224", "student.img_size=32",
                 "hydra.run.dir=misfit", cwd=tmp_path)
    assert misfit.returncode == 2 and "Traceback" not in misfit.stderr and len(misfit.stderr.strip().splitlines()) == 1
