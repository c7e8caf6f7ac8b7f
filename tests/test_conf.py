"""conf/ as a Hydra user expects it: each architecture once (conf/arch/), teacher/ and student/ options as
stubs with their role's sizes; the teacher's settings once (conf/teacher_training/); each CRD pair's
published loss settings as options chosen by the pair (conf/crd_pair/dkd/, conf/crd_pair/kd_ls/). Every
shipped command, bench pair, teacher and student option, experiment's first job and crd_cifar100 job
composes to the config it composed to before (tests/data/composed_configs.json, from commit a0ce62f)."""

from __future__ import annotations

import json

import pytest
from composed_configs import composed, job_name, jobs, load, options, stored_jobs
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from jacdistill_cli.config import registry
from jacdistill_cli.errors import UsageError

STORED = stored_jobs(load())
# crd_pair options used to set a top-level `published` node that loss=dkd and the kd_ls recipes read with
# oc.select; its values are now set where they are used (loss.nckd_weight, loss.temperature), compared here.
REMOVED_KEYS = ("published",)
# A few jobs for the fast set (each compose takes a few tenths of a second); the slow set composes them all.
FAST_JOBS = ("train", "teacher", "check", "bench bench_pair=vit",
             "train crd_pair=vgg13-vgg8 recipe=dkd_jacobian seed=1 experiment=crd_cifar100",
             "train crd_pair=vgg13-vgg8 recipe=kd_ls seed=0 experiment=crd_cifar100")


# Settings added since by other changes, each with its own tests: what a train run measures after training
# (explain), the logging cadence of the loss terms (trainer.log_every_steps).
ADDED_KEYS = {"train": ("explain", "trainer.log_every_steps")}
# `jacdistill teacher` composes the four trainer settings it reads instead of the whole trainer group.
TEACHER_TRAINER = ("device", "eval_batch_size", "num_workers", "threads")


def expected(name: str) -> dict:
    command = STORED[name][0]
    before = {key: node for key, node in STORED[name][2].items() if key not in REMOVED_KEYS}
    if command == "teacher":   # (its own trainer node comes after seed now, as conf/teacher.yaml writes it)
        whole = before.pop("trainer")
        trainer = {key: whole[key] for key in TEACHER_TRAINER}
        before = {**before, "trainer": trainer}
    return before


def without_added(command: str, config: dict) -> dict:
    config = json.loads(json.dumps(config))
    for key in ADDED_KEYS.get(command, ()):
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node.pop(leaf)
    return config


def differences(name: str) -> list[str]:
    """What the job composes to that differs from before (values, types or key order), one line a key."""
    command, overrides, _ = STORED[name]
    now, before = without_added(command, composed(command, overrides)), expected(name)
    if json.dumps(now) == json.dumps(before):
        return []
    if list(now) != list(before):
        return [f"{name}: top-level keys {list(now)}, before {list(before)}"]
    return [f"{name}: {key} is {json.dumps(now[key])}, before {json.dumps(before[key])}"
            for key in now if json.dumps(now[key]) != json.dumps(before[key])]


@pytest.mark.parametrize("name", FAST_JOBS)
def test_a_job_composes_to_the_config_it_composed_to_before(name):
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        assert differences(name) == []


@pytest.mark.slow  # starts no process, but composes 163 configs (about a minute on 2 busy cores)
def test_every_job_composes_to_the_config_it_composed_to_before():
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        listed = [job_name(command, overrides) for command, overrides in jobs()]
        assert listed == list(STORED)  # the same jobs: options, bench pairs, sweep grids (120 of crd_cifar100)
        assert sum(1 for name in listed if "experiment=crd_cifar100" in name) == 120
        found = [line for name in listed for line in differences(name)]
    assert found == []


