"""Explanation agreement against direct computations (scipy's spearmanr, Python sets), and faithfulness where
its answer is known: a linear score, whose first-order deletion order is the best one at every step, and a
trained network, whose saliency deletes faster than random orders."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr
from torch import nn

from jacdistill_cli.config import registry
from jacdistill_cli.engine.jacobian import class_gradients
from jacdistill_cli.engine.layers import make_jacobian_ready
from jacdistill_cli.errors import UsageError
from jacdistill_cli.explain.agreement import (
    average_ranks,
    explanation_sums,
    rank_correlation,
    saliency_maps,
    top_count,
    top_overlap,
)
from jacdistill_cli.explain.faithfulness import (
    curves,
    faithfulness,
    pixel_orders,
    positions_of,
    reference_images,
    step_counts,
)
from jacdistill_cli.explain.figure import curves_image
from jacdistill_cli.explain.saliency import pixel_saliency
from jacdistill_cli.explain.settings import ExplainSettings, explain_settings
from jacdistill_cli.robustness.pixels import PixelModel, Pixels
from jacdistill_cli.zoo.data import digits
from jacdistill_cli.zoo.models import cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def tied_maps(seed: int, count: int = 40, shape=(5, 6)) -> torch.Tensor:
    """Maps of few distinct values (many ties), with constant maps among them: rows 0 and 1 all zero, row 2
    all 3."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, 4, (count, *shape), generator=generator).float()
    maps[0], maps[1], maps[2] = 0.0, 0.0, 3.0
    return maps


def python_top(values: list[float], k: int) -> set[int]:
    """The k highest pixels, ties by the lower index first."""
    return set(sorted(range(len(values)), key=lambda p: (-values[p], p))[:k])


def test_average_ranks_are_scipys():
    maps = tied_maps(0)
    expected = np.stack([rankdata(m.flatten().numpy()) for m in maps])
    assert np.array_equal(average_ranks(maps).numpy(), expected)


def test_rank_correlation_is_scipys_spearman_with_defined_values_for_constant_maps():
    a, b = tied_maps(1), tied_maps(2)
    b[3] = 1.0                                       # one constant map against a varying one
    rho = rank_correlation(a, b)
    assert not rho.isnan().any()
    for i in range(len(a)):
        constant = [len(set(m[i].flatten().tolist())) == 1 for m in (a, b)]
        if all(constant):
            assert rho[i] == 1.0, i                  # rows 0, 1 (zero against zero), 2 (3 against 3)
        elif any(constant):
            assert rho[i] == 0.0, i                  # row 3
        else:
            expected = spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
            assert rho[i].item() == pytest.approx(expected, abs=1e-6), i
    assert rho[:3].tolist() == [1.0, 1.0, 1.0] and rho[3] == 0.0


def test_top_overlap_is_the_python_set_overlap_with_ties_by_lower_index():
    a, b = tied_maps(3), tied_maps(4)
    b[5] = 2.0
    overlap = top_overlap(a, b)
    k = top_count(30)
    assert k == 3 and top_count(64) == 7 and top_count(1024) == 103 and top_count(10) == 1
    for i in range(len(a)):
        first, second = python_top(a[i].flatten().tolist(), k), python_top(b[i].flatten().tolist(), k)
        assert overlap[i].item() == pytest.approx(len(first & second) / len(first | second), abs=1e-7), i
    assert overlap[0] == 1.0 and overlap[2] == 1.0   # constant maps take the same first k pixels


def test_saliency_maps_sum_magnitudes_over_channels():
    gradients = torch.tensor([[[[1.0, -2.0]], [[-3.0, 0.5]]]])   # [1, 2, 1, 2]
    assert saliency_maps(gradients).tolist() == [[[4.0, 2.5]]]
    assert saliency_maps(torch.tensor([[-1.0, 2.0]])).tolist() == [[1.0, 2.0]]


def test_batch_sums_are_the_per_sample_values_summed():
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(16, 3, 8, 8, generator=generator), torch.randn(16, 3, 8, 8, generator=generator)
    teacher[4] = 0.0
    sums = explanation_sums(student, teacher)
    maps_s, maps_t = saliency_maps(student), saliency_maps(teacher)
    assert set(sums) == {"explanation_rank_correlation", "explanation_top10_iou"}
    assert all(value.dim() == 0 for value in sums.values())
    assert sums["explanation_rank_correlation"].item() == pytest.approx(rank_correlation(maps_s, maps_t).sum().item())
    assert sums["explanation_top10_iou"].item() == pytest.approx(top_overlap(maps_s, maps_t).sum().item())


@pytest.fixture(scope="module")
def bundle():
    return digits(val_fraction=0.2, test_fraction=0.2, split_seed=0)


