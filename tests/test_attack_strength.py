"""Our PGD is at least as strong as torchattacks' PGD and PGDL2 with the same epsilon, steps and step size.

On an MLP trained adversarially on digits in process (L-inf 0.2, PGD-5, 10 epochs: robust accuracy about 0.4 at
L2 0.75 and L-inf 0.2, away from 0 and 1, where a weaker attack shows), attacked on all 1797 digits (the attack's
strength is the question, not generalisation; more samples, a smaller spread over seeds). Both attacks draw their
random starts from their seeds; torchattacks' spread over its seeds is the tolerance: our mean over seeds may not
exceed the reference's highest. With the random L2 start uniform in the ball's volume (nearly on its sphere) our
L2 accuracy read 0.438 against the reference's 0.423 to 0.429; now 0.424.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from jacdistill_cli.engine.layers import make_jacobian_ready
from jacdistill_cli.robustness.measure import robust_accuracy
from jacdistill_cli.robustness.pixels import PixelModel, Pixels, attacked
from jacdistill_cli.robustness.settings import robustness_settings, teacher_training
from jacdistill_cli.robustness.training import teacher_objective
from jacdistill_cli.zoo.data import TensorSplit, digits
from jacdistill_cli.zoo.models import mlp

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = range(5)
STEPS = 10
ATTACKS = [("l2", 0.75), ("linf", 0.2)]


@pytest.fixture(scope="module")
def robust_mlp():
    """(an MLP trained with PGD examples, every digit as a split, pixels)."""
    bundle = digits(val_fraction=0.2, test_fraction=0.2, split_seed=0)
    pixels = Pixels.of(bundle)
    training = teacher_training({"training": "adversarial", "adversarial": {"eps": 0.2, "steps": 5}})
    objective = teacher_objective(training, pixels, seed=0)
    torch.manual_seed(0)
    model = make_jacobian_ready(mlp((1, 8, 8), 10, hidden=[64])).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(10):
        for start in range(0, len(bundle.train), 256):
            optimiser.zero_grad()
            objective(model, None, bundle.train.inputs[start:start + 256],
                      bundle.train.labels[start:start + 256])[1]["total"].backward()
            optimiser.step()
    splits = (bundle.train, bundle.val, bundle.test)
    every = TensorSplit(torch.cat([s.inputs for s in splits]), torch.cat([s.labels for s in splits]))
    return model.eval(), every, pixels


def reference(model, split, pixels, norm: str, eps: float, seed: int) -> float:
    """torchattacks' robust accuracy (clean and adversarial both right) with our step size, 2.5 eps / steps."""
    import torchattacks

    target = PixelModel(model, pixels)
    clean, labels = pixels.to_pixels(split.inputs), split.labels
    attack = (torchattacks.PGDL2 if norm == "l2" else torchattacks.PGD)(target, eps=eps, alpha=2.5 * eps / STEPS,
                                                                        steps=STEPS)
    with attacked(model), torch.random.fork_rng():
        torch.manual_seed(seed)
        adversarial = attack(clean, labels)
        with torch.no_grad():
            robust = (target(clean).argmax(1) == labels) & (target(adversarial).argmax(1) == labels)
    return robust.float().mean().item()


def test_our_pgd_is_never_weaker_than_torchattacks_beyond_its_spread_over_seeds(robust_mlp):
    pytest.importorskip("torchattacks")
    model, split, pixels = robust_mlp
    entries = [{"name": "pgd", "norm": norm, "eps": eps, "steps": STEPS} for norm, eps in ATTACKS]
    ours = [robust_accuracy(model, split, pixels, torch.device("cpu"),
                            robustness_settings({"batch_size": 2000, "attacks": entries}, seed=seed))
            for seed in SEEDS]
    for norm, eps in ATTACKS:
        key = f"pgd_{norm}_{eps:g}"
        mine = [result[key] for result in ours]
        theirs = [reference(model, split, pixels, norm, eps, seed) for seed in SEEDS]
        assert 0.2 < min(theirs) and max(theirs) < 0.8, (key, theirs)   # a comparison that can show a difference
        assert statistics.fmean(mine) <= max(theirs), (key, mine, theirs)
