"""The run spec (spec/run.py) built from a command's composed config, in one place: each setting read once
through a recording `Reader` (spec/reader.py) and checked with a one-line error, each group's node built
through its `_target_` (config/registry.py), before any work.

`choices` are Hydra's choices of the config groups (`HydraConfig.get().runtime.choices`): the option a user's
model was chosen as names it, and the recipe and preset label the run's hyperparameters.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config import registry
from jacdistill_cli.config.checks import SettingError
from jacdistill_cli.engine.methods import NoJacobian
from jacdistill_cli.errors import UsageError, setting_error
from jacdistill_cli.explain.settings import explain_settings
from jacdistill_cli.robustness.settings import robustness_settings, teacher_training
from jacdistill_cli.spec.hparams import hparams
from jacdistill_cli.spec.reader import Reader
from jacdistill_cli.spec.run import (
    PRECISIONS,
    RESUME_MODES,
    REUSE_MODES,
    SALIENCY_MODES,
    SCHEDULES,
    SELECT_MODES,
    CheckpointSpec,
    DataSpec,
    LoopSpec,
    ModelSpec,
    ObjectiveSpec,
    OptimSpec,
    TeacherRunSpec,
    TeacherSpec,
    TeacherTrainingSpec,
    TrainSpec,
)
from jacdistill_cli.zoo.models import architecture
from jacdistill_cli.zoo.probe import check_output_choice

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
# The feature Jacobian is one input-gradient per sample and pair: the analogue of top1 (jacobian.of=features).
FEATURE_JACOBIAN_METHODS = ("top1",)
SHIPPED_TERMS = ("distill", "jacobian", "hard", "features", "total")


def check_device_name(name: Any, key: str = "trainer.device") -> str:
    """A device setting's form: auto, cpu, cuda or cuda:N (whether the GPU exists is asked when torch runs)."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise UsageError(f"{key}={name!r} is not allowed: it must be one of auto, cpu, cuda, cuda:N "
                         "(N: the index of a GPU torch sees)")
    return name


def precision(read: Reader, key: str = "trainer.precision") -> str:
    """32, bf16 or 16 (Hydra reads 16 and 32 as integers)."""
    raw = read.value(key)
    if str(raw) not in PRECISIONS:
        raise setting_error(key, raw, f"it must be one of {', '.join(PRECISIONS)}")
    return str(raw)


def existing_file(read: Reader, key: str) -> str | None:
    """An optional path setting: null, or an existing file (`~` is the home directory)."""
    raw = read.value(key, None)
    if raw is None:
        return None
    if not os.path.isfile(os.path.expanduser(str(raw))):
        raise setting_error(key, str(raw), "no such file")
    return str(raw)


def model_spec(read: Reader, role: str, choices: Mapping[str, Any]) -> ModelSpec:
    """The `teacher` or `student` node's network; its `_target_` located here (one line if it cannot be)."""
    node = read.node(role)
    if node is None:
        raise UsageError(f"{role}=null is not allowed: choose a model, e.g. {role}=cnn")
    registry.locate(role, node)
    try:
        check_output_choice(read.plain(f"{role}.output", None))
    except SettingError as err:
        raise setting_error(f"{role}.output", err.value, err.allowed) from None
    option = choices.get(role) if isinstance(choices.get(role), str) else None
    return ModelSpec(role, architecture(node, option), option)


def data_spec(read: Reader) -> DataSpec:
    node = read.node("dataset")
    if node is None:
        raise UsageError("dataset=null is not allowed: choose a dataset, e.g. dataset=digits")
    registry.locate("dataset", node)
    samples = read.optional_integer("dataset.samples_per_class", allowed="it must be null (all) or an integer >= 1")
    split_seed = read.integer("dataset.split_seed", low=0, allowed="it must be an integer >= 0") \
        if read.has("dataset.split_seed") else 0
    return DataSpec(OmegaConf.to_container(node, resolve=True), samples, split_seed)


