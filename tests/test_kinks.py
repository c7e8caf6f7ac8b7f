"""The pieces of a piecewise network (`proofs.kinks`), and `check`'s noise row on a sample that lies within sigma
of a ReLU's kink: the pairs that cross it are left out, counted, and the rest meet the limit."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from jacdistill_cli.engine.layers import make_jacobian_ready
from jacdistill_cli.engine.methods import Noise
from jacdistill_cli.proofs.kinks import choices, same_piece
from jacdistill_cli.proofs.verify import NOISE_LIMIT_TOLERANCE, NOISE_SIGMAS, check_method, noise_limit_errors

pytestmark = pytest.mark.usefixtures("one_thread")


class Where(nn.Module):
    """A ReLU written by hand, as a user's model may: its choice is a comparison."""

    def forward(self, x):
        return torch.where(x > 0, x, torch.zeros_like(x))


class Clamp(nn.Module):
    def forward(self, x):
        return x.clamp(min=0)


class Maximum(nn.Module):
    def forward(self, x):
        return torch.maximum(x, torch.zeros_like(x))


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.ReLU(inplace=True), Where(), nn.Hardtanh(), nn.LeakyReLU(),
                                        nn.ReLU6(), Clamp(), Maximum()])
def test_choices_change_exactly_where_an_activation_crosses_its_kink(activation):
    net = nn.Sequential(nn.Linear(2, 1, bias=False), activation).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
    at = lambda first: choices(net, torch.tensor([[first, 5.0]], dtype=torch.float64))  # noqa: E731
    assert at(0.5) and same_piece(at(0.5), at(0.25))
    assert not same_piece(at(0.5), at(-1.25))


def test_max_pooling_winners_are_choices_and_smooth_networks_have_none():
    pool = nn.Sequential(nn.MaxPool2d(2)).double()
    x = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]], dtype=torch.float64)
    swapped = torch.tensor([[[[2.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)
    assert same_piece(choices(pool, x), choices(pool, x * 2))
    assert not same_piece(choices(pool, x), choices(pool, swapped))
    smooth = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    assert choices(smooth, torch.randn(1, 4, dtype=torch.float64)) == []


def test_a_transformer_layer_in_eval_mode_shows_its_relu():
    """nn.TransformerEncoderLayer's inference fast path runs its ReLU inside one fused op; `choices` runs with
    gradients enabled, where the layer takes its plain path."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().eval()
    assert choices(layer, torch.randn(1, 3, 8, dtype=torch.float64))


def near_a_kink() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A student and a ReLU teacher on 4 samples, where sample 0 puts the teacher's first hidden unit at 1e-7
    from its kink (its slope along a unit direction ~1, so most draws at sigma 1e-5 cross it)."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    inputs = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        w = teacher[0].weight[0]
        teacher[0].weight[0] = w / w.norm()
        teacher[0].bias[0] = 1e-7 - teacher[0].weight[0] @ inputs[0]
    return make_jacobian_ready(student).train(), make_jacobian_ready(teacher).eval(), inputs, torch.arange(4) % 3


def test_the_noise_row_leaves_out_the_pairs_that_cross_a_kink_and_meets_the_limit_on_the_rest():
    student, teacher, inputs, labels = near_a_kink()
    method = OmegaConf.load("conf/jacobian/noise.yaml")
    report = check_method(method, student, teacher, inputs, labels, 0)
    assert report.passed, report.failures
    limit = report.noise_limit
    assert limit.pairs == 4 * 4
    # Sample 0's pairs cross at sigma 1e-5 (those along which the unit moves less than 1e-7 do not).
    assert 1 <= limit.left_out[NOISE_SIGMAS[-1]] <= 4
    assert limit.errors[NOISE_SIGMAS[-1]] < NOISE_LIMIT_TOLERANCE
    assert "pairs left out" in report.notes()[0]


def test_over_every_pair_the_kink_breaks_the_limit_and_far_from_it_nothing_is_left_out():
    student, teacher, inputs, labels = near_a_kink()
    method = Noise(sigma=0.1, samples=4)
    near = noise_limit_errors(method, student, teacher, inputs, labels, 0)
    assert near.every_pair[NOISE_SIGMAS[-1]] > NOISE_LIMIT_TOLERANCE > near.errors[NOISE_SIGMAS[-1]]
    with torch.no_grad():
        teacher[0].bias[0] += 1.0
    far = noise_limit_errors(method, student, teacher, inputs, labels, 0)
    assert far.left_out[NOISE_SIGMAS[-1]] == 0
    assert far.errors[NOISE_SIGMAS[-1]] == far.every_pair[NOISE_SIGMAS[-1]] < NOISE_LIMIT_TOLERANCE
