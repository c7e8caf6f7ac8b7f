"""Feature matching: hooks by module path, attention and hint terms, Jacobians of features, the
check that the feature term trains the student, and short runs of the console script."""

from __future__ import annotations

import gc
import json
import math
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from jacdistill_cli.config import registry
from jacdistill_cli.engine import features
from jacdistill_cli.engine import pairs as feature_pairs
from jacdistill_cli.engine.jacobian import matching_distance
from jacdistill_cli.engine.objective import objective_from_settings
from jacdistill_cli.errors import UsageError
from jacdistill_cli.proofs import feature_checks
from jacdistill_cli.spec.build import objective_spec, optim_spec
from jacdistill_cli.spec.reader import Reader
from jacdistill_cli.zoo.models import build_model

SHAPE = (2, 8, 8)
# These models are tiny: one thread computes them fastest, and spares cores shared with other jobs.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_train(*overrides: str):
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def small_pair(dtype=torch.float64, student_batchnorm=True, seed=0):
    """A frozen teacher CNN and a student CNN (BatchNorm in train mode), both on [2, 8, 8]."""
    torch.manual_seed(seed)
    teacher = build_model({"name": "cnn", "channels": [6, 8], "hidden": 0}, SHAPE, 5).to(dtype)
    teacher.eval().requires_grad_(False)
    student = build_model({"name": "cnn", "channels": [3, 4], "hidden": 0, "batchnorm": student_batchnorm},
                          SHAPE, 5).to(dtype).train()
    return teacher, student


def objective_for(teacher, student, *overrides: str):
    cfg = compose_train(*overrides)
    objective, matching = objective_from_settings(objective_spec(Reader(cfg)), teacher, student, SHAPE)
    return cfg, objective, matching


def step_with_far_running_statistics(objective, teacher, student):
    """One objective step on 8 random inputs after setting the student's BatchNorm running statistics far
    from any batch's (mean 0.5, variance 3); returns (inputs, terms)."""
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.5)
                m.running_var.fill_(3.0)
    inputs = torch.randn(8, *SHAPE, dtype=torch.float64)
    _, terms = objective(student, teacher, inputs, torch.zeros(8, dtype=torch.long))
    return inputs, terms


def scalars(run_dir: Path) -> dict[str, list[float]]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------
# The terms and their gradients


@pytest.mark.parametrize("overrides", [
    ("features=attention",),
    ("features=attention", "features.squared=true"),
    ("features=hint",),
    ("features=hint", "features.pairs=[[6,2],[2,6]]"),   # maps of other sizes: regressor + resizing
])
def test_feature_term_gradient_matches_finite_differences(overrides):
    """d(features)/d(each student parameter tensor, each regressor tensor) by autograd equals
    central differences, float64, through the real objective (hooks, BatchNorm in train mode)."""
    teacher, student = small_pair()
    _, objective, matching = objective_for(teacher, student, "loss=none", "jacobian=none", *overrides)
    inputs = torch.randn(6, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(6, dtype=torch.long)

    def term() -> torch.Tensor:
        return objective(student, teacher, inputs, labels)[1]["features"]

    params = list(student.named_parameters()) + [(f"regressor.{n}", p) for n, p in matching.named_parameters()]
    value = term()
    grads = torch.autograd.grad(value, [p for _, p in params], allow_unused=True)
    generator = torch.Generator().manual_seed(2)
    step = 1e-6
    for (name, param), grad in zip(params, grads):
        if name.startswith("10."):  # the classifier, after every matched layer
            assert grad is None
            continue
        assert grad is not None, f"{name} receives no gradient from the feature term"
        direction = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        with torch.no_grad():
            param.add_(step * direction)
            plus = term().item()
            param.sub_(2 * step * direction)
            minus = term().item()
            param.add_(step * direction)
        numeric = (plus - minus) / (2 * step)
        analytic = (grad * direction).sum().item()
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), name