def teacher_spec(read: Reader, choices: Mapping[str, Any], cache: bool = True) -> TeacherSpec:
    """The `teacher` node: its network, and how it is obtained (a checkpoint, or trained and cached)."""
    model = model_spec(read, "teacher", choices)
    checkpoint = existing_file(read, "teacher.checkpoint")
    read.real("teacher.lr", low=0, low_open=True, allowed="it must be a number > 0")
    read.real("teacher.weight_decay", low=0, allowed="it must be a number >= 0")
    training = TeacherTrainingSpec(
        epochs=read.integer("teacher.epochs", allowed="it must be an integer >= 1"),
        batch_size=read.integer("teacher.batch_size", allowed="it must be an integer >= 1"),
        # as written (1 stays 1, not 1.0): the teacher cache's key is the JSON of these values
        lr=read.value("teacher.lr"), weight_decay=read.value("teacher.weight_decay"),
        samples_per_class=read.optional_integer("teacher.samples_per_class", allowed="it must be null (the full "
                                                "training split) or an integer >= 1"),
        training=teacher_training({"training": read.plain("teacher.training", "standard"),
                                   "adversarial": read.plain("teacher.adversarial", None)}))
    cache_dir = Path(os.path.expanduser(str(read.value("cache_dir")))) if cache and read.has("cache_dir") else None
    return TeacherSpec(model, checkpoint, training, cache_dir)


def loop_spec(read: Reader) -> LoopSpec:
    """The `trainer` group: the loop's settings."""
    def positive(key: str, low: int = 1) -> int:
        return read.integer(key, low=low, allowed=f"it must be an integer >= {low}")

    device = check_device_name(read.value("trainer.device"))
    devices = read.integer("trainer.devices", allowed="it must be an integer >= 1 (processes of data-parallel "
                           "training)")
    return LoopSpec(
        epochs=positive("trainer.epochs"), batch_size=positive("trainer.batch_size"),
        eval_batch_size=positive("trainer.eval_batch_size"), eval_every=positive("trainer.eval_every"),
        num_workers=positive("trainer.num_workers", low=0),
        log_every_steps=read.integer("trainer.log_every_steps", allowed="it must be an integer >= 1 (steps whose "
                                     "loss terms are averaged into one logged point)")
        if read.has("trainer.log_every_steps") else 50,
        precision=precision(read), device=device, devices=devices,
        threads=read.optional_integer("trainer.threads", allowed="it must be null (torch's default) or an integer "
                                      ">= 1"),
        sync_batchnorm=read.flag("trainer.sync_batchnorm"),
        saliency=read.choice("trainer.saliency", SALIENCY_MODES) if read.has("trainer.saliency") else "abs")


def checkpoint_spec(read: Reader) -> CheckpointSpec:
    every_epochs = read.integer("trainer.save_every_epochs", allowed="it must be an integer >= 1 (the last epoch "
                                "saves in any case)") if read.has("trainer.save_every_epochs") else 1
    return CheckpointSpec(
        resume=read.choice("trainer.resume", RESUME_MODES), select=read.choice("trainer.select", SELECT_MODES),
        save_every_steps=read.optional_integer("trainer.save_every_steps", allowed="it must be null (every epoch "
                                               "only) or an integer >= 1"),
        save_every_epochs=every_epochs)


def optim_spec(read: Reader) -> OptimSpec:
    """The optimiser (its `_target_`, e.g. torch.optim.AdamW, called with the parameters and the node's
    settings) and the per-epoch schedule."""
    read.real("optim.lr", low=0, low_open=True, allowed="it must be a number > 0")
    read.real("optim.weight_decay", low=0, allowed="it must be a number >= 0")
    schedule = read.choice("optim.schedule", SCHEDULES)
    milestones: list[int] = []
    gamma = 0.1
    if schedule == "multistep":
        milestones = read.plain("optim.milestones", None)
        if not (isinstance(milestones, list) and milestones and milestones == sorted(set(milestones))
                and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in milestones)):
            raise setting_error("optim.milestones", milestones, "with optim.schedule=multistep it must be a list of "
                                "increasing epochs >= 1, e.g. [150,180,210]")
        gamma = read.real("optim.gamma", low=0, high=1, low_open=True, allowed="it must be a number in (0, 1]")
    if read.value("optim.momentum", None) is not None:
        read.real("optim.momentum", low=0, high=1, allowed="it must be a number in [0, 1]")
    node = read.node("optim")
    build = registry.bind("optim", node, exclude=("schedule", "milestones", "gamma"), positional=1)
    return OptimSpec(registry.label("optim", node), build, schedule, tuple(milestones), gamma)