def test_the_teacher_and_student_options_are_those_of_before_and_arch_adds_no_key():
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        for role in ("teacher", "student"):
            assert [f"train {role}={o}" for o in options(role)] == [n for n in STORED if n.startswith(f"train {role}=")]
        cfg = compose("train", overrides=["teacher=vit", "student=cnn"])
    assert "arch" not in cfg and "teacher_training" not in cfg
    assert (cfg.teacher.dim, cfg.teacher.depth, cfg.student.channels, cfg.student.hidden) == (64, 3, [16, 32], 64)


def test_shipped_options_read_as_hydra_composes_them():
    """registry's start-up readers (files only) give what Hydra composes for each option on its own."""
    groups_with_defaults = ("teacher", "student", "loss")
    overrides = [f"+{group}@all.{group}.{option}={option}" for group in groups_with_defaults
                 for option in registry.shipped_options(group)]
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        cfg = compose(None, overrides=[*overrides, "+crd_pair=none"])  # loss=dkd's per-pair entry needs a choice
    for group in groups_with_defaults:
        assert list(cfg.all[group]) == sorted(registry.shipped_options(group))
        for option, target in registry.shipped_options(group).items():
            node = registry.shipped_node(group, option)
            assert json.dumps(OmegaConf.to_container(node)) == json.dumps(OmegaConf.to_container(cfg.all[group][option]))
            assert node._target_ == target
    for group in ("dataset", "jacobian", "features", "optim"):  # read as they are: no defaults list
        for option in registry.shipped_options(group):
            assert "defaults" not in OmegaConf.to_container(registry.shipped_node(group, option)), (group, option)


def test_a_shipped_name_still_labels_only_its_own_architecture():
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=["teacher=cnn", "teacher.name=mlp"])
    with pytest.raises(UsageError, match=r"^teacher.name='mlp' is not allowed: teacher=mlp is the option that builds "
                                         r"jacdistill_cli.zoo.models.mlp, but this node builds jacdistill_cli.zoo.models.cnn"):
        registry.check_name("teacher", cfg.teacher)


def test_a_users_own_model_is_a_full_node_or_a_stub_of_a_shipped_architecture(tmp_path):
    """`--config-dir ./myconf` (a search path) with student/tiny.yaml and teacher/tiny.yaml of their own
    target, and a stub that reuses conf/arch/cnn.yaml at another size."""
    for role in ("student", "teacher"):
        (tmp_path / role).mkdir()
        (tmp_path / role / "tiny.yaml").write_text("_target_: mymodels.tiny\nwidth: 8\n")
    (tmp_path / "student" / "wide_cnn.yaml").write_text("defaults: [/arch/cnn@_here_, _self_]\n\nchannels: [64, 128]\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        tiny = compose("train", overrides=["student=tiny", "teacher=tiny", searchpath])
        wide = compose("train", overrides=["student=wide_cnn", searchpath])
    assert OmegaConf.to_container(tiny.student) == {"_target_": "mymodels.tiny", "width": 8}
    teacher = OmegaConf.to_container(tiny.teacher)
    assert list(teacher)[:2] == ["_target_", "width"] and teacher["width"] == 8 and teacher["epochs"] == 30
    assert OmegaConf.to_container(wide.student) == {"_target_": "jacdistill_cli.zoo.models.cnn", "name": "cnn",
                                                    "channels": [64, 128], "hidden": 128, "batchnorm": True}


@pytest.mark.parametrize("overrides,nckd_weight,base_temperature", [
    ([], 8.0, 2.0),                       # no pair (crd_pair=none): each loss's own
    (["crd_pair=vgg13-vgg8"], 6.0, 3.0),  # a pair outside the preset (with it: the stored crd_cifar100 jobs)
])
def test_a_pairs_published_settings_come_with_the_pair_and_the_loss(overrides, nckd_weight, base_temperature):
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        dkd = compose("train", overrides=[*overrides, "loss=dkd"])
        ls = compose("train", overrides=[*overrides, "recipe=kd_ls_jacobian"])
    assert (dkd.loss.nckd_weight, ls.loss.temperature, ls.loss.standardize) == (nckd_weight, base_temperature, True)
    assert "published" not in dkd and "published" not in ls
