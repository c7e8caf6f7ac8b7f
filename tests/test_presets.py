"""Experiment presets and recipes: composed with Hydra's compose API, their sweep grid expanded the way
Hydra's basic sweeper does, every job validated; one slice of digits_fewshot runs through the console script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import compose_job, grid, one_job_per_seed_group
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from jacdistill_cli.config.resolvers import register_resolvers
from jacdistill_cli.spec.build import optim_spec, train_spec
from jacdistill_cli.spec.reader import Reader
from jacdistill_cli.zoo.models import architecture, build_model

register_resolvers()

RECIPES = {  # recipe -> (loss, jacobian, alpha, hard_weight)
    "ce_only": ("none", "none", 0.0, 1.0),
    "kd": ("kl", "none", 0.0, 1.0),
    "kd_jacobian": ("kl", "top1", 0.5, 1.0),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_set_loss_jacobian_and_weights(recipe):
    cfg = compose_job([f"recipe={recipe}"])
    assert (cfg.loss.name, cfg.jacobian.name, cfg.alpha, cfg.hard_weight) == RECIPES[recipe]
    # A command-line value still wins over the recipe's.
    assert compose_job([f"recipe={recipe}", "alpha=0.3"]).alpha == 0.3


def test_digits_fewshot_is_45_valid_jobs_of_3_sizes_3_recipes_5_seeds():
    jobs = grid("digits_fewshot")
    assert len(jobs) == 45
    assert {tuple(sorted(job)) for job in jobs} == {
        tuple(sorted([f"dataset.samples_per_class={n}", f"recipe={r}", f"seed={seed}", "experiment=digits_fewshot"]))
        for n in (1, 3, 10) for r in RECIPES for seed in range(5)}
    for job in one_job_per_seed_group(jobs):
        cfg = compose_job(job)
        train_spec(cfg)
        recipe = dict(o.split("=", 1) for o in job)["recipe"]
        assert (cfg.loss.name, cfg.jacobian.name, cfg.alpha, cfg.hard_weight) == RECIPES[recipe]
        assert (cfg.dataset.name, cfg.teacher.name, cfg.student.name) == ("digits", "cnn", "mlp")
        assert cfg.dataset.samples_per_class in (1, 3, 10)
        # The teacher sees the full training split: only the students are few-shot.
        assert OmegaConf.select(cfg, "teacher.samples_per_class", default=None) is None


def test_paper_cifar100_is_vgg9_to_vgg4_on_10_50_500_per_class():
    jobs = grid("paper_cifar100")
    assert len(jobs) == 63 and {o for job in jobs for o in job if o.startswith("seed=")} == {"seed=0", "seed=1", "seed=2"}
    sizes = set()
    for job in one_job_per_seed_group(jobs):
        cfg = compose_job(job)
        train_spec(cfg)
        assert (cfg.dataset.name, cfg.teacher.name, cfg.teacher.depth, cfg.student.name, cfg.student.depth) == (
            "cifar100", "vgg", 9, "vgg", 4)
        sizes.add(cfg.dataset.samples_per_class)
    assert sizes == {10, 50, 500}
    # Both networks build for CIFAR-100's 3x32x32 inputs and 100 classes.
    for node in (cfg.teacher, cfg.student):
        model = build_model(architecture(node), (3, 32, 32), 100).eval()
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.slow
def test_digits_fewshot_slice_runs_as_a_sweep_without_dash_m(tmp_path):
    """One seed, one size: the three recipes, through the README's reproduction script and the console
    script, named by what varies."""
    import os
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(Path(__file__).parents[1] / "scripts" / "digits_fewshot.sh"), str(sweep),
                             "seed=0", "dataset.samples_per_class=1", "trainer.epochs=2", "teacher.epochs=2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == f"the table: {sweep}/report.md"
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    # Only the recipe varies: seed, samples per class and the epochs are the same in every job.
    assert names == [f"recipe={r}" for r in sorted(RECIPES)]
    metrics = {name: json.loads((sweep / name / "metrics.json").read_text()) for name in names}
    # The recipe and the preset are hyperparameters of each run in TensorBoard's HPARAMS tab.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    for name in names:
        events = EventAccumulator(str(sweep / name))
        events.Reload()
        start = metadata.parse_session_start_info_plugin_data(
            events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG])
        assert start.hparams["recipe"].string_value == name.split("=")[1]
        assert start.hparams["experiment"].string_value == "digits_fewshot"
        assert start.hparams["samples_per_class"].string_value == "1"
    # 1 sample per class: 10 training samples, one batch an epoch.
    assert all(m["steps"] == 2 for m in metrics.values())
    teacher_sources = {m["teacher_checkpoint"] for m in metrics.values()}
    assert len(teacher_sources) == 1  # one teacher for the seed, trained once and reused

    # The sweep ended with its report (the report command gives the same).
    report = (sweep / "report.md").read_text()
    assert report in result.stdout
    assert "| dataset.samples_per_class" not in report  # constant: in the header line, not a column
    for recipe in RECIPES:
        assert f"| {recipe} | 1 |" in report
    assert Path(sweep / "report.png").is_file()


CRD_PAIRS = {"resnet56": "resnet20", "resnet110": "resnet32", "resnet32x4": "resnet8x4", "wrn_40_2": "wrn_16_2",
             "vgg13": "vgg8"}


CRD_RECIPES = ("kd", "kd_jacobian", "dkd", "dkd_jacobian", "kd_ls", "kd_ls_jacobian", "dist", "dist_jacobian")


def test_crd_cifar100_is_the_five_published_pairs_by_eight_recipes_and_three_seeds(tmp_path):
    """The benchmark's table: each pair's teacher is its published file under teacher_dir, the recipe
    is the benchmark's (SGD 0.05, momentum 0.9, no Nesterov, 5e-4, batch 64, 240 epochs, x0.1 after 150, 180, 210)."""
    for teacher in CRD_PAIRS:
        folder = tmp_path / f"{teacher}_vanilla"
        folder.mkdir()
        (folder / "ckpt_epoch_240.pth").touch()
    jobs = grid("crd_cifar100")
    assert len(jobs) == 120
    assert {tuple(sorted(o for o in job if not o.startswith("seed="))) for job in jobs} == {
        tuple(sorted([f"crd_pair={t}-{s}", f"recipe={r}", "experiment=crd_cifar100"]))
        for t, s in CRD_PAIRS.items() for r in CRD_RECIPES}
    assert {o for job in jobs for o in job if o.startswith("seed=")} == {"seed=0", "seed=1", "seed=2"}
    from jacdistill_cli.zoo.published import published_name

    for job in [job for job in one_job_per_seed_group(jobs) if "recipe=kd_jacobian" in job]:  # one per pair
        cfg = compose_job([*job, f"teacher_dir={tmp_path}"])
        train_spec(cfg)  # the checkpoints exist, the multistep schedule is valid
        teacher, student = published_name(architecture(cfg.teacher)), published_name(architecture(cfg.student))
        assert CRD_PAIRS[teacher] == student
        assert cfg.teacher.checkpoint == str(tmp_path / f"{teacher}_vanilla" / "ckpt_epoch_240.pth")
        recipe = dict(o.split("=", 1) for o in job)["recipe"]
        assert (cfg.loss.name, cfg.jacobian.name, cfg.alpha, cfg.hard_weight) == RECIPES[recipe]
        assert (cfg.dataset.name, cfg.temperature, cfg.trainer.epochs, cfg.trainer.batch_size) == (
            "cifar100", 4.0, 240, 64)
        optim = OmegaConf.to_container(cfg.optim)
        assert optim == {"_target_": "torch.optim.SGD", "name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0005,
                         "schedule": "multistep", "milestones": [150, 180, 210], "gamma": 0.1}
    # Job directories are named by what varies, not by the teacher folder's path.
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=crd_cifar100"], return_hydra_config=True)
    assert {"experiment", "teacher_dir", "dataset.root"} <= set(cfg.hydra.job.config.override_dirname.exclude_keys)


