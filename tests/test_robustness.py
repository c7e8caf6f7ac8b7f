"""The attacks where the worst case is known in closed form, and robust accuracy over a split.

A binary linear score s(p) = w . p of pixels p (the network sees normalised inputs (p - mean) / std, so
its own weights are w * std): with every pixel at least eps inside [0, 1], an L-inf attack of radius eps
can lower s by at most eps ||w||_1 and an L2 attack by eps ||w||_2 (Hoelder), and FGSM / PGD reach those
bounds. The score carries a margin of 10 that no ball crosses (no sample is misclassified, so PGD returns
its end point, the maximiser, not the first point that falls). Tolerances: 1e-5 relative for what is exact up
to float32 rounding (FGSM, L-inf PGD, the balls); 1% for L2 PGD (20 steps of eps / 4), which approaches the
sphere's point geometrically from its random start (the part of the perturbation across w shrinks by about
1 / (1 + step / eps) a step).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from importlib import resources
from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from jacdistill_cli.config import registry
from jacdistill_cli.config.checks import number
from jacdistill_cli.engine.layers import gate_of, make_jacobian_ready
from jacdistill_cli.errors import UsageError
from jacdistill_cli.robustness.attacks import (
    APGDCE,
    APGDT,
    ATTACKS,
    FGSM,
    PGD,
    BallAttack,
    Context,
    Square,
    TransferPGD,
    ascent,
    loss_gradient,
    run_attack,
)
from jacdistill_cli.robustness.measure import Part, robust_accuracy, robust_counts
from jacdistill_cli.robustness.pixels import PixelModel, Pixels, attacked
from jacdistill_cli.robustness.settings import robustness_settings, teacher_training
from jacdistill_cli.robustness.training import AdversarialObjective, teacher_objective
from jacdistill_cli.zoo.data import TensorSplit, digits
from jacdistill_cli.zoo.models import build_model, mlp

EXACT = 1e-5
L2_PGD = 0.01
PIXELS = Pixels(mean=(0.3,), std=(0.2,))
EPS = 0.1


class Linear(nn.Module):
    """logits [b, 4] = (0, v . x + c, -20, -20) of normalised inputs x [b, 1, 8, 8]: a binary score, with
    two more classes of constant logits (APGD-T's loss needs four classes)."""

    def __init__(self, v: torch.Tensor, c: float = 0.0):
        super().__init__()
        self.v = nn.Parameter(v.clone())
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x.flatten(1) * self.v.flatten()).sum(1) + self.c
        zero = torch.zeros_like(score)
        return torch.stack([zero, score, zero - 20, zero - 20], dim=1)


def linear_case(seed: int = 0, count: int = 6):
    generator = torch.Generator().manual_seed(seed)
    v = 0.05 * torch.randn(1, 8, 8, generator=generator)
    w = v / PIXELS.std[0]   # the score's weights in pixel space
    clean = EPS + 1e-3 + (1 - 2 * EPS - 2e-3) * torch.rand(count, 1, 8, 8, generator=generator)
    labels = torch.ones(count, dtype=torch.long)   # the attack lowers the score
    return PixelModel(Linear(v, c=10.0).eval(), PIXELS), w, clean, labels


def score_drop(model, clean, adversarial) -> torch.Tensor:
    with torch.no_grad():
        return model(clean)[:, 1] - model(adversarial)[:, 1]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_moves_a_linear_score_by_the_dual_norm(norm):
    model, w, clean, labels = linear_case()
    adversarial = run_attack(FGSM(norm, EPS), model, clean, labels, Context(PIXELS, 0, torch.arange(len(labels))))
    bound = EPS * (w.abs().sum() if norm == "linf" else w.norm())
    assert torch.allclose(score_drop(model, clean, adversarial), bound.expand(len(labels)), rtol=EXACT)