@pytest.fixture(scope="module")
def trained(bundle):
    """The zoo's cnn trained on digits for about a second: 97% test accuracy."""
    torch.manual_seed(0)
    model = make_jacobian_ready(cnn((1, 8, 8), 10, channels=[16, 32], hidden=64)).train()
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        order = torch.randperm(len(bundle.train), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start:start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(bundle.train.inputs[index]), bundle.train.labels[index]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(bundle.test.inputs).argmax(1) == bundle.test.labels).float().mean() > 0.9
    return model


def test_a_network_compared_with_itself_agrees_fully(trained, bundle):
    inputs = bundle.test.inputs[:64]
    gradients = []
    for _ in range(2):
        leaf = inputs.clone().requires_grad_(True)
        logits = trained(leaf)
        gradients.append(class_gradients(logits, leaf, logits.argmax(1), create_graph=False))
    sums = explanation_sums(*gradients)
    assert sums["explanation_rank_correlation"].item() == pytest.approx(64, abs=1e-4)
    assert sums["explanation_top10_iou"].item() == 64


class Linear(nn.Module):
    """logits [b, 2] = (0, v . x) of normalised inputs x [b, 3, 4, 4]."""

    def __init__(self, v: torch.Tensor):
        super().__init__()
        self.v = nn.Parameter(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x.flatten(1) * self.v.flatten()).sum(1)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_deleting_by_gradient_x_input_lowers_a_linear_logit_at_least_as_fast_as_any_random_order():
    """logit(p) = w . p + b in pixels; deleting pixel q (baseline 0) lowers it by a_q = sum over channels of
    w * p at q, so deleting by decreasing a_q removes the most at every step."""
    generator = torch.Generator().manual_seed(6)
    pixels = Pixels(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    model = PixelModel(Linear(torch.randn(3, 4, 4, generator=generator)).eval(), pixels)
    clean = torch.rand(8, 3, 4, 4, generator=generator)
    classes = torch.ones(8, dtype=torch.long)
    baseline = torch.zeros_like(clean)
    settings = ExplainSettings(True, saliency="gradient_x_input", steps=16, random_orders=50)
    indices = torch.arange(8)
    saliency = pixel_saliency(model, clean, classes, baseline, pixels, settings, indices)
    w = model.model.v.detach() / torch.tensor(pixels.std).view(3, 1, 1)    # the logit's weights in pixels
    assert torch.allclose(saliency, (w * clean).sum(1).flatten(1), atol=1e-5)
    positions = positions_of(pixel_orders(saliency, settings.random_orders, 0, indices))

    def logit(images):
        with torch.no_grad():
            return model(images)[:, 1]

    points = curves(logit, clean, baseline, positions, step_counts(16, 16))    # [8, 51, 17]
    assert (points[:, :1] <= points[:, 1:] + 1e-5).all()
    assert (points[:, 0, 1:-1] < points[:, 1:, 1:-1].mean(1) - 1e-3).all()   # strictly below the random mean
    assert torch.allclose(points[:, :, 0], logit(clean)[:, None].expand(8, 51))
    assert torch.allclose(points[:, :, -1], logit(baseline)[:, None].expand(8, 51))


def shipped(option: str, **changes) -> ExplainSettings:
    node = registry.shipped_node("explain", option)
    node.update(changes)
    return explain_settings(node, seed=0)


def test_the_trained_networks_saliency_deletes_faster_and_inserts_faster_than_random_orders(trained, bundle):
    settings = shipped("digits", samples=60, steps=8)
    assert settings.saliency == "gradient" and settings.random_orders >= 20
    result = faithfulness(trained, bundle.test, Pixels.of(bundle), torch.device("cpu"), settings)
    assert result["samples"] == 60 and len(result["deletion_curve"]) == 9
    assert result["fractions"] == [j * 64 // 8 / 64 for j in range(9)]
    assert result["deletion_area"] < result["random_deletion_area"] - 0.05
    assert result["insertion_area"] > result["random_insertion_area"] + 0.05
    assert all(isinstance(result[k], float) for k in result if k.endswith("_area"))
    assert result["deletion_curve"][0] == pytest.approx(result["insertion_curve"][-1])   # both: the clean image
    assert result["random_deletion_curve"][0] == pytest.approx(result["deletion_curve"][0])


def test_two_parts_and_other_blocks_give_the_whole(trained, bundle):
    """What trainer.devices=2 does: each rank its blocks, the sums added; and a sample's curves do not
    depend on the block it is in (smoothgrad's noise and the random orders are seeded by its index)."""
    pixels, cpu = Pixels.of(bundle), torch.device("cpu")
    settings = shipped("digits", samples=24, steps=4, saliency="smoothgrad", smoothgrad={"samples": 4},
                       batch_size=5)
    whole = faithfulness(trained, bundle.test, pixels, cpu, settings)
    halves = [faithfulness(trained, bundle.test, pixels, cpu, settings, part=(rank, 2),
                           reduce=lambda sums: sums) for rank in (0, 1)]
    other = faithfulness(trained, bundle.test, pixels, cpu, shipped("digits", samples=24, steps=4, batch_size=24,
                         saliency="smoothgrad", smoothgrad={"samples": 4}))
    assert halves[0]["samples"] + halves[1]["samples"] == whole["samples"] == 24
    for key in ("deletion_curve", "insertion_curve", "random_deletion_curve", "random_insertion_curve"):
        added = [(a * halves[0]["samples"] + b * halves[1]["samples"]) / 24
                 for a, b in zip(halves[0][key], halves[1][key])]
        assert added == pytest.approx(whole[key], abs=1e-6), key
        assert other[key] == pytest.approx(whole[key], abs=1e-6), key


def test_references_in_pixel_space():
    pixels = Pixels(mean=(0.3,), std=(0.2,))
    image = torch.rand(2, 1, 8, 8)
    assert reference_images(image, "zero", pixels, 1.0).eq(0).all()
    assert torch.allclose(reference_images(image, "mean", pixels, 1.0), torch.full_like(image, 0.3))
    flat = torch.full((1, 3, 8, 8), 0.7)
    assert torch.allclose(reference_images(flat, "blur", pixels, 5.0), flat)   # a wide kernel, capped at 15
    blurred = reference_images(image, "blur", pixels, 1.0)
    assert blurred.shape == image.shape and blurred.std() < image.std()


def test_none_measures_nothing(bundle):
    settings = explain_settings(None)
    assert settings == explain_settings(registry.shipped_node("explain", "none")) and not settings.enabled
    assert faithfulness(nn.Linear(64, 10), bundle.test, Pixels.of(bundle), torch.device("cpu"), settings) == {}


@pytest.mark.parametrize("changes,message", [
    ({"name": "bogus"}, "explain.name='bogus' is not allowed"),
    ({"saliency": "lime"}, "explain.saliency='lime' is not allowed: it must be one of gradient, gradient_x_input, "
                           "smoothgrad"),
    ({"steps": 0}, "explain.steps=0 is not allowed"),
    ({"steps": -3}, "explain.steps=-3 is not allowed"),
    ({"samples": 0}, "explain.samples=0 is not allowed"),
    ({"samples": -1}, "explain.samples=-1 is not allowed"),
    ({"random_orders": 0}, "explain.random_orders=0 is not allowed"),
    ({"baseline": "white"}, "explain.baseline='white' is not allowed"),
    ({"blur_sigma": 0}, "explain.blur_sigma=0 is not allowed"),
    ({"smoothgrad": {"noise": 0}}, "explain.smoothgrad.noise=0 is not allowed"),
    ({"smoothgrad": {"copies": 3}}, "explain.smoothgrad.copies=3 is not allowed"),
    ({"sample": 3}, "explain.sample is not a setting"),
    ({"seed": 3}, "explain.seed is not a setting"),
])
def test_bad_settings_are_refused_in_one_line(changes, message):
    with pytest.raises(UsageError) as caught:
        shipped("digits", **changes)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.slow   # matplotlib builds its font cache in a fresh config directory: it runs fc-list
def test_the_curves_image_is_rgb_and_drawn_without_warnings():
    fractions = [j / 4 for j in range(5)]
    result = {"fractions": fractions, "samples": 10, "deletion_curve": [0.9, 0.4, 0.2, 0.1, 0.1],
              "insertion_curve": [0.2, 0.6, 0.8, 0.9, 0.9], "random_deletion_curve": [0.9, 0.7, 0.5, 0.3, 0.1],
              "random_insertion_curve": [0.2, 0.4, 0.6, 0.8, 0.9], "deletion_area": 0.3, "insertion_area": 0.7,
              "random_deletion_area": 0.5, "random_insertion_area": 0.55}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = curves_image({"student": result, "teacher": result})
        empty = curves_image({"student": {}})
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert empty.shape == image.shape
    colours = {tuple(pixel) for pixel in image.reshape(-1, 3)[::7].tolist()}
    assert len(colours) > 20 and not math.isnan(float(image.mean()))


@pytest.mark.parametrize("option", ["none", "digits", "standard"])
def test_every_shipped_option_composes_with_hydra_and_is_valid(option):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"explain={option}", "seed=4"])
    settings = explain_settings(cfg.explain, seed=cfg.seed)
    assert settings.enabled == (option != "none") and settings.seed == 4
    assert registry.label("explain", cfg.explain) == option