def test_attention_map_and_term_follow_the_definition():
    feature = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    expected = F.normalize(feature.pow(2).mean(dim=1).flatten(1), dim=1)
    assert torch.allclose(features.attention_map(feature), expected)
    # A vector is one channel over its units; a zero map stays zero (no NaN).
    vector = torch.randn(3, 7, dtype=torch.float64)
    assert torch.allclose(features.attention_map(vector), F.normalize(vector.pow(2), dim=1))
    assert torch.equal(features.attention_map(torch.zeros(2, 3, 4, 4)), torch.zeros(2, 16))
    # Different spatial sizes: the student's energy is resized to the teacher's before normalising.
    student, teacher = torch.randn(3, 2, 4, 4), torch.randn(3, 5, 8, 8)
    resized = F.interpolate(student.pow(2).mean(1, keepdim=True), size=(8, 8), mode="bilinear", align_corners=False)
    a_s, a_t = F.normalize(resized.flatten(1), dim=1), features.attention_map(teacher)
    assert torch.allclose(features.attention_distance(student, teacher, squared=False), (a_s - a_t).norm(dim=1),
                          atol=1e-6)


def test_features_come_from_the_train_mode_pass_that_gives_the_logits():
    """With BatchNorm in train mode the base objective runs the student twice (the second time with
    running statistics here); the matched features are those of the first, train-mode pass."""
    teacher, student = small_pair()
    _, objective, _ = objective_for(teacher, student, "features=attention", "features.pairs=[[2,2],[6,6]]",
                                    "jacobian=top1", "jacobian.batchnorm=running")
    inputs, terms = step_with_far_running_statistics(objective, teacher, student)
    expected = torch.stack([features.attention_distance(student[:k](inputs), teacher[:k](inputs), False).mean()
                            for k in (3, 7)]).mean()
    assert terms["features"].item() == pytest.approx(expected.item(), rel=1e-10)
    assert terms["total"].item() == pytest.approx(
        0.5 * terms["distill"].item() + 0.5 * terms["jacobian"].item() + 1.0 * terms["features"].item(), rel=1e-10)


def test_no_hook_handle_or_captured_tensor_survives_many_steps(monkeypatch):
    teacher, student = small_pair(dtype=torch.float32)
    _, objective, matching = objective_for(teacher, student, "features=hint", "jacobian.of=features")
    optimizer = torch.optim.SGD([*student.parameters(), *matching.parameters()], lr=0.01)
    hooks_before = (features.total_hooks(student), features.total_hooks(teacher))
    captured: list[weakref.ref] = []
    keep_student, keep_teacher = features.student_feature, features.teacher_feature
    monkeypatch.setattr(features, "student_feature", lambda out: captured.append(weakref.ref(out)) or keep_student(out))
    monkeypatch.setattr(features, "teacher_feature",
                        lambda out: (lambda kept: captured.append(weakref.ref(kept)) or kept)(keep_teacher(out)))
    regressor_before = [p.detach().clone() for p in matching.parameters()]
    generator = torch.Generator().manual_seed(0)
    live_tensors = []
    for step in range(40):
        inputs = torch.randn(16, *SHAPE, generator=generator)
        _, terms = objective(student, teacher, inputs, torch.randint(0, 5, (16,), generator=generator))
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        del terms, inputs
        assert (features.total_hooks(student), features.total_hooks(teacher)) == hooks_before
        assert captured and all(ref() is None for ref in captured), f"a captured feature outlived step {step}"
        captured.clear()
        if step in (9, 39):
            gc.collect()
            with warnings.catch_warnings():  # isinstance on some torch module objects warns of deprecations
                warnings.simplefilter("ignore")
                live_tensors.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
    # Each step captures 2 student + 2 teacher features (objective) and their Jacobian passes'.
    assert live_tensors[0] == live_tensors[1], "tensors accumulate from step to step"
    assert any(not torch.equal(a, b) for a, b in zip(regressor_before, matching.parameters()))