@pytest.mark.parametrize("norm,tolerance", [("linf", EXACT), ("l2", L2_PGD)])
def test_pgd_reaches_the_dual_norm(norm, tolerance):
    model, w, clean, labels = linear_case(1)
    attack = PGD(norm, EPS, steps=20, step_size=EPS / 4, restarts=2)
    adversarial = run_attack(attack, model, clean, labels, Context(PIXELS, 0, torch.arange(len(labels))))
    bound = float(EPS * (w.abs().sum() if norm == "linf" else w.norm()))
    drop = score_drop(model, clean, adversarial)
    assert bool((drop >= bound * (1 - tolerance)).all()), (drop, bound)


class Peak(nn.Module):
    """logits [b, 2] = (0, 1 - 20 |p - 0.6|) of one pixel p: class 1 only within 0.05 of 0.6."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        peak = 1 - 20 * (pixels.flatten(1)[:, 0] - 0.6).abs()
        return torch.stack([torch.zeros_like(peak), peak], dim=1)


def test_a_sample_falls_at_the_first_point_that_fools_the_network():
    """From 0.52, a step of 0.1 up the cross-entropy reaches 0.62 (class 1: fooled) and the next step returns to
    0.52 (class 0): the end point is classified right, the sample has fallen all the same. A transfer attack
    keeps its end points (made on another network, the source's first fooling point is not the one to keep)."""
    clean, labels = torch.full((1, 1), 0.52), torch.zeros(1, dtype=torch.long)
    context = Context(Pixels(mean=(0.0,), std=(1.0,)), 0, torch.arange(1), source=Peak())
    settings = dict(steps=2, step_size=0.1, random_start=False)
    adversarial = run_attack(PGD("linf", 0.2, **settings), Peak(), clean, labels, context)
    assert adversarial.item() == pytest.approx(0.62) and Peak()(adversarial).argmax(1).item() == 1
    transferred = run_attack(TransferPGD("linf", 0.2, **settings), Peak(), clean, labels, context)
    assert transferred.item() == pytest.approx(0.52)


ALL = [FGSM("linf", EPS), FGSM("l2", EPS), PGD("linf", EPS, steps=5), PGD("l2", EPS, steps=5, restarts=2),
       TransferPGD("linf", EPS, steps=5), APGDCE("linf", EPS, steps=5), APGDT("l2", EPS, steps=5),
       Square("linf", EPS, queries=50), Square("l2", EPS, queries=50)]


@pytest.mark.parametrize("attack", ALL, ids=[a.key for a in ALL])
def test_no_attack_leaves_the_ball_or_the_pixel_range(attack):
    if attack.name in ("apgd_ce", "apgd_t", "square"):
        pytest.importorskip("torchattacks")
    model, w, clean, labels = linear_case(2, count=8)
    clean[:2] = clean[:2].round()   # pixels at 0 and 1: the attack must clip
    source = PixelModel(Linear(torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(9))).eval(), PIXELS)
    adversarial = run_attack(attack, model, clean, labels, Context(PIXELS, 0, torch.arange(len(labels)), source))
    delta = (adversarial - clean).flatten(1)
    size = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
    assert bool((size <= EPS * (1 + EXACT)).all()), size
    assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
    dual = w.abs().sum() if attack.norm == "linf" else w.norm()
    assert bool((score_drop(model, clean, adversarial).abs() <= EPS * dual * (1 + EXACT)).all())


def test_the_bound_is_the_one_of_w_in_pixel_space():
    """The same network under two normalisations: the score moves by eps ||v / std||_1, not eps ||v||_1."""
    _, _, clean, labels = linear_case(3)
    v = 0.05 * torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(3))
    for std in (0.2, 0.5):
        pixels = Pixels(mean=(0.1,), std=(std,))
        model = PixelModel(Linear(v).eval(), pixels)
        adversarial = run_attack(FGSM(eps=EPS), model, clean, labels, Context(pixels, 0, torch.arange(len(labels))))
        expected = EPS * v.abs().sum() / std
        assert torch.allclose(score_drop(model, clean, adversarial), expected.expand(len(labels)), rtol=EXACT)


# ------------------------------------------------------------------------------------- on digits

