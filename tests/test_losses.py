"""The logit losses (KL, DKD, DIST, logit standardization) against independent reference computations on
fixed logits, their recipes and published settings, and each one training through the objective with every
Jacobian method."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import method
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch import nn

from jacdistill_cli.config.resolvers import register_resolvers
from jacdistill_cli.engine import losses
from jacdistill_cli.engine.objective import cross_entropy_objective, distillation_objective
from jacdistill_cli.spec.build import objective_spec, train_spec
from jacdistill_cli.spec.reader import Reader

register_resolvers()

METHODS = {"none": {}, "top1": {}, "target": {}, "exact": {}, "projected": {"num_projections": 2},
           "noise": {"sigma": 0.1, "samples": 2}}


def fixed_logits(batch: int = 6, classes: int = 5, seed: int = 0, scale: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, labels


def reference_kl(student, teacher, temperature):
    """T^2 KL(p_T || p_S) per sample, from the probabilities."""
    p, q = (teacher / temperature).softmax(1), (student / temperature).softmax(1)
    return (p * (p.log() - q.log())).sum(1) * temperature ** 2


# --------------------------------------------------------------------------------------------- DKD

@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_recomposes_kd_per_sample(temperature):
    """Zhao et al.: KD = TCKD + (1 - p_t) NCKD per sample, p_t the teacher's target-class probability."""
    student, teacher, labels = fixed_logits()
    tckd, nckd = losses.dkd_parts(student, teacher, labels, temperature)
    p_target = (teacher / temperature).softmax(1).gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, reference_kl(student, teacher, temperature),
                               rtol=1e-12, atol=1e-12)
    # The identity is per sample: the batch means do not recompose in general.
    assert abs((tckd.mean() + (1 - p_target).mean() * nckd.mean()) - reference_kl(student, teacher, temperature).mean()) > 1e-3


def test_dkd_parts_against_their_definitions_and_mdistillers_form():
    student, teacher, labels = fixed_logits(seed=1)
    temperature = 4.0
    p, q = (teacher / temperature).softmax(1), (student / temperature).softmax(1)
    target = F.one_hot(labels, 5).bool()
    b_teacher = torch.stack([p[target], 1 - p[target]], 1)
    b_student = torch.stack([q[target], 1 - q[target]], 1)
    tckd = (b_teacher * (b_teacher / b_student).log()).sum(1) * temperature ** 2
    others_teacher = p[~target].view(6, 4) / (1 - p[target])[:, None]
    others_student = q[~target].view(6, 4) / (1 - q[target])[:, None]
    nckd = (others_teacher * (others_teacher / others_student).log()).sum(1) * temperature ** 2
    ours = losses.dkd_parts(student, teacher, labels, temperature)
    torch.testing.assert_close(ours[0], tckd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], nckd, rtol=1e-10, atol=1e-12)
    # mdistiller's dkd_loss: the non-target softmax by subtracting 1000 from the target logit.
    mask = target.double()
    log_student = F.log_softmax(student / temperature - 1000.0 * mask, dim=1)
    teacher_part = F.softmax(teacher / temperature - 1000.0 * mask, dim=1)
    mdistiller_nckd = F.kl_div(log_student, teacher_part, reduction="sum") * temperature ** 2 / 6
    loss = losses.dkd(student, teacher, labels, temperature=temperature, tckd_weight=1.0, nckd_weight=8.0)
    torch.testing.assert_close(loss, tckd.mean() + 8.0 * mdistiller_nckd, rtol=1e-10, atol=1e-12)