def test_the_multistep_schedule_is_the_benchmarks_and_bad_milestones_are_one_line():
    from jacdistill_cli.errors import UsageError
    from jacdistill_cli.loop.trainer import make_optimizer

    cfg = compose_job(["optim=sgd", "optim.schedule=multistep", "optim.milestones=[150,180,210]"])
    optim = optim_spec(Reader(cfg))
    base = OmegaConf.to_container(cfg)
    optimizer, schedule = make_optimizer([torch.zeros(1, requires_grad=True)], optim, 240)
    rates = []  # the rate each epoch (1..240) trains with; the trainer steps the schedule after an epoch
    for _ in range(240):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[149] == pytest.approx(0.05) and rates[150] == pytest.approx(0.005)
    assert rates[179] == pytest.approx(0.005) and rates[180] == pytest.approx(0.0005)
    assert rates[209] == pytest.approx(0.0005) and rates[239] == pytest.approx(0.00005)
    for changes, message in [
        ({"milestones": None}, r"^optim.milestones=None is not allowed: with optim.schedule=multistep"),
        ({"milestones": [180, 150]}, r"^optim.milestones=\[180, 150\] is not allowed"),
        ({"gamma": 0}, r"^optim.gamma=0 is not allowed"),
        ({"schedule": "step"}, r"^optim.schedule='step' is not allowed: it must be one of cosine, constant, multistep"),
    ]:
        bad = OmegaConf.create({**base, "optim": {**base["optim"], **changes}})
        with pytest.raises(UsageError, match=message):
            optim_spec(Reader(bad))
