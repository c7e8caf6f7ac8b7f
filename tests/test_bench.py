"""`jacdistill bench` on tiny networks: the table and bench.json, the naive reference's Jacobians.
Timing targets are for the command; they are not asserted here."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from jacdistill_cli.engine.jacobian import full_jacobian
from jacdistill_cli.proofs import benchmark

sys.path.insert(0, str(Path(__file__).parent))
from helpers import run_command

TINY = ["classes=[10]", "batch_size=4", "input_shape=[1,8,8]", "warmup=1", "repeats=2", "student.channels=[4,4]",
        "student.hidden=8", "teacher.channels=[6,6]", "teacher.hidden=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_full_comparison_times_every_strategy_and_both_naive_loops(tmp_path, capsys):
    results = run_command("bench", [*TINY, "comparison=full", "data_batches=20"], tmp_path)
    out = capsys.readouterr().out
    for label in ("plain KD (jacobian=none)", "top1", "target", "projected (1 projection)", "noise (1 sample)",
                  "exact (auto = loop)", "exact (loop)", "exact (batched)", "exact (func)",
                  "naive: backward + x.grad", "naive: autograd.grad loop"):
        assert any(line.startswith(label) for line in out.splitlines()), label
    assert "exact strategy=auto runs loop" in out
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["device"] == "cpu" and saved["threads"] == 1 and saved["input_shape"] == [1, 8, 8]
    assert (saved["comparison"], saved["bench_pair"], saved["budget_seconds"]) == ("full", "cnn", 60)
    assert saved == json.loads(json.dumps(results))
    (table,) = saved["tables"]
    assert table["classes"] == 10
    rows = {row["step"]: row for row in table["rows"]}
    assert rows["plain KD (jacobian=none)"]["x_kd"] == 1.0
    for row in rows.values():
        assert row["steps_timed"] >= 1 and math.isfinite(row["median_ms"]) and row["median_ms"] > 0
    assert rows["naive: backward + x.grad"]["speedup_vs_naive"] == 1.0
    assert rows["exact (auto = loop)"]["target"] == ">= 1.5x faster than naive"
    assert rows["top1"]["target"] == "<= 2.5x plain KD" and rows["noise (1 sample)"]["target"] == "<= 3.3x plain KD"
    assert all(isinstance(c["met"], bool) for c in table["checks"])
    # Every exact strategy computes the naive loop's Jacobians.
    assert set(table["jacobian_agreement"]) == {"auto", "loop", "batched", "func"}
    assert max(table["jacobian_agreement"].values()) < 1e-5
    assert table["auto_vs_best"]["auto"] == "loop"
    assert {c["what"].split(":")[0] for c in table["checks"]} >= {"top1", "noise (1 sample)"}
    # The data-path row: the training batches of the default dataset against the fastest benched step.
    row = saved["data_path"]
    assert (row["dataset"], row["batches"], row["batch_size"], row["split"]) == ("digits", 20, 4, "TensorSplit")
    fastest = min(rows, key=lambda name: rows[name]["median_ms"])   # plain KD or noise, whichever timed faster
    assert row["fastest_step"] == f"10 classes: {fastest}"
    assert row["x_fastest_step"] == pytest.approx(row["batches_per_second"] * rows[fastest]["median_ms"] / 1000)
    assert any(line.startswith("data path: dataset=digits training split (1079 samples of 1x8x8")
               for line in out.splitlines())
    # The header names what the steps were timed on: random inputs of input_shape, not the data path's dataset.
    assert "each step on one batch of 4 random inputs of 1x8x8 (input_shape)" in out.splitlines()[0]


def test_the_default_comparison_times_what_every_target_needs_at_10_and_100_classes(tmp_path, capsys):
    """No fixed strategy and one naive loop, both class counts: each target's check is still made."""
    tiny = [o for o in TINY if not o.startswith(("classes=", "warmup=", "repeats="))]
    saved = run_command("bench", [*tiny, "warmup=0", "repeats=1", "data_batches=0"], tmp_path)
    capsys.readouterr()
    assert (saved["comparison"], saved["strategies"], saved["naive"]) == ("quick", [], ["backward"])
    assert [table["classes"] for table in saved["tables"]] == [10, 100]
    for table in saved["tables"]:
        assert [row["step"] for row in table["rows"]] == [
            "plain KD (jacobian=none)", "top1", "target", "projected (1 projection)", "noise (1 sample)",
            "exact (auto = loop)", "naive: backward + x.grad"]
        targets = {row["step"]: row["target"] for row in table["rows"] if "target" in row}
        speedup = {10: 1.5, 100: 4}[table["classes"]]
        assert targets == {"top1": "<= 2.5x plain KD", "target": "<= 2.5x plain KD",
                           "projected (1 projection)": "<= 2.5x plain KD", "noise (1 sample)": "<= 3.3x plain KD",
                           "exact (auto = loop)": f">= {speedup}x faster than naive"}
        assert len(table["checks"]) == 6   # those five and the Jacobians' agreement with the naive loop's
        assert set(table["jacobian_agreement"]) == {"auto"} and "auto_vs_best" not in table
    assert "data_path" not in saved