@pytest.fixture(scope="module")
def trained():
    """A small MLP trained on digits for a second: (model, test split, pixels)."""
    torch.manual_seed(0)
    bundle = digits(val_fraction=0.2, test_fraction=0.2, split_seed=0)
    model = mlp((1, 8, 8), 10, hidden=[32])
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(bundle.train.inputs), bundle.train.labels).backward()
        optimiser.step()
    return model.eval(), bundle.test, Pixels.of(bundle)


def test_digits_pixels_are_its_grey_levels(trained):
    _, split, pixels = trained
    levels = pixels.to_pixels(split.inputs) * 16
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert float(levels.min()) == 0 and float(levels.max()) == 16
    assert torch.allclose(pixels.to_inputs(pixels.to_pixels(split.inputs)), split.inputs, atol=1e-5)


def settings_of(attacks, samples=120, batch_size=32):
    return robustness_settings({"samples": samples, "batch_size": batch_size, "attacks": attacks}, seed=0)


def test_robust_accuracy_does_not_increase_with_epsilon(trained):
    """Tolerance: one sample in a hundred (random starts differ between radii)."""
    model, split, pixels = trained
    epsilons = [0.0, 0.05, 0.1, 0.2, 0.3]
    result = robust_accuracy(model, split, pixels, torch.device("cpu"), settings_of(
        [{"name": "pgd", "norm": "linf", "eps": e, "steps": 10} for e in epsilons]
        + [{"name": "fgsm", "norm": "linf", "eps": e} for e in epsilons[1:]]))
    accuracies = [result[f"pgd_linf_{e:g}"] for e in epsilons]
    assert accuracies[0] == pytest.approx(result["clean"])
    assert all(b <= a + 0.01 for a, b in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[-1] < result["clean"] - 0.3, accuracies   # the attack works on a standard network
    assert all(result[f"pgd_linf_{e:g}"] <= result[f"fgsm_linf_{e:g}"] + 0.01 for e in epsilons[1:])
    assert result["samples"] == 120 and result["robust_seconds"] > 0


def test_two_halves_give_the_whole(trained):
    """What trainer.devices=2 does: each rank attacks its blocks, the counts are summed."""
    model, split, pixels = trained
    attacks = [{"name": "pgd", "norm": "l2", "eps": 0.5, "steps": 3, "restarts": 2},
               {"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 3}, {"name": "noise", "sigma": 0.3},
               {"name": "transfer_pgd", "norm": "linf", "eps": 0.2, "steps": 3}]
    try:
        import torchattacks  # noqa: F401
        attacks.append({"name": "apgd_ce", "norm": "linf", "eps": 0.1, "steps": 3})
    except ImportError:
        pass
    settings = settings_of(attacks, samples=70, batch_size=16)
    teacher = mlp((1, 8, 8), 10, hidden=[16]).eval()
    device = torch.device("cpu")
    whole = robust_counts(model, split, pixels, device, settings, teacher, part=(0, 1))
    halves = [robust_counts(model, split, pixels, device, settings, teacher, part=(r, 2)) for r in range(2)]
    assert {k: halves[0][k] + halves[1][k] for k in whole} == whole
    assert whole["count"] == 70 and halves[0]["count"] == 38   # blocks 0, 2, 4 (16 + 16 + 6)
    summed = robust_accuracy(model, split, pixels, device, settings, teacher,
                             part=Part(1, 2, lambda values: [a + b for a, b in zip(values, halves[0].values())]))
    assert summed["pgd_l2_0.5"] == whole["pgd_l2_0.5"] / 70


def test_a_dataset_without_pixel_range_is_not_clipped(caplog):
    model = Linear(torch.full((1, 8, 8), 0.0125)).eval()
    split = TensorSplit(torch.full((4, 1, 8, 8), -0.2), torch.ones(4, dtype=torch.long))
    pixels = Pixels(mean=(0.0,), std=(1.0,), low=None, high=None)
    adversarial = run_attack(FGSM(eps=0.5), PixelModel(model, pixels), split.inputs, split.labels,
                             Context(pixels, 0, torch.arange(4)))
    assert torch.allclose(adversarial, torch.full_like(adversarial, -0.7))   # below 0: not clipped
    with caplog.at_level(logging.INFO, logger="jacdistill"):
        robust_accuracy(model, split, pixels, torch.device("cpu"), settings_of([{"name": "fgsm", "eps": 0.5}]))
    assert sum("no pixel range" in r.message for r in caplog.records) == 1


def test_the_network_is_attacked_in_eval_mode_with_its_gate_closed(trained):
    model, split, pixels = trained
    ready = make_jacobian_ready(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 10)))
    ready.train()
    with attacked(ready):
        assert not ready.training
    assert ready.training
    with gate_of(ready).forward_pass(activations=True):
        with pytest.raises(RuntimeError, match="gate open"):
            with attacked(ready):
                pass