def methods(read: Reader) -> tuple[Any, Any]:
    """(the Jacobian method, the feature method) of the `jacobian` and `features` nodes."""
    method = registry.build("jacobian", read.node("jacobian"))
    node = read.node("features")   # a config of one's own without features: the shipped none
    features = registry.build("features", node if node is not None else registry.shipped_node("features", "none"))
    if getattr(method, "of", "logits") == "features":
        if features.name == "none":
            raise setting_error("jacobian.of", "features", "it takes the Jacobian of the matched features: choose "
                                "features=attention or features=hint (features.weight=0 to match their Jacobians "
                                "only)")
        if method.name not in FEATURE_JACOBIAN_METHODS:
            raise setting_error("jacobian.of", "features", f"with jacobian={method.name}: the feature Jacobian is one "
                                "input-gradient per sample and pair, as jacobian=top1 is for the logits; use "
                                "jacobian=top1")
    return method, features


def objective_spec(read: Reader) -> ObjectiveSpec:
    """The weighted terms of the loss; a part of weight 0 is not computed (`idle` says which and why)."""
    alpha = read.real("alpha", low=0, high=1, allowed="alpha must be a number in [0, 1]")
    temperature = read.real("temperature", low=0, low_open=True, allowed="temperature must be a number > 0")
    hard_weight = read.real("hard_weight", low=0, allowed="hard_weight must be a number >= 0")
    loss = registry.bind("loss", read.node("loss"), positional=2)
    method, features = methods(read)
    terms = []
    for name, node in (read.value("terms", None) or {}).items():
        if name in SHIPPED_TERMS:
            raise setting_error(f"terms.{name}", "...", "the name is taken by a shipped term; choose another")
        weight = read.real(f"terms.{name}.weight", low=0, allowed="it must be a number >= 0")
        terms.append(registry.build(f"terms.{name}", node, exclude=("weight",), name=name, weight=weight))
    idle = []
    active = method.uses_gradients or method.perturbs_inputs
    if alpha == 0 and active:
        idle.append(("jacobian", "alpha=0 gives the Jacobian term weight 0"))
        method = NoJacobian()
    spec = ObjectiveSpec(alpha, temperature, hard_weight, registry.label("loss", read.node("loss")), loss, method,
                         features, tuple(terms), tuple(idle))
    if nothing_to_train(spec, active):
        raise UsageError(f"loss={spec.loss_name} jacobian={registry.label('jacobian', read.node('jacobian'))} "
                         f"alpha={alpha:g} hard_weight={hard_weight:g} is not allowed: no term of the loss has a "
                         "weight, so there is nothing to train; give a loss, a jacobian method with alpha > 0, or "
                         "hard_weight > 0")
    return spec


def nothing_to_train(spec: ObjectiveSpec, jacobian_active: bool) -> bool:
    """No term of the loss has a weight: a student with no gradient cannot be trained."""
    distill = spec.loss_name != "none" and spec.alpha < 1
    jacobian = spec.alpha > 0 and jacobian_active
    features = getattr(spec.features, "weight", 0) > 0
    return not (distill or jacobian or features or spec.hard_weight > 0 or spec.terms)