def test_the_bench_pair_is_an_option_and_either_side_can_be_overridden():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        default = compose(config_name="bench")
        paper = compose(config_name="bench", overrides=["teacher=vgg9", "student=vgg4"])
        full = compose(config_name="bench", overrides=["comparison=full"])
    assert (default.teacher.name, default.teacher.channels, default.student.channels) == ("cnn", [32, 64], [16, 32])
    assert (paper.teacher.name, paper.teacher.depth, paper.student.depth) == ("vgg", 9, 4)
    assert (default.strategies, default.naive, default.budget_seconds) == ([], ["backward"], 20)
    assert (full.strategies, full.naive, full.budget_seconds) == (["loop", "batched", "func"], ["backward", "grad"], 60)


VIT = ["bench_pair=vit", "classes=[3]", "batch_size=2", "input_shape=[1,8,8]", "warmup=0", "repeats=1",
       "data_batches=0", "teacher.patch_size=4", "student.patch_size=4", "teacher.dim=8", "student.dim=8",
       "teacher.depth=1", "student.depth=1", "teacher.heads=2", "student.heads=2"]


def test_the_vit_pair_times_every_method_and_the_naive_loop_through_attention(tmp_path, capsys):
    """bench_pair=vit: the zoo's ViT as teacher and student; the naive loop differentiates the attention's
    input-gradient again (the math kernel), and exact's Jacobians equal its."""
    saved = run_command("bench", VIT, tmp_path)
    capsys.readouterr()
    assert saved["bench_pair"] == "vit"
    assert (saved["teacher"]["name"], saved["teacher"]["dim"], saved["student"]["dim"]) == ("vit", 8, 8)
    (table,) = saved["tables"]
    assert [row["step"] for row in table["rows"]] == [
        "plain KD (jacobian=none)", "top1", "target", "projected (1 projection)", "noise (1 sample)",
        "exact (auto = loop)", "naive: backward + x.grad"]
    assert all(math.isfinite(row["median_ms"]) for row in table["rows"])
    targets = {row["step"]: row["target"] for row in table["rows"] if "target" in row}
    assert targets == {"top1": "<= 2.5x plain KD", "target": "<= 2.5x plain KD", "projected (1 projection)": "<= 2.5x plain KD",
                       "noise (1 sample)": "<= 3.3x plain KD"}   # no exact target at 3 classes
    assert table["jacobian_agreement"]["auto"] < 1e-5


def test_the_vit_pair_sizes_both_sides_for_32x32_inputs():
    from hydra import compose, initialize_config_module

    from jacdistill_cli.zoo.models import architecture, build_model

    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        cfg = compose(config_name="bench", overrides=["bench_pair=vit"])
    sizes = [(side.patch_size, side.dim, side.depth) for side in (cfg.teacher, cfg.student)]
    assert sizes == [(4, 96, 3), (4, 64, 2)]
    model = build_model(architecture(cfg.student), (3, 32, 32), 10, "student")
    assert model.position.shape == (1, 65, 64)   # 8x8 patches of 4x4 and the class token