BAD = [
    ({"attacks": [{"name": "pgd", "eps": -0.1}]}, "robustness.attacks[0].eps=-0.1 is not allowed"),
    ({"attacks": [{"name": "pgd", "eps": 0.1, "steps": 0}]}, "robustness.attacks[0].steps=0 is not allowed"),
    ({"attacks": [{"name": "cw", "eps": 0.1}]}, "robustness.attacks[0].name='cw' is not allowed"),
    ({"attacks": [{"name": "pgd", "norm": "l1", "eps": 0.1}]}, "robustness.attacks[0].norm='l1' is not allowed"),
    ({"attacks": [{"name": "noise", "norm": "l2", "sigma": 0.1}]}, "attack noise has no setting 'norm'"),
    ({"attacks": [{"name": "fgsm", "eps": 0.1, "steps": 3}]}, "attack fgsm has no setting 'steps'"),
    ({"samples": 0, "attacks": []}, "robustness.samples=0 is not allowed"),
    ({"attacks": [{"name": "pgd", "eps": 0.1}, {"name": "pgd", "eps": 0.1}]}, "pgd_linf_0.1 is listed twice"),
]


@pytest.mark.parametrize("node,message", BAD, ids=[m for _, m in BAD])
def test_bad_settings_are_refused_in_one_line(node, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        robustness_settings(node)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- one registry

# Computed once with the code before the attacks were built through config/registry.py (commit 337c8ab): each
# option's metric keys and the hash in the name of its remembered teacher accuracy (run/robust.remembered_path,
# for a file of 1234 bytes modified at 1_700_000_000_123_456_789 ns, on the CPU), for seeds 0 and 3.
BEFORE = {
    ("autoattack", 0): (["autoattack_linf_0.0313725"], "9b43276dc468ce8a"),
    ("autoattack", 3): (["autoattack_linf_0.0313725"], "59d96ab1e1f473b6"),
    ("digits", 0): (["fgsm_linf_0.1", "pgd_linf_0.1", "pgd_linf_0.2", "pgd_linf_0.3", "pgd_l2_1",
                     "transfer_pgd_linf_0.2", "square_linf_0.2", "noise_0.1", "noise_0.3"], "79f96b64f4bff8ab"),
    ("digits", 3): (["fgsm_linf_0.1", "pgd_linf_0.1", "pgd_linf_0.2", "pgd_linf_0.3", "pgd_l2_1",
                     "transfer_pgd_linf_0.2", "square_linf_0.2", "noise_0.1", "noise_0.3"], "4d8a87018e1a6f1a"),
    ("none", 0): ([], "a5446e9d167a7b6a"),
    ("none", 3): ([], "7a6f07e9cc6f1ac6"),
    ("standard", 0): (["fgsm_linf_0.0313725", "pgd_linf_0.0313725", "pgd_l2_0.5", "apgd_ce_linf_0.0313725",
                       "apgd_t_linf_0.0313725", "square_linf_0.0313725", "transfer_pgd_linf_0.0313725", "noise_0.05",
                       "noise_0.1"], "896dd0567e88844c"),
    ("standard", 3): (["fgsm_linf_0.0313725", "pgd_linf_0.0313725", "pgd_l2_0.5", "apgd_ce_linf_0.0313725",
                       "apgd_t_linf_0.0313725", "square_linf_0.0313725", "transfer_pgd_linf_0.0313725", "noise_0.05",
                       "noise_0.1"], "428d7b64882ee8eb"),
}
# Lists of one's own (as on the command line), seed 0, computed the same way: defaults, integers given for floats.
BEFORE_LISTS = {
    "l2_restarts": ({"attacks": [{"name": "pgd", "norm": "l2", "eps": 1, "steps": 50, "restarts": 5}]},
                    ["pgd_l2_1"], "76947691cee0764e"),
    "fgsm_plain": ({"samples": 100, "batch_size": 10, "attacks": [{"name": "fgsm", "eps": 0.1}]},
                   ["fgsm_linf_0.1"], "6a24f5388788086f"),
    "pgd_fixed": ({"attacks": [{"name": "pgd", "eps": 0.1, "step_size": 0.02, "random_start": False},
                               {"name": "transfer_pgd", "norm": "l2", "eps": 0.5, "steps": 3, "restarts": 2}]},
                  ["pgd_linf_0.1", "transfer_pgd_l2_0.5"], "0c33031a2f4462be"),
    "library": ({"attacks": [{"name": "apgd_ce", "norm": "l2", "eps": 0.5, "steps": 7, "restarts": 2},
                             {"name": "square", "norm": "l2", "eps": 0.5, "queries": 30},
                             {"name": "apgd_t", "eps": 0.1}, {"name": "autoattack", "norm": "l2", "eps": 0.5},
                             {"name": "noise", "sigma": 1}]},
                ["apgd_ce_l2_0.5", "square_l2_0.5", "apgd_t_linf_0.1", "autoattack_l2_0.5", "noise_1"],
                "dac68e602667819d"),
}


@pytest.fixture
def teacher_entry(tmp_path):
    entry = tmp_path / "teacher.pt"
    entry.write_bytes(b"x" * 1234)
    os.utime(entry, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    return entry


def keys_and_hash(node, seed, entry) -> tuple[list[str], str]:
    from jacdistill_cli.loop.robust import remembered_path

    settings = robustness_settings(node, seed)
    name = remembered_path(entry, settings, torch.device("cpu")).name
    return [attack.key for attack in settings.attacks], name.removeprefix("teacher.pt.robust-").removesuffix(".json")


@pytest.mark.parametrize("option,seed", sorted(BEFORE))
def test_every_shipped_option_keeps_its_metric_keys_and_remembered_key(option, seed, teacher_entry):
    pytest.importorskip("torchattacks")
    node = OmegaConf.create((resources.files("jacdistill_cli.conf") / "robustness" / f"{option}.yaml").read_text())
    assert keys_and_hash(node, seed, teacher_entry) == BEFORE[option, seed]


@pytest.mark.parametrize("case", sorted(BEFORE_LISTS))
def test_lists_of_ones_own_keep_their_metric_keys_and_remembered_key(case, teacher_entry):
    pytest.importorskip("torchattacks")
    node, keys, digest = BEFORE_LISTS[case]
    assert keys_and_hash(node, 0, teacher_entry) == (keys, digest)


def test_an_attacks_settings_are_its_targets_keyword_parameters():
    for name, target in ATTACKS.items():
        assert target.name == name
        takes, _ = registry.accepted_keys(target)
        with pytest.raises(UsageError) as err:
            robustness_settings({"attacks": [{"name": name, "bogus": 1}]})
        assert str(err.value) == (f"robustness.attacks[0].bogus=1 is not allowed: attack {name} has no setting "
                                  f"'bogus'; its settings are {', '.join(takes)}")
    assert registry.accepted_keys(PGD)[0] == ["norm", "eps", "steps", "step_size", "random_start", "restarts"]
    # A shipped attack named by its own target is the same attack.
    by_target = robustness_settings({"attacks": [{"_target_": "jacdistill_cli.robustness.attacks.PGD", "eps": 0.1}]})
    assert by_target == robustness_settings({"attacks": [{"name": "pgd", "eps": 0.1}]})


@dataclasses.dataclass(frozen=True)
class Overshoot(BallAttack):
    """A user's attack: `factor` times FGSM's step, beyond the ball (the measurement holds it to the ball)."""

    name: ClassVar[str] = "overshoot"
    factor: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(factor=number("factor", self.factor, low=1, allowed="it must be a number >= 1"))

    def __call__(self, model, clean, labels, context):
        gradient, _, _ = loss_gradient(model, clean, labels)
        return clean + self.factor * self.eps * ascent(gradient, self.norm)


@dataclasses.dataclass(frozen=True)
class RenamedPGD(PGD):
    """A user's PGD that keeps the shipped name: its metric would pass for the shipped attack's."""


def test_a_users_attack_is_built_from_its_target_held_to_its_ball_and_measured(trained):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "robustness=digits", "robustness.samples=120", "robustness.batch_size=32",
            f"robustness.attacks=[{{_target_:{__name__}.Overshoot,eps:0.1}},{{name:fgsm,eps:0.1}}]"])
    settings = robustness_settings(cfg.robustness)
    assert [a.key for a in settings.attacks] == ["overshoot_linf_0.1", "fgsm_linf_0.1"]
    assert settings.attacks[0].identity() == {"_target_": f"{__name__}.Overshoot", "name": "overshoot",
                                              "norm": "linf", "eps": 0.1, "factor": 3.0}
    # Held to the L-inf ball, 3 eps sign(g) is FGSM's eps sign(g): the same accuracy, sample for sample.
    model, split, pixels = trained
    result = robust_accuracy(model, split, pixels, torch.device("cpu"), settings)
    assert result["overshoot_linf_0.1"] == result["fgsm_linf_0.1"] < result["clean"] - 0.1