def test_dkd_warmup_is_linear_in_the_1_based_epoch_and_none_means_past_it():
    student, teacher, labels = fixed_logits(seed=2)
    dkd = functools.partial(losses.dkd, temperature=4.0, warmup_epochs=20)
    full = dkd(student, teacher, labels)
    assert torch.equal(dkd(student, teacher, labels, epoch=None), full)
    torch.testing.assert_close(dkd(student, teacher, labels, epoch=1), full / 20)
    torch.testing.assert_close(dkd(student, teacher, labels, epoch=10), full / 2)
    assert torch.equal(dkd(student, teacher, labels, epoch=20), full)
    assert torch.equal(dkd(student, teacher, labels, epoch=200), full)
    assert torch.equal(losses.dkd(student, teacher, labels, epoch=1, warmup_epochs=0), full)


def test_the_objective_passes_labels_and_epoch_to_a_loss_that_takes_them():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 5), nn.Linear(4, 5).requires_grad_(False)
    x, labels = torch.randn(6, 4), torch.arange(6) % 5
    objective = distillation_objective(functools.partial(losses.dkd, temperature=4.0, warmup_epochs=4), 0.0, 0.0,
                                       method("none"))
    expected = losses.dkd(student(x), teacher(x), labels, temperature=4.0)
    torch.testing.assert_close(objective(student, teacher, x, labels)[1]["distill"], expected)
    torch.testing.assert_close(objective(student, teacher, x, labels, epoch=1)[1]["distill"], expected / 4)
    torch.testing.assert_close(objective(student, teacher, x, labels, epoch=7)[1]["total"], expected)
    # Losses that take neither get neither; the teacher's objective takes the keyword and ignores it.
    kl = distillation_objective(functools.partial(losses.kl, temperature=4.0), 0.0, 0.0, method("none"))
    assert torch.equal(kl(student, teacher, x, labels, epoch=3)[1]["distill"], kl(student, teacher, x, labels)[1]["distill"])
    assert torch.equal(cross_entropy_objective(student, None, x, labels, epoch=2)[1]["total"],
                       F.cross_entropy(student(x), labels))


# --------------------------------------------------------------------------------------------- DIST

def test_dist_matches_pearson_correlations_computed_with_corrcoef():
    student, teacher, _ = fixed_logits(seed=3)
    y_s, y_t = (student / 4.0).softmax(1), (teacher / 4.0).softmax(1)
    inter = torch.stack([torch.corrcoef(torch.stack([y_s[b], y_t[b]]))[0, 1] for b in range(6)])
    intra = torch.stack([torch.corrcoef(torch.stack([y_s[:, c], y_t[:, c]]))[0, 1] for c in range(5)])
    expected = 16 * (0.5 * (1 - inter.mean()) + 2.0 * (1 - intra.mean()))
    got = losses.dist(student, teacher, temperature=4.0, inter_weight=0.5, intra_weight=2.0)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_dist_is_zero_for_identical_rows_and_blind_to_a_constant_added_to_logits():
    student, teacher, _ = fixed_logits(batch=4, seed=4)
    # Zero up to the epsilon (1e-8) that the Pearson correlation adds to the product of the centred norms.
    y = (student / 4.0).softmax(1)
    rows, columns = y - y.mean(1, keepdim=True), y - y.mean(0, keepdim=True)
    bound = 16 * 1e-8 * (1 / rows.pow(2).sum(1).min() + 1 / columns.pow(2).sum(0).min())
    assert losses.dist(student, student.clone(), temperature=4.0).abs() <= bound < 1e-3
    base = losses.dist(student, teacher, temperature=4.0)
    assert base > 0.1
    torch.testing.assert_close(losses.dist(student + 7.5, teacher, temperature=4.0), base)
    per_row = torch.linspace(-3, 3, 4, dtype=torch.float64)[:, None]
    torch.testing.assert_close(losses.dist(student, teacher - per_row, temperature=4.0), base)


# --------------------------------------------------------------------------------------------- standardization

LOGIT_LOSSES = {
    "kl": functools.partial(losses.kl, temperature=2.0),
    "mse": functools.partial(losses.mse, temperature=2.0),
    "dkd": functools.partial(losses.dkd, temperature=2.0),
    "dist": functools.partial(losses.dist, temperature=2.0),
}