def test_hint_regressor_is_optimised_with_the_student_by_the_trainer(tmp_path):
    from jacdistill_cli.loop.callbacks import TensorBoard
    from jacdistill_cli.loop.distiller import Distiller
    from jacdistill_cli.loop.logger import RunLogger
    from jacdistill_cli.loop.trainer import Trainer
    from jacdistill_cli.spec.run import LoopSpec
    from jacdistill_cli.zoo.data import DataBundle, TensorSplit

    teacher, student = small_pair(dtype=torch.float32)
    cfg, objective, matching = objective_for(teacher, student, "features=hint")
    split = TensorSplit(torch.randn(32, *SHAPE), torch.randint(0, 5, (32,)))
    data = DataBundle("random", split, split, split, 5, SHAPE)
    before = [p.detach().clone() for p in matching.parameters()]
    logger = RunLogger(tmp_path)
    try:
        trainer = Trainer(LoopSpec(1, 16, 32, log_every_steps=1), optim_spec(Reader(cfg)), torch.device("cpu"),
                          callbacks=[TensorBoard(logger)])
        trainer.fit(Distiller(student, teacher, objective, matching), data)
    finally:
        logger.close()
    assert all(not torch.equal(a, b) for a, b in zip(before, matching.parameters()))
    assert len(scalars(tmp_path)["loss/features"]) == 2


# ---------------------------------------------------------------------------------------------
# Jacobians of features