def test_a_candidate_stops_after_its_budget_and_the_others_take_every_round():
    """The naive loop at 100 classes takes one timed step when it alone exceeds the budget."""
    calls = {"slow": 0, "fast": 0}

    def step(name, seconds):
        def run():
            calls[name] += 1
            time.sleep(seconds)
        return run

    slow = benchmark.Candidate("slow", "naive", step("slow", 0.3))
    fast = benchmark.Candidate("fast", "exact", step("fast", 0))
    benchmark.time_rounds([fast, slow], warmup=1, repeats=4, budget_seconds=0.25, device=torch.device("cpu"))
    assert (len(slow.times), len(fast.times)) == (1, 4)
    assert calls == {"slow": 2, "fast": 5}   # the warm-up step untimed


def test_targets_are_the_documented_ones_at_10_and_100_classes():
    targets = benchmark.Targets()
    assert targets.exact_speedup == {10: 1.5, 100: 4.0}
    assert (targets.gradient_methods, targets.noise, targets.auto_slack) == (2.5, 3.3, 1.10)
    # Every pair, the transformer pair too, has the same targets.
    assert benchmark.targets_for("vit") == benchmark.targets_for("cnn") == benchmark.targets_for(None) == targets


def test_the_agreement_is_measured_at_a_perturbed_student_where_its_input_gradients_vanish():
    """A zero-initialised last layer: every Jacobian is 0 and would agree with anything; the strategies are compared
    with the naive loop at the perturbed student (proofs/vanishing.py), which the summary records and prints."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3))
    nn.init.zeros_(student[3].weight)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).requires_grad_(False)
    x = torch.randn(4, 1, 4, 4)
    agreement = benchmark.jacobian_agreement(student, teacher, x, ["auto", "func"], 0)
    assert set(agreement) == {"auto", "func"} and max(agreement.values()) < 1e-5
    (perturbation,) = agreement.perturbations
    assert (perturbation.network, perturbation.parameters, perturbation.zero_initialised) == ("student", ["3.weight"],
                                                                                              True)
    assert not student[3].weight.any(), "the timed student is left as it was"
    plain = benchmark.Candidate("plain KD (jacobian=none)", "kd", lambda: None, times=[0.001])
    summary = benchmark.summarise([plain], 3, agreement, benchmark.Targets())
    assert summary["jacobian_agreement"] == dict(agreement)
    assert summary["jacobian_agreement_perturbed"] == [perturbation.as_dict()]
    assert json.loads(json.dumps(summary)) == summary
    assert "  compared at a perturbed student: its input-gradients vanish on this batch" in benchmark.format_summary(
        summary)


@pytest.mark.parametrize("variant", ["backward", "grad"])
def test_naive_jacobians_are_the_jacobian(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5)).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    naive = benchmark.NAIVE_JACOBIANS[variant](model(x), x)
    assert naive.requires_grad, "the naive loop keeps graphs (create_graph=True)"
    expected = full_jacobian(model(x), x, create_graph=False).reshape(3, -1)
    torch.testing.assert_close(naive, expected, rtol=1e-12, atol=1e-12)


def test_naive_step_trains_with_the_right_gradient():
    """The naive loop leaves gradients in the student's .grad; the step must not use them."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double().requires_grad_(False)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    loss = benchmark.naive_loss(student, teacher, x, 0.5, 2.0)
    assert all(p.grad is None for p in student.parameters())
    expected = torch.autograd.grad(loss, list(student.parameters()), retain_graph=True)
    loss.backward()
    for p, g in zip(student.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("override,message", [
    ("classes=[1]", "classes=[1] is not allowed: it must be a list of integers >= 2"),
    ("naive=[slow]", "naive=['slow'] is not allowed: it must be a list of backward, grad"),
    ("threads=0", "threads=0 is not allowed: it must be null (torch's default) or an integer >= 1"),
    ("data_batches=-1", "data_batches=-1 is not allowed: it must be an integer in [0, 1000]"),
])
def test_bench_refuses_bad_settings_in_one_line(override, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        run_command("bench", [override], tmp_path)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "bench.json").exists()
