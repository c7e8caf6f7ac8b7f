"""One mechanism for every config group: `_target_` nodes, a user's own loss and model from a config
directory outside the package, optimisers by target, and one clear line for what does not fit."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jacdistill_cli.config import registry
from jacdistill_cli.engine.terms import Term
from jacdistill_cli.errors import UsageError
from jacdistill_cli.loop.trainer import make_optimizer
from jacdistill_cli.spec.build import objective_spec, optim_spec, train_spec
from jacdistill_cli.spec.reader import Reader

GROUPS = ("dataset", "teacher", "student", "loss", "jacobian", "features", "optim")


def compose_train(*overrides: str):
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_every_shipped_option_of_every_group_names_an_importable_target():
    for group in GROUPS:
        options = registry.shipped_options(group)
        assert options, group
        for name, target in options.items():
            assert callable(registry.locate(group, {"_target_": target})), (group, name)


@pytest.mark.parametrize("option,expected", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                             ("sgd", torch.optim.SGD)])
def test_each_optimiser_option_builds_its_own_optimiser(option, expected):
    optim = optim_spec(Reader(compose_train(f"optim={option}", "optim.lr=0.02")))
    optimizer, _ = make_optimizer([torch.nn.Parameter(torch.zeros(2))], optim, epochs=3)
    assert type(optimizer) is expected and optimizer.param_groups[0]["lr"] == 0.02


def test_an_optimiser_name_that_does_not_match_its_target_is_refused():
    with pytest.raises(UsageError, match=r"^optim.name='adamw' is not allowed: optim=adamw is the option that "
                                         r"builds torch.optim.AdamW, but this node builds torch.optim.Adam"):
        optim_spec(Reader(compose_train("optim=adam", "optim.name=adamw")))


def test_a_multistep_schedule_steps_at_its_milestones():
    optim = optim_spec(Reader(compose_train("optim=sgd", "optim.schedule=multistep", "optim.milestones=[2,3]",
                                            "optim.gamma=0.1")))
    optimizer, schedule = make_optimizer([torch.nn.Parameter(torch.zeros(2))], optim, epochs=4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.05, 0.05, 0.005, 0.0005])


@pytest.mark.parametrize("overrides,message", [
    (["+jacobian.bogus=1"], r"^jacobian.bogus is not a setting of 'Top1'; its settings are: normalize, squared, "
                           r"batchnorm, strategy, of$"),
    (["jacobian.squared=2"], r"^jacobian.squared=2 is not allowed: it must be true or false$"),
    (["jacobian=projected", "jacobian.num_projections=0"],
     r"^jacobian.num_projections=0 is not allowed: it must be an integer >= 1$"),
    (["loss._target_=nowhere.loss"], r"^loss._target_='nowhere.loss' is not allowed: it cannot be imported"),
    (["+loss.margin=1"], r"^loss.margin is not a setting of 'kl'; its settings are: temperature, standardize, weight$"),
    (["features=hint", "features.weight=-1"], r"^features.weight=-1 is not allowed: it must be a number >= 0$"),
])
def test_a_node_that_does_not_fit_its_target_is_one_line(overrides, message):
    with pytest.raises(UsageError, match=message):
        train_spec(compose_train(*overrides))


USER_CODE = {
    "mylosses.py": '''
        import torch.nn.functional as F


        def cosine(student_logits, teacher_logits, temperature):
            """1 - cosine similarity of the softened distributions."""
            s = F.softmax(student_logits / temperature, dim=1)
            t = F.softmax(teacher_logits / temperature, dim=1)
            return (1 - F.cosine_similarity(s, t, dim=1)).mean()
        ''',
    "mymodels.py": '''
        import math

        from torch import nn


        def tiny(input_shape, num_classes, width=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                                 nn.Linear(width, num_classes))
        ''',
    "myconf/loss/cosine.yaml": "_target_: mylosses.cosine\ntemperature: 4.0\n",
    "myconf/student/tiny.yaml": "_target_: mymodels.tiny\nwidth: 12\n",
}


@pytest.mark.slow
def test_a_users_loss_and_student_train_end_to_end_through_the_console_script(cli, tmp_path):
    for name, text in USER_CODE.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    run_dir = tmp_path / "run"
    result = cli("train", "--config-dir", str(tmp_path / "myconf"), "loss=cosine", "student=tiny",
                 "trainer.epochs=1", "teacher.epochs=2", "trainer.log_every_steps=1", f"hydra.run.dir={run_dir}",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["student_parameters"] == 64 * 12 + 12 + 12 * 10 + 10
    events = EventAccumulator(str(run_dir))
    events.Reload()
    distill = [e.value for e in events.Scalars("loss/distill")]
    assert distill and all(0 <= v <= 1 for v in distill) and len(set(distill)) > 1
    resolved = OmegaConf.load(run_dir / "config.yaml")
    assert resolved.loss._target_ == "mylosses.cosine" and resolved.student._target_ == "mymodels.tiny"


@dataclasses.dataclass
class LogitPenalty(Term):
    """A user's own term: the mean squared logit of the student."""

    def __call__(self, step) -> torch.Tensor:
        return step.student_logits.pow(2).mean()


def test_a_users_term_is_registered_logged_and_weighted():
    from jacdistill_cli.engine.objective import objective_from_settings

    cfg = compose_train(f"+terms.penalty={{_target_:{__name__}.LogitPenalty,weight:0.25}}")
    objective_settings = objective_spec(Reader(cfg))
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    objective, _ = objective_from_settings(objective_settings, teacher, student, (4,))
    logits, terms = objective(student, teacher, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    assert terms["penalty"].item() == pytest.approx(logits.pow(2).mean().item())
    expected = 0.5 * terms["distill"] + 0.5 * terms["jacobian"] + 0.25 * terms["penalty"]
    assert terms["total"].item() == pytest.approx(expected.item())
    with pytest.raises(UsageError, match=r"^terms.jacobian=.* is not allowed: the name is taken by a shipped term"):
        objective_spec(Reader(compose_train(f"+terms.jacobian={{_target_:{__name__}.LogitPenalty,weight:1}}")))