def batch_statistics_as_running(student: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """An eval-mode copy of `student` whose BatchNorm layers normalise with the statistics of
    `inputs`' train-mode pass: the per-sample function that jacobian.batchnorm=batch documents."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.setdefault(m, args[0].detach()))
             for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        student(inputs)
    for hook in hooks:
        hook.remove()
    reference = __import__("copy").deepcopy(student).eval()
    for original, copy_ in zip(student.modules(), reference.modules()):
        if original in seen:
            x = seen[original]
            copy_.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            copy_.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    return reference


@pytest.mark.parametrize("batchnorm", ["running", "batch"])
def test_feature_jacobian_equals_jacrev_of_the_summary_per_sample(batchnorm):
    """jacobian.of=features: the student's input-gradient of its attention map at the teacher's
    most-attended location equals torch.func.jacrev of that summary, sample by sample (float64).
    The student has BatchNorm in train mode; the reference is the per-sample function each
    jacobian.batchnorm mode documents (running statistics; the batch's statistics held)."""
    teacher, student = small_pair()
    inputs = torch.randn(5, *SHAPE, dtype=torch.float64)
    cfg = compose_train("features=attention", "features.pairs=[[2,2],[6,6]]", "jacobian.of=features",
                        f"jacobian.batchnorm={batchnorm}", "jacobian.squared=false")
    pairs = feature_pairs.resolve_pairs(cfg.features.pairs, teacher, student, SHAPE)
    depth = {"2": 3, "6": 7}
    if batchnorm == "running":
        reference_student = __import__("copy").deepcopy(student).eval()
    else:
        reference_student = batch_statistics_as_running(student, inputs)

    from jacdistill_cli.engine.batchnorm import per_sample_batchnorm

    teacher_grads, locations = features.feature_input_gradients(
        teacher, [p.teacher_path for p in pairs], inputs, features.keep_graph, None, [None] * 2, False)
    statistics = features.record_batch_statistics(student, inputs) if batchnorm == "batch" else None
    with per_sample_batchnorm(student, batchnorm, statistics):
        student_grads, _ = features.feature_input_gradients(
            student, [p.student_path for p in pairs], inputs, lambda out: out, locations,
            [features.spatial_shape(p.teacher_shape) for p in pairs], True)
    assert all(g.requires_grad for g in student_grads) and not any(g.requires_grad for g in teacher_grads)
    assert student.training, "the student is left in train mode"

    expected_distance = torch.zeros(5, dtype=torch.float64)
    for index, pair in enumerate(pairs):
        k = depth[pair.student_path]
        size = features.spatial_shape(pair.teacher_shape)
        for b in range(5):
            location = int(features.attention_map(teacher[:k](inputs[b:b + 1])).argmax())
            assert location == int(locations[index][b])
            ref_t = torch.func.jacrev(lambda x: features.attention_map(teacher[:k](x[None]))[0, location])(inputs[b])
            ref_s = torch.func.jacrev(
                lambda x: features.attention_map(reference_student[:k](x[None]), size)[0, location])(inputs[b])
            assert torch.allclose(teacher_grads[index][b], ref_t, rtol=1e-9, atol=1e-12)
            assert torch.allclose(student_grads[index][b], ref_s, rtol=1e-9, atol=1e-12)
            expected_distance[b] += matching_distance(ref_s[None], ref_t[None], True, False)[0] / len(pairs)
    term = features.feature_jacobian_term(student, teacher, pairs, inputs, cfg.jacobian, create_graph=True)
    assert torch.allclose(term, expected_distance, rtol=1e-9)


@pytest.mark.parametrize("batchnorm", ["running", "batch", "coupled"])
def test_the_objectives_feature_jacobian_term_normalises_as_its_batchnorm_mode_says(batchnorm):
    """jacobian.of=features inside the objective equals the term computed on its own after the step's
    train-mode pass: `running` with the running statistics (not the batch's), `batch` with the batch's."""
    teacher, student = small_pair()
    cfg, objective, matching = objective_for(teacher, student, "features=attention", "features.pairs=[[2,2],[6,6]]",
                                             "jacobian.of=features", f"jacobian.batchnorm={batchnorm}")
    inputs, terms = step_with_far_running_statistics(objective, teacher, student)
    expected = features.feature_jacobian_term(student, teacher, matching.pairs, inputs, cfg.jacobian,
                                              create_graph=False).mean()
    assert terms["jacobian"].item() == pytest.approx(expected.item(), rel=1e-10)


def test_feature_jacobian_term_trains_the_student_and_keeps_running_statistics():
    teacher, student = small_pair()
    cfg = compose_train("features=attention", "jacobian.of=features", "jacobian.batchnorm=coupled")
    pairs = feature_pairs.resolve_pairs(None, teacher, student, SHAPE)
    statistics = [b.clone() for b in student.buffers()]
    term = features.feature_jacobian_term(student, teacher, pairs, torch.randn(4, *SHAPE, dtype=torch.float64),
                                          cfg.jacobian, create_graph=True).mean()
    assert all(torch.equal(a, b) for a, b in zip(statistics, student.buffers()))
    grads = torch.autograd.grad(term, list(student.parameters()), allow_unused=True)
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0


# ---------------------------------------------------------------------------------------------
# check: the feature term trains every student parameter up to the deepest matched layer


@pytest.mark.parametrize("method", ["attention", "hint"])
def test_check_finds_every_parameter_trained_and_the_detaching_hook_training_none(method):
    teacher, student = small_pair(dtype=torch.float32)
    cfg = compose_train(f"features={method}", "jacobian.of=features")
    matching = registry.build("features", cfg.features).matching(teacher, student, SHAPE)
    report = feature_checks.check_feature_gradients(matching, student, teacher, torch.randn(6, *SHAPE),
                                              jacobian_settings=cfg.jacobian)
    # Default pairs of this CNN pair: the stage ends at 8x8, 4x4 and 2x2; the deepest is the last.
    assert report.deepest == "7"
    assert report.expected == [n for n, _ in student.named_parameters() if int(n.split(".")[0]) < 7]
    assert report.passed, "\n".join(report.lines())
    assert report.trained == report.expected and report.detached_trained == 0
    assert report.jacobian_trained == len(report.expected)
    assert report.regressor_trained == report.regressor_total == (6 if method == "hint" else 0)
    assert "trains 0 student parameters" in report.lines()[-1]


def test_check_fails_on_a_planted_detach_in_the_hook_path(monkeypatch):
    teacher, student = small_pair(dtype=torch.float32)
    matching = registry.build("features", compose_train("features=attention").features).matching(teacher, student, SHAPE)
    monkeypatch.setattr(features, "student_feature", lambda output: output.detach())
    report = feature_checks.check_feature_gradients(matching, student, teacher, torch.randn(6, *SHAPE))
    assert not report.passed and report.trained == [] and report.untrained == report.expected
    assert "FAILED" in report.lines()[0]


@pytest.mark.slow
def test_check_command_covers_features_and_exits_1_on_a_planted_detach(tmp_path):
    """The real `jacdistill check` entry point, run twice in one process: as shipped (exit 0), then
    with a detach planted in the student's hook path (exit 1, the feature rows FAILED)."""
    import subprocess
    import sys

    script = (
        "import jacdistill_cli.engine.features as features\n"
        "from jacdistill_cli.cli import main\n"
        "codes = []\n"
        "for planted in (False, True):\n"
        "    if planted:\n"
        "        features.student_feature = lambda output: output.detach()\n"
        "    try:\n"
        f"        main(['check', 'methods=[top1]', 'hydra.run.dir={tmp_path}/run%d' % planted])\n"
        "        codes.append(0)\n"
        "    except SystemExit as exit:\n"
        "        codes.append(exit.code)\n"
        "print('exit codes', codes)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={**__import__("os").environ, **ONE_THREAD}, timeout=300)
    assert "exit codes [0, 1]" in result.stdout, result.stdout + result.stderr[-3000:]
    shipped, planted = result.stdout.split("all checks passed")
    assert ("features=attention: the feature term trains 2/2 student parameters up to the deepest matched layer "
            "'2'") in shipped
    assert "features=hint: the feature term trains 2/2 student parameters" in shipped
    assert "a hook that detaches the student's feature: trains 0 student parameters" in shipped
    assert "features=attention: the feature term trains 0/2 student parameters" in planted
    assert "checks FAILED for: features=attention, features=hint" in planted
    report = json.loads((tmp_path / "run1" / "check.json").read_text())
    assert [f["passed"] for f in report["features"]] == [False, False]
    assert json.loads((tmp_path / "run0" / "check.json").read_text())["passed"] is True


# ---------------------------------------------------------------------------------------------
# Module paths, default pairs, settings


def test_wrong_module_path_names_the_nearest_valid_ones():
    teacher, student = small_pair()
    with pytest.raises(UsageError) as error:
        feature_pairs.resolve_pairs([["2", "6"], ["7", "conv"]], teacher, student, SHAPE)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("features.pairs[1][1]='conv' is not allowed: the student has no module 'conv'")
    assert "nearest valid names: " in message and "'6'" in message


def test_default_pairs_are_the_stage_ends():
    teacher, student = small_pair()
    mlp = build_model({"name": "mlp", "hidden": [32, 16]}, SHAPE, 5).double()
    # Both CNNs: the output feeding each pooling, pair by pair at equal spatial sizes.
    assert [(p.teacher_path, p.student_path, p.student_shape) for p in feature_pairs.resolve_pairs(None, teacher, student, SHAPE)] == [
        ("2", "2", (3, 8, 8)), ("6", "6", (4, 4, 4)), ("7", "7", (4, 2, 2))]
    # An MLP has no maps: the deepest activation vector of each; none without a hidden layer.
    cnn_with_head = build_model({"name": "cnn", "channels": [6, 8], "hidden": 12}, SHAPE, 5).double()
    assert [(p.teacher_path, p.student_path, p.teacher_shape, p.student_shape)
            for p in feature_pairs.resolve_pairs(None, cnn_with_head, mlp, SHAPE)] == [("11", "4", (12,), (16,))]
    with pytest.raises(UsageError, match=r"^features.pairs=null is not allowed: this teacher and student have no"):
        feature_pairs.resolve_pairs(None, teacher, mlp, SHAPE)


def test_default_pairs_for_the_zoo_are_stage_ends():
    shape = (3, 16, 16)
    vgg9 = build_model({"name": "vgg", "depth": 9, "width": 0.125}, shape, 10)
    vgg4 = build_model({"name": "vgg", "depth": 4, "width": 0.125}, shape, 10)
    pairs = feature_pairs.resolve_pairs(None, vgg9, vgg4, shape)
    assert [p.student_shape[1:] for p in pairs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(isinstance(vgg4.get_submodule(p.student_path), (nn.ReLU, nn.MaxPool2d)) for p in pairs)
    resnet = feature_pairs.resolve_pairs(None, build_model({"name": "resnet_cifar", "depth": 14}, shape, 10),
                                    build_model({"name": "resnet_cifar", "depth": 8}, shape, 10), shape)
    assert [(p.teacher_path, p.student_path) for p in resnet] == [
        ("stages.1", "stages.0"), ("stages.3", "stages.1"), ("stages", "stages")]
    wrn = feature_pairs.resolve_pairs(None, build_model({"name": "wrn", "depth": 16, "width": 1}, shape, 10),
                                 build_model({"name": "wrn", "depth": 10, "width": 1}, shape, 10), shape)
    assert [(p.teacher_path, p.student_path) for p in wrn] == [
        ("stages.1", "stages.0"), ("stages.3", "stages.1"), ("head", "head")]


@pytest.mark.parametrize("overrides, message", [
    (("jacobian.of=features",), "jacobian.of='features' is not allowed: it takes the Jacobian of the matched features"),
    (("features=attention", "jacobian=exact", "jacobian.of=features"), "jacobian.of='features' is not allowed: with jacobian=exact"),
    (("jacobian.of=inputs",), "jacobian.of='inputs' is not allowed: it must be one of logits, features"),
    (("features=hint", "features.weight=-1"), "features.weight=-1 is not allowed: it must be a number >= 0"),
    (("features=hint", "features.pairs=[a,b]"), "features.pairs[0]='a' is not allowed"),
    (("features=hint", "features.pairs=[]"), "features.pairs=[] is not allowed"),
    (("features=attention", "features.squared=maybe"), "features.squared='maybe' is not allowed"),
])
def test_bad_feature_settings_are_one_clear_line(overrides, message):
    from jacdistill_cli.spec.build import train_spec

    with pytest.raises(UsageError) as error:
        train_spec(compose_train(*overrides))
    assert str(error.value).startswith(message), str(error.value)


def test_feature_settings_compose_and_reach_the_hparams():
    cfg = compose_train("features=attention", "features.pairs=[[2,2]]", "jacobian.of=features")
    assert cfg.features.name == "attention" and cfg.jacobian.of == "features"
    assert compose_train().features.name == "none"
    from jacdistill_cli.spec.hparams import hparams
    from jacdistill_cli.spec.reader import Reader

    found = hparams(Reader(cfg), {})
    assert found["features"] == "attention" and found["features.weight"] == 1.0
    assert found["features.pairs"] == "[['2', '2']]" and found["jacobian.of"] == "features"


ACTIVATION_RECIPES = {  # recipe -> (loss, jacobian, jacobian.of, features, alpha, hard_weight)
    "activations_ce": ("none", "none", None, "attention", 0.0, 1.0),
    "activations_jacobian_ce": ("none", "top1", "features", "attention", 0.5, 1.0),
    "activations_only": ("kl", "none", None, "attention", 0.0, 0.0),
    "activations_jacobian": ("kl", "top1", "features", "attention", 0.5, 0.0),
}


def test_paper_cifar100_has_the_activation_rows_with_vgg_stage_end_pairs():
    from jacdistill_cli.spec.build import train_spec
    from jacdistill_cli.zoo.models import architecture

    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        sweep = compose(config_name="train", overrides=["experiment=paper_cifar100"], return_hydra_config=True)
    rows = str(sweep.hydra.sweeper.params.recipe).split(",")
    assert set(ACTIVATION_RECIPES) <= set(rows) and "ce_only" in rows
    for recipe, expected in ACTIVATION_RECIPES.items():
        cfg = compose_train("experiment=paper_cifar100", f"recipe={recipe}", "dataset.samples_per_class=10")
        train_spec(cfg)
        assert (cfg.loss.name, cfg.jacobian.name, OmegaConf.select(cfg, "jacobian.of"), cfg.features.name,
                cfg.alpha, cfg.hard_weight) == expected, recipe
    # The VGG-9 -> VGG-4 pair matches attention maps at the end of each of the student's stages.
    teacher = build_model(architecture(cfg.teacher), (3, 32, 32), 100)
    student = build_model(architecture(cfg.student), (3, 32, 32), 100)
    pairs = feature_pairs.resolve_pairs(cfg.features.pairs, teacher, student, (3, 32, 32))
    assert [(p.teacher_path, p.student_path, p.student_shape[1:]) for p in pairs] == [
        ("2", "2", (32, 32)), ("6", "6", (16, 16)), ("13", "10", (8, 8)), ("20", "11", (4, 4))]


# ---------------------------------------------------------------------------------------------
# The console script


@pytest.mark.slow
def test_wrong_module_path_stops_the_run_with_one_line(cli, tmp_path):
    result = cli("train", "features=attention", "features.pairs=[[11,nope]]", f"hydra.run.dir={tmp_path / 'run'}",
                 cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(
        "jacdistill train: error: features.pairs[0][1]='nope' is not allowed: the student has no module 'nope'; "
        "nearest valid names: ")
    assert not list((tmp_path / "run").glob("events.*")), "nothing is logged for a bad module path"


def check_feature_runs(sweep: Path, expected_jobs: int) -> list[Path]:
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert len(jobs) == expected_jobs, [p.name for p in sweep.iterdir()]
    for job in jobs:
        series = scalars(job)
        steps = json.loads((job / "metrics.json").read_text())["steps"]
        # one epoch: the terms are read every 50 steps and at its end, each point the mean since the last
        assert len(series["loss/features"]) == math.ceil(steps / 50) > 0, job.name
        assert all(math.isfinite(v) and v > 0 for v in series["loss/features"]), job.name
        config = OmegaConf.load(job / "config.yaml")
        for distill, jacobian, feature, total in zip(series["loss/distill"], series["loss/jacobian"],
                                                     series["loss/features"], series["loss/total"]):
            assert total == pytest.approx((1 - config.alpha) * distill + config.alpha * jacobian
                                          + config.features.weight * feature, rel=1e-4)
    return jobs


@pytest.mark.slow
def test_short_feature_runs_on_digits_log_loss_features(cli, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli("train", "-m", "features=attention,hint", "jacobian.of=logits,features", "trainer.epochs=1",
                 "teacher.epochs=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    from jacdistill_cli.analysis.report import build_report

    report = build_report(sweep)  # the report groups runs by their feature settings
    assert report.varying == ["features", "jacobian.of"] and len(report.groups) == 4
    for job in check_feature_runs(sweep, 4):
        payload = torch.load(job / "student.pt", weights_only=True)
        if "features=hint" in job.name:
            # The regressor is saved with the student: teacher '11' [128] <- student '2' [64].
            entry = payload["features"]
            assert entry["method"] == "hint" and entry["pairs"] == [["11", "2"]]
            assert entry["state_dict"]["regressors.0.map.weight"].shape == (128, 64)
        else:
            assert "features" not in payload or payload["features"]["state_dict"] == {}


@pytest.mark.slow
def test_short_feature_runs_on_fake_images_log_loss_features(cli, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli("train", "-m", "features=attention,hint", "dataset=fake", "dataset.train_size=128",
                 "dataset.val_size=32", "dataset.test_size=32", "student=cnn", "teacher.channels=[8,16]",
                 "teacher.hidden=32", "student.channels=[4,8]", "student.hidden=16", "trainer.epochs=1",
                 "teacher.epochs=1", "trainer.batch_size=64", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in check_feature_runs(sweep, 2):
        log = next(job.glob("*.log")).read_text()
        assert ("teacher '2' [8, 32, 32] <- student '2' [4, 32, 32]; teacher '6' [16, 16, 16] <- student '6' "
                "[8, 16, 16]; teacher '7' [16, 8, 8] <- student '7' [8, 8, 8]") in log