def call(name, student, teacher, labels, **settings):
    loss = functools.partial(LOGIT_LOSSES[name], **settings)
    return loss(student, teacher, labels) if name == "dkd" else loss(student, teacher)


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
@pytest.mark.parametrize("network", ["student", "teacher"])
def test_standardization_makes_the_loss_blind_to_shift_and_scale(name, network):
    """Per sample (a batch of one; DIST's intra-class relation spans the batch, so its batch is one
    transformation per sample), up to the epsilon of the standard deviation."""
    student, teacher, labels = fixed_logits(batch=4, seed=5)
    shift = torch.tensor([[5.0], [-2.0], [0.3], [11.0]], dtype=torch.float64)
    scale = torch.tensor([[0.5], [3.0], [1.7], [8.0]], dtype=torch.float64)
    moved = {"student": (student * scale + shift, teacher), "teacher": (student, teacher * scale + shift)}[network]
    rows = [slice(None)] if name == "dist" else [slice(b, b + 1) for b in range(4)]
    for rows_of in rows:
        plain = call(name, student[rows_of], teacher[rows_of], labels[rows_of], standardize=True)
        torch.testing.assert_close(call(name, moved[0][rows_of], moved[1][rows_of], labels[rows_of], standardize=True),
                                   plain, rtol=1e-5, atol=1e-6)
    # Without it the same change moves the loss: the comparison can fail.
    assert not torch.allclose(call(name, *moved, labels), call(name, student, teacher, labels), rtol=1e-3)