USERS_BAD = [
    ({"_target_": f"{__name__}.Overshoot", "eps": 0.1, "factor": 0.5},
     "robustness.attacks[0].factor=0.5 is not allowed: it must be a number >= 1"),
    ({"_target_": f"{__name__}.Overshoot", "eps": 0.1, "steps": 3},
     f"robustness.attacks[0].steps=3 is not allowed: attack {__name__}.Overshoot has no setting 'steps'; its "
     "settings are norm, eps, factor"),
    ({"_target_": f"{__name__}.Overshoot", "name": "blur", "eps": 0.1},
     f"robustness.attacks[0].name='blur' is not allowed: the attack {__name__}.Overshoot names itself 'overshoot' "
     "(its metric is overshoot_linf_0.1); leave name out"),
    ({"_target_": f"{__name__}.RenamedPGD", "eps": 0.1},
     f"robustness.attacks[0]._target_='{__name__}.RenamedPGD' is not allowed: it builds an attack named 'pgd', the "
     "name of the shipped attack jacdistill_cli.robustness.attacks.PGD; name yours otherwise"),
    ({"_target_": "torch.nn.Identity"}, "robustness.attacks[0]._target_='torch.nn.Identity' is not allowed: it must "
     "build a jacdistill_cli.robustness.attacks.Attack"),
    ({"_target_": "nowhere.Attack", "eps": 0.1},
     "robustness.attacks[0]._target_='nowhere.Attack' is not allowed: it cannot be imported"),
    ({"eps": 0.1}, "robustness.attacks[0]={'eps': 0.1} is not allowed: each attack must be a mapping with a name"),
]