def refuse_combinations(loop: LoopSpec, read: Reader) -> None:
    """Settings that are each fine but not together."""
    if loop.sync_batchnorm and read.value("jacobian.batchnorm", None) == "batch":
        raise setting_error("trainer.sync_batchnorm", True, "with jacobian.batchnorm=batch the per-sample Jacobians "
                            "hold each rank's own BatchNorm statistics; use jacobian.batchnorm=running or coupled "
                            "with synchronised BatchNorm, or trainer.sync_batchnorm=false")
    if loop.devices > 1 and read.value("jacobian.strategy", None) == "func":
        raise setting_error("jacobian.strategy", "func", "with trainer.devices > 1 the student runs inside "
                            "DistributedDataParallel, which torch.func cannot trace; use loop, batched or auto")


def reuse_setting(read: Reader) -> Any:
    raw = read.value("teacher.reuse_outputs", "auto")
    if raw not in REUSE_MODES:
        raise setting_error("teacher.reuse_outputs", raw, "it must be auto, true or false")
    return raw


def train_spec(cfg: DictConfig, choices: Mapping[str, Any] | None = None, reader: Reader | None = None) -> TrainSpec:
    """`jacdistill train`'s spec; `reader` (given by a test) records what was read."""
    read = reader or Reader(cfg)
    choices = dict(choices or {})
    seed = read.integer("seed", low=0, allowed="it must be an integer >= 0")
    loop = loop_spec(read)
    objective = objective_spec(read)
    refuse_combinations(loop, read)
    warmup = (getattr(objective.loss, "keywords", None) or {}).get("warmup_epochs")
    warnings = [f"loss.warmup_epochs={warmup} is longer than the run (trainer.epochs={loop.epochs}): the "
                f"{objective.loss_name} loss never reaches its full weight (it reaches {loop.epochs / warmup:.2g} of "
                f"it); loss.warmup_epochs={max(1, round(loop.epochs / 12))} keeps the published proportion (20 of 240)"
                ] if isinstance(warmup, (int, float)) and warmup > loop.epochs else []
    return TrainSpec(
        seed=seed, data=data_spec(read), teacher=teacher_spec(read, choices), student=model_spec(read, "student", choices),
        objective=objective, optim=optim_spec(read), loop=loop, checkpoints=checkpoint_spec(read),
        robustness=robustness_settings(read.plain("robustness", None), seed=seed),
        explain=explain_settings(read.plain("explain", None), seed=seed), reuse_outputs=reuse_setting(read), config=OmegaConf.to_container(cfg, resolve=True),
        hparams=hparams(read, choices), warnings=tuple(warnings))


def teacher_run_spec(cfg: DictConfig, choices: Mapping[str, Any] | None = None,
                     reader: Reader | None = None) -> TeacherRunSpec:
    """`jacdistill teacher`'s spec: the teacher block and the few trainer keys it uses."""
    read = reader or Reader(cfg)
    seed = read.integer("seed", low=0, allowed="it must be an integer >= 0")
    data = data_spec(read)
    if data.samples_per_class is not None:
        raise setting_error("dataset.samples_per_class", data.samples_per_class, "jacdistill teacher trains on the "
                            f"full training split; use teacher.samples_per_class={data.samples_per_class} for a "
                            "teacher of fewer samples")
    teacher = teacher_spec(read, dict(choices or {}), cache=False)
    if teacher.checkpoint is not None:
        raise setting_error("teacher.checkpoint", teacher.checkpoint, "jacdistill teacher trains a teacher; "
                            "evaluate a checkpoint with jacdistill evaluate checkpoint=PATH")
    loop = LoopSpec(epochs=teacher.training.epochs, batch_size=teacher.training.batch_size,
                    eval_batch_size=read.integer("trainer.eval_batch_size", allowed="it must be an integer >= 1"),
                    num_workers=read.integer("trainer.num_workers", low=0, allowed="it must be an integer >= 0"),
                    device=check_device_name(read.value("trainer.device")),
                    threads=read.optional_integer("trainer.threads", allowed="it must be null (torch's default) or "
                                                  "an integer >= 1"))
    return TeacherRunSpec(seed, data, teacher, loop, OmegaConf.to_container(cfg, resolve=True))