def test_standardized_logits_are_z_scores_and_kl_on_them_is_the_authors_kd_loss():
    student, teacher, _ = fixed_logits(seed=6)
    z = losses.standardized(student)
    torch.testing.assert_close(z.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)
    # logit-standardization-KD's kd_loss: normalize() then KL at the base temperature, times T^2, times kd weight
    def normalize(logit):
        return (logit - logit.mean(-1, keepdim=True)) / (1e-7 + logit.std(-1, keepdim=True))
    authors = F.kl_div(F.log_softmax(normalize(student) / 2, 1), F.softmax(normalize(teacher) / 2, 1),
                       reduction="none").sum(1).mean() * 4
    torch.testing.assert_close(losses.kl(student, teacher, temperature=2.0, standardize=True, weight=9.0),
                               9 * authors, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------- configs

def compose_train(*overrides: str):
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_every_shipped_loss_builds_from_its_config_file_and_computes():
    from importlib.resources import files

    from jacdistill_cli.config.registry import bind, shipped_node

    student, teacher, labels = fixed_logits(seed=7)
    folder = files("jacdistill_cli.conf") / "loss"
    shipped = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
    assert shipped == ["ce", "dist", "dkd", "kl", "mse", "none"]
    for name in shipped:
        root = OmegaConf.create({"temperature": 4.0, "loss": shipped_node("loss", name)})
        loss = bind("loss", root.loss, positional=2)
        extra = {"labels": labels, "epoch": 3} if name == "dkd" else {}
        assert torch.isfinite(loss(student, teacher, **extra)) and root.loss.name == name


RECIPES = {  # recipe -> (loss, jacobian, alpha, hard_weight, (1 - alpha) * loss.weight, standardize)
    "dkd": ("dkd", "none", 0.0, 1.0, 1.0, False),
    "dkd_jacobian": ("dkd", "top1", 0.5, 1.0, 1.0, False),
    "kd_ls": ("kl", "none", 0.0, 0.1, 9.0, True),
    "kd_ls_jacobian": ("kl", "top1", 0.5, 0.1, 9.0, True),
    "dist": ("dist", "none", 0.0, 1.0, 2.0, False),
    "dist_jacobian": ("dist", "top1", 0.5, 1.0, 2.0, False),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_keep_the_published_distillation_weights(recipe):
    cfg = compose_train(f"recipe={recipe}")
    loss, jacobian, alpha, hard_weight, weight, standardize = RECIPES[recipe]
    assert (cfg.loss.name, cfg.jacobian.name, cfg.alpha, cfg.hard_weight) == (loss, jacobian, alpha, hard_weight)
    assert (1 - cfg.alpha) * cfg.loss.weight == weight and cfg.loss.standardize == standardize
    train_spec(cfg)


def test_kd_noise_weighs_the_unnormalised_noise_term_by_a_tenth():
    cfg = compose_train("recipe=kd_noise")
    assert (cfg.loss.name, cfg.jacobian.name, cfg.alpha, cfg.hard_weight) == ("kl", "noise", 0.1, 1.0)
    method = objective_spec(Reader(cfg)).method
    assert (method.sigma, method.samples, method.antithetic, method.form) == (0.1, 4, True, "difference")


@pytest.mark.parametrize("pair,nckd,base_temperature", [
    ("resnet56-resnet20", 2.0, 2.0), ("resnet32x4-resnet8x4", 8.0, 2.0), ("vgg13-vgg8", 6.0, 3.0)])
def test_crd_pairs_carry_the_published_per_pair_settings(pair, nckd, base_temperature):
    dkd = compose_train("experiment=crd_cifar100", f"crd_pair={pair}", "recipe=dkd")
    assert (dkd.loss.nckd_weight, dkd.loss.temperature, dkd.loss.tckd_weight, dkd.loss.warmup_epochs) == (nckd, 4.0,
                                                                                                           1.0, 20)
    ls = compose_train("experiment=crd_cifar100", f"crd_pair={pair}", "recipe=kd_ls_jacobian")
    assert (ls.loss.temperature, ls.loss.standardize, (1 - ls.alpha) * ls.loss.weight, ls.hard_weight) == (
        base_temperature, True, 9.0, 0.1)


def test_outside_the_crd_table_the_papers_defaults_hold():
    assert compose_train("recipe=dkd").loss.nckd_weight == 8.0
    assert compose_train("recipe=kd_ls").loss.temperature == 2.0


def test_crd_cifar100_sweeps_the_logit_loss_recipes():
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=crd_cifar100"], return_hydra_config=True)
    recipes = cfg.hydra.sweeper.params.recipe.split(",")
    assert {"kd", "kd_jacobian", "dkd", "dkd_jacobian", "kd_ls", "kd_ls_jacobian", "dist", "dist_jacobian"} <= set(recipes)


# --------------------------------------------------------------------------------------------- training

TRAINED_LOSSES = {
    "dkd": functools.partial(losses.dkd, temperature=4.0, warmup_epochs=2),
    "dist": functools.partial(losses.dist, temperature=4.0),
    "kl_standardized": functools.partial(losses.kl, temperature=2.0, standardize=True, weight=9.0),
}


@pytest.fixture(scope="module")
def digits_batch():
    from jacdistill_cli.zoo.data import digits_arrays

    images, labels = digits_arrays()
    return images[:32], labels[:32]


@pytest.mark.parametrize("jacobian", sorted(METHODS))
@pytest.mark.parametrize("loss", sorted(TRAINED_LOSSES))
def test_each_loss_trains_with_every_jacobian_method(loss, jacobian, digits_batch):
    images, labels = digits_batch
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval().requires_grad_(False)
    objective = distillation_objective(TRAINED_LOSSES[loss], 0.0 if jacobian == "none" else 0.3, 0.1,
                                       method(jacobian, **METHODS[jacobian]), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in student.parameters()]
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for epoch in (1, 2, 3):
        _, terms = objective(student, teacher, images, labels, epoch=epoch)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        assert all(torch.isfinite(v) for v in terms.values()), terms
        assert terms["distill"] > 0 and (jacobian == "none" or terms["jacobian"].requires_grad)
    assert all(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