@pytest.mark.parametrize("entry,message", USERS_BAD, ids=[m.split(" is not")[0] + str(i) for i, (_, m) in
                                                         enumerate(USERS_BAD)])
def test_a_users_attack_that_does_not_fit_is_one_line(entry, message):
    with pytest.raises(UsageError) as err:
        robustness_settings({"attacks": [entry]})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_teacher_training_settings():
    assert teacher_training({"training": "standard"}).identity() == {}
    trades = teacher_training({"training": "trades", "adversarial": {"eps": 0.2, "steps": 5, "beta": 3}})
    assert trades.identity() == {"training": "trades", "adversarial": {
        "norm": "linf", "eps": 0.2, "steps": 5, "step_size": 0.1, "random_start": True, "beta": 3.0}}
    for node, message in [({"training": "madry"}, "teacher.training='madry' is not allowed"),
                          ({"training": "adversarial", "adversarial": {"eps": 0}}, "teacher.adversarial.eps=0"),
                          ({"training": "adversarial", "adversarial": {"eps": 0.1, "steps": 0}},
                           "teacher.adversarial.steps=0"),
                          ({"training": "trades", "adversarial": {"eps": 0.1, "beta": -1}},
                           "teacher.adversarial.beta=-1"),
                          ({"training": "adversarial", "adversarial": {"eps": 0.1, "restarts": 2}},
                           "^teacher.adversarial.restarts=2 is not allowed: its settings are norm, eps, steps, "
                           "step_size, random_start, beta$")]:
        with pytest.raises(UsageError, match=message):
            teacher_training(node)


# ------------------------------------------------------------------------------------- robust teachers

def train(objective, bundle, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = make_jacobian_ready(mlp((1, 8, 8), 10, hidden=[32])).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for start in range(0, len(bundle.train), 256):
            inputs, labels = bundle.train.inputs[start:start + 256], bundle.train.labels[start:start + 256]
            optimiser.zero_grad()
            objective(model, None, inputs, labels)[1]["total"].backward()
            optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def bundle():
    return digits(val_fraction=0.2, test_fraction=0.2, split_seed=0)


@pytest.mark.parametrize("kind", ["adversarial", "trades"])
def test_the_inner_maximisation_raises_the_loss_inside_the_ball(kind, trained, bundle):
    model = copy.deepcopy(trained[0]).train()
    pixels = Pixels.of(bundle)
    training = teacher_training({"training": kind, "adversarial": {"eps": 0.1, "steps": 5}})
    objective = AdversarialObjective(training, pixels, seed=0)
    inputs, labels = bundle.test.inputs[:64], bundle.test.labels[:64]
    adversarial = objective.examples(model, inputs, labels)
    assert model.training   # restored after the inner maximisation (made in eval mode)
    moved = (pixels.to_pixels(adversarial) - pixels.to_pixels(inputs)).abs().amax((1, 2, 3))
    assert float(moved.max()) <= 0.1 + 1e-5 and float(moved.max()) > 0.05
    assert 0 <= float(pixels.to_pixels(adversarial).min()) and float(pixels.to_pixels(adversarial).max()) <= 1
    model.eval()
    with torch.no_grad():
        clean_loss = nn.functional.cross_entropy(model(inputs), labels)
        attacked_loss = nn.functional.cross_entropy(model(adversarial), labels)
    assert float(attacked_loss) > 2 * float(clean_loss)
    logits, terms = objective(model.train(), None, inputs, labels)
    assert logits.shape == (64, 10) and terms["total"].requires_grad
    assert set(terms) == ({"hard", "total"} if kind == "adversarial" else {"hard", "robust", "total"})


def test_adversarial_training_raises_pgd_accuracy_at_equal_epochs(bundle):
    """Digits, an MLP, 15 epochs each: PGD-10 accuracy at eps 0.1 (L-inf, pixel scale) of the test split."""
    pixels = Pixels.of(bundle)
    training = teacher_training({"training": "adversarial", "adversarial": {"eps": 0.1, "steps": 3}})
    standard = train(teacher_objective(teacher_training({}), pixels), bundle, 15)
    robust = train(teacher_objective(training, pixels, seed=0), bundle, 15)
    settings = settings_of([{"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 10}], samples=None, batch_size=400)
    measured = {name: robust_accuracy(model, bundle.test, pixels, torch.device("cpu"), settings)
                for name, model in (("standard", standard), ("adversarial", robust))}
    assert measured["adversarial"]["pgd_linf_0.1"] > measured["standard"]["pgd_linf_0.1"] + 0.2, measured
    assert measured["adversarial"]["clean"] > 0.8, measured


# ------------------------------------------------------------------------------------- jacdistill evaluate

def test_evaluate_reports_robust_accuracy_of_both_networks(tmp_path, capsys):
    import json

    from helpers import run_command
    from hydra import compose, initialize_config_module

    from jacdistill_cli.storage import write_torch
    from jacdistill_cli.zoo.checkpoints import make_checkpoint
    from jacdistill_cli.zoo.data import build_data
    from jacdistill_cli.zoo.models import build_model

    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        data = build_data(compose(config_name="train", overrides=[]).dataset)
    torch.manual_seed(0)
    paths = {}
    for role, spec in (("student", {"name": "mlp", "hidden": [16], "batchnorm": False}),
                       ("teacher", {"name": "cnn", "channels": [4], "hidden": 8, "batchnorm": True})):
        paths[role] = tmp_path / f"{role}.pt"
        write_torch(paths[role],
                    make_checkpoint(build_model(spec, data.input_shape, data.num_classes), role, spec, data, {}))
    attacks = "[{name:pgd,norm:linf,eps:0.2,steps:3},{name:transfer_pgd,norm:linf,eps:0.2,steps:3},{name:noise,sigma:0.1}]"
    result = run_command("evaluate", [f"checkpoint={paths['student']}", f"teacher.checkpoint={paths['teacher']}",
                                      "robustness.samples=50", f"robustness.attacks={attacks}"], tmp_path / "run")
    written = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert written["robust_accuracy"] == json.loads(json.dumps(result["robust_accuracy"]))
    model, teacher = (written["robust_accuracy"], written["teacher_robust_accuracy"])
    assert set(model) == {"clean", "pgd_linf_0.2", "transfer_pgd_linf_0.2", "noise_0.1", "samples", "robust_seconds"}
    assert "transfer_pgd_linf_0.2" not in teacher and model["samples"] == teacher["samples"] == 50
    assert model["pgd_linf_0.2"] <= model["clean"]
    out = capsys.readouterr().out
    assert "robust accuracy on the first 50 test samples" in out and "transfer_pgd_linf_0.2" in out


def test_the_robust_transfer_preset_is_20_valid_jobs_and_its_baselines_10():
    from helpers import compose_job, grid, one_job_per_seed_group

    from jacdistill_cli.spec.build import train_spec

    jobs = grid("robust_transfer")
    assert len(jobs) == 20
    assert {tuple(sorted(job)) for job in jobs} == {
        tuple(sorted([f"jacobian={j}", f"teacher.training={t}", f"seed={seed}", "experiment=robust_transfer"]))
        for j in ("top1", "loss") for t in ("adversarial", "standard") for seed in range(5)}
    for job in one_job_per_seed_group(jobs):
        cfg = compose_job(job)
        train_spec(cfg)
        assert cfg.alpha == 0.5 and cfg.loss.name == "kl" and cfg.trainer.epochs == 30
        training = teacher_training(cfg.teacher)
        assert training.kind == cfg.teacher.training
        assert training.identity() == ({} if training.kind == "standard" else {"training": "adversarial",
            "adversarial": {"norm": "linf", "eps": 0.2, "steps": 10, "step_size": 0.05, "random_start": True}})
        robust = robustness_settings(cfg.robustness, cfg.seed)
        assert {"pgd_linf_0.1", "pgd_linf_0.2", "pgd_linf_0.3", "transfer_pgd_linf_0.2"} <= {a.key for a in robust.attacks}
    baseline = compose_job(["experiment=robust_transfer", "recipe=ce_only", "jacobian=none",
                            "teacher.training=adversarial", "seed=0"])
    assert (baseline.loss.name, baseline.jacobian.name, baseline.alpha) == ("none", "none", 0.0)


def test_a_batchnorm_network_stays_in_eval_mode_through_every_attack(trained):
    """torchattacks restores the train mode of a model it was given in train mode: the wrapper must not pass
    that on, or BatchNorm would normalise the later blocks with their own statistics and update its buffers."""
    pytest.importorskip("torchattacks")
    _, split, pixels = trained
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "channels": [4], "hidden": 8, "batchnorm": True}, (1, 8, 8), 10).eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    settings = settings_of([{"name": "square", "norm": "linf", "eps": 0.2, "queries": 20},
                            {"name": "apgd_ce", "norm": "linf", "eps": 0.2, "steps": 2}], samples=90, batch_size=30)
    counts = robust_counts(model, split, pixels, torch.device("cpu"), settings)
    assert not model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    with torch.no_grad():
        assert counts["clean"] == (model(split.inputs[:90]).argmax(1) == split.labels[:90]).sum().item()
