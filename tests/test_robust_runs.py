"""Robustness in train runs: the student's and the teacher's robust accuracy at the end of a run (metrics.json,
TensorBoard, the report), teachers trained adversarially under their own cache key, and nothing of it with
robustness=none. In process, on digits with few samples."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import run_command, teacher_job
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jacdistill_cli.zoo.data import batches, build_data

QUICK = ["teacher=mlp", "teacher.epochs=1", "teacher.samples_per_class=10", "trainer.epochs=1",
         "dataset.samples_per_class=5", "trainer.threads=1"]
ATTACKED = 16


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def digits_keys() -> list[str]:
    from jacdistill_cli.robustness.settings import robustness_settings

    node = OmegaConf.load(Path(__file__).parents[1] / "conf" / "robustness" / "digits.yaml")
    return [attack.key for attack in robustness_settings(node).attacks]


@pytest.fixture(scope="module")
def robust_run(tmp_path_factory, teacher_cache):
    """A train run with robustness=digits on the first 16 test samples, from a teacher trained adversarially."""
    run_dir = tmp_path_factory.mktemp("robust") / "run"
    with pytest.MonkeyPatch.context() as patch:   # (the autouse fixture is function-scoped)
        patch.setenv("JACDISTILL_CACHE", str(teacher_cache))
        run_command("train", [*QUICK, "robustness=digits", f"robustness.samples={ATTACKED}",
                              "teacher.training=adversarial", "teacher.adversarial.steps=2"], run_dir)
    return run_dir


def test_a_run_records_the_robust_accuracy_of_student_and_teacher(robust_run):
    metrics = json.loads((robust_run / "metrics.json").read_text())
    keys = digits_keys()
    student, teacher = metrics["robust_accuracy"], metrics["teacher_robust_accuracy"]
    assert set(student) == {"clean", *keys}
    # The teacher is the transfer attack's source: it is not attacked by itself.
    assert set(teacher) == {"clean", *keys} - {"transfer_pgd_linf_0.2"}
    assert metrics["robust_samples"] == ATTACKED and metrics["robust_seconds"] > 0
    for result in (student, teacher):
        assert all(0.0 <= v <= 1.0 for v in result.values())
        # robust only when clean and adversarial are both right; PGD at 0.3 beats PGD at 0.1 on these samples
        assert all(result[k] <= result["clean"] for k in result if not k.startswith("noise_"))
        assert result["pgd_linf_0.3"] <= result["pgd_linf_0.1"] + 1 / ATTACKED
    # `clean` is the accuracy of the saved student on the attacked samples (its first 16 test samples).
    from jacdistill_cli.zoo.checkpoints import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(robust_run / "student.pt", "student"), "student").eval()
    data = build_data(OmegaConf.load(robust_run / "config.yaml").dataset)
    inputs, labels = next(iter(batches(data.test, ATTACKED, False, None, torch.device("cpu"))))
    with torch.no_grad():
        right = (model(inputs).argmax(1) == labels).float().mean().item()
    assert student["clean"] == pytest.approx(right)


def test_a_run_logs_robust_scalars_with_the_teachers_as_a_level_line(robust_run):
    metrics = json.loads((robust_run / "metrics.json").read_text())
    series = scalars(robust_run)
    steps = metrics["steps"]
    for key, value in metrics["robust_accuracy"].items():
        assert series[f"test/robust_accuracy/{key}"] == [(steps, pytest.approx(value))]
    for key, value in metrics["teacher_robust_accuracy"].items():
        assert series[f"teacher/robust_accuracy/{key}"] == [(0, pytest.approx(value)), (steps, pytest.approx(value))]
    assert "teacher/robust_accuracy/transfer_pgd_linf_0.2" not in series
    # HPARAMS lists the test metrics first, the teacher's robust level right after its clean accuracy.
    from jacdistill_cli.loop.logger import metric_order

    tags = sorted(series, key=metric_order)
    assert tags[:3] == ["test/accuracy", "test/agreement", "test/jacobian_cosine"]
    assert tags.index("teacher/test_accuracy") + 1 == tags.index("teacher/robust_accuracy/clean")


def test_the_teachers_robust_accuracy_is_remembered_for_the_next_run_with_that_teacher(robust_run, tmp_path,
                                                                                       caplog):
    import dataclasses
    import os

    from jacdistill_cli.loop.robust import remembered_path
    from jacdistill_cli.robustness.settings import robustness_settings

    first = json.loads((robust_run / "metrics.json").read_text())
    entry = Path(first["teacher_checkpoint"])
    assert len(list(entry.parent.glob(f"{entry.name}.robust-*.json"))) == 1
    with caplog.at_level(logging.INFO, logger="jacdistill"):
        run_command("train", [*QUICK, "student.hidden=[32]", "robustness=digits", f"robustness.samples={ATTACKED}",
                              "teacher.training=adversarial", "teacher.adversarial.steps=2"], tmp_path / "second")
    second = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert second["teacher_checkpoint"] == first["teacher_checkpoint"]
    assert second["teacher_robust_accuracy"] == first["teacher_robust_accuracy"]
    assert second["robust_accuracy"] != first["robust_accuracy"]   # another student, attacked
    assert "the teacher's robust accuracy as measured before" in caplog.text
    assert "(student; the teacher's remembered)" in caplog.text
    # Other settings, another device or a teacher written anew are measured anew.
    settings = robustness_settings(OmegaConf.load(Path(__file__).parents[1] / "conf" / "robustness" / "digits.yaml"))
    cpu = torch.device("cpu")
    other = dataclasses.replace(settings, samples=17)
    assert remembered_path(entry, settings, cpu) != remembered_path(entry, other, cpu)
    assert remembered_path(entry, settings, cpu) != remembered_path(entry, settings, torch.device("meta"))
    before, stat = remembered_path(entry, settings, cpu), entry.stat()
    os.utime(entry, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # as a teacher trained anew would be
    assert remembered_path(entry, settings, cpu) != before


def test_a_single_runs_summary_lists_each_attack_for_student_and_teacher(robust_run):
    from jacdistill_cli.loop.summary import summary_table

    metrics = json.loads((robust_run / "metrics.json").read_text())
    lines = summary_table(metrics, robust_run).splitlines()
    student, teacher = metrics["robust_accuracy"], metrics["teacher_robust_accuracy"]
    row = next(line for line in lines if line.startswith("robust pgd_linf_0.2 "))
    assert row.split()[-2:] == [f"{student['pgd_linf_0.2']:.4f}", f"{teacher['pgd_linf_0.2']:.4f}"]
    transfer = next(line for line in lines if line.startswith("robust transfer_pgd_linf_0.2 "))
    assert transfer.split()[-1] == f"{student['transfer_pgd_linf_0.2']:.4f}"   # no teacher column
    assert not any(line.startswith("robust clean") for line in lines)
    assert f"robust accuracy on the first {ATTACKED} test samples" in "\n".join(lines)


def test_the_report_has_the_robust_columns_and_says_how_many_samples_were_attacked(robust_run, tmp_path):
    from jacdistill_cli.analysis.report import build_report, markdown, robust_panel, write_csv

    report = build_report(robust_run)
    text = markdown(report)
    header = next(line for line in text.splitlines() if line.startswith("| runs"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[1:6] == ["test_accuracy", "val_accuracy", "agreement", "jacobian_cosine", "teacher_test_accuracy"]
    assert "robust_accuracy/pgd_linf_0.2" in columns and "teacher_robust_accuracy/pgd_linf_0.2" in columns
    assert "robust_accuracy/clean" not in columns   # in the CSV
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    value = json.loads((robust_run / "metrics.json").read_text())["robust_accuracy"]["pgd_linf_0.2"]
    assert row.strip("|").split("|")[columns.index("robust_accuracy/pgd_linf_0.2")].strip() == f"{value:.4f}"
    assert f"on the first {ATTACKED} test samples of each run" in text
    write_csv(report, tmp_path / "report.csv")
    csv_header = (tmp_path / "report.csv").read_text().splitlines()[0]
    assert "robust_accuracy/clean_mean" in csv_header and "robust_seconds_mean" in csv_header
    # The plot's second panel: the student's first L-inf PGD accuracy (none when the metric is robust already).
    assert robust_panel(report, "test_accuracy") == "robust_accuracy/pgd_linf_0.1"
    assert robust_panel(report, "robust_accuracy/pgd_l2_1") is None


def test_an_adversarial_teacher_has_its_own_cache_key_and_is_trained_on_attacks(robust_run, teacher_cache, tmp_path,
                                                                               caplog):
    from hydra import compose, initialize_config_module

    from jacdistill_cli.loop.logger import RunLogger
    from jacdistill_cli.loop.teacher import cache_path, teacher_identity, train_teacher

    def settings(*overrides):
        with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
            return teacher_job(compose(config_name="train", overrides=[*QUICK, f"cache_dir={teacher_cache}",
                                                                            *overrides]))

    standard, adversarial = settings(), settings("teacher.training=adversarial", "teacher.adversarial.steps=2")
    # The run used the adversarial teacher's entry; the standard teacher's key is what it was before.
    metrics = json.loads((robust_run / "metrics.json").read_text())
    assert Path(metrics["teacher_checkpoint"]) == cache_path(adversarial) != cache_path(standard)
    assert set(teacher_identity(standard)["training"]) == {"epochs", "batch_size", "lr", "weight_decay",
                                                          "samples_per_class"}   # the keys it always had
    assert teacher_identity(adversarial)["training"]["adversarial"]["eps"] == 0.1
    other_eps = settings("teacher.training=adversarial", "teacher.adversarial.eps=0.2")
    assert cache_path(other_eps) != cache_path(adversarial)

    # Same seed, same first batch: the adversarial objective's first loss is the cross-entropy at points of
    # higher loss than the clean ones.
    data = build_data(OmegaConf.load(robust_run / "config.yaml").dataset)
    first = {}
    for name, typed in (("standard", standard), ("adversarial", adversarial)):
        logger = RunLogger(tmp_path / name)
        with caplog.at_level(logging.INFO, logger="jacdistill"):
            train_teacher(typed, data, torch.device("cpu"), logger)
        logger.close()
        first[name] = scalars(tmp_path / name)["teacher/loss/hard"][0][1]
    assert first["adversarial"] > first["standard"] + 0.01
    assert "for 1 epochs, adversarially (cross-entropy on PGD linf eps 0.1, 2 steps of 0.125" in caplog.text
    assert "for 1 epochs, with cross-entropy" in caplog.text


def test_robustness_none_records_none_of_it(tmp_path):
    run_dir = tmp_path / "run"
    run_command("train", QUICK, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert not {"robust_accuracy", "teacher_robust_accuracy", "robust_samples", "robust_seconds"} & set(metrics)
    assert not [tag for tag in scalars(run_dir) if "robust" in tag]
    from jacdistill_cli.analysis.report import build_report, markdown

    text = markdown(build_report(run_dir))   # the report's text (drawing its plot would start fc-list: slow)
    assert "robust_accuracy" not in text and "Robust accuracy" not in text


@pytest.mark.slow
def test_two_processes_attack_their_blocks_and_record_what_one_process_measures(cli, tmp_path):
    """trainer.devices=2: each rank attacks its blocks of 4 samples and the counts are summed; the result is
    what one process measures on the saved student and teacher. The same for the explanation agreement of the
    test split (each rank its shard of each batch) and the faithfulness of both networks (each rank its blocks)."""
    from jacdistill_cli.explain.faithfulness import faithfulness
    from jacdistill_cli.explain.settings import explain_settings
    from jacdistill_cli.loop.evaluation import evaluate
    from jacdistill_cli.robustness.measure import robust_accuracy
    from jacdistill_cli.robustness.pixels import Pixels
    from jacdistill_cli.robustness.settings import robustness_settings
    from jacdistill_cli.zoo.checkpoints import load_checkpoint, model_from_checkpoint

    attacks = [{"name": "pgd", "norm": "linf", "eps": 0.1, "steps": 3},
               {"name": "transfer_pgd", "norm": "l2", "eps": 1.0, "steps": 3}, {"name": "noise", "sigma": 0.3}]
    listed = "[" + ",".join("{" + ",".join(f"{k}:{v}" for k, v in a.items()) + "}" for a in attacks) + "]"
    run_dir = tmp_path / "run"
    explain = {"samples": 14, "batch_size": 4, "steps": 4, "random_orders": 3}
    result = cli("train", *QUICK, "trainer.devices=2", "trainer.device=cpu", f"robustness.attacks={listed}",
                 "robustness.samples=14", "robustness.batch_size=4", "explain=digits",
                 *(f"explain.{k}={v}" for k, v in explain.items()), f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["robust_samples"] == 14

    def loaded(path, kind):
        return model_from_checkpoint(load_checkpoint(path, kind), kind).eval()

    student, teacher = loaded(run_dir / "student.pt", "student"), loaded(metrics["teacher_checkpoint"], "teacher")
    data = build_data(OmegaConf.load(run_dir / "config.yaml").dataset)
    settings = robustness_settings({"attacks": attacks, "samples": 14, "batch_size": 4})
    one = robust_accuracy(student, data.test, Pixels.of(data), torch.device("cpu"), settings, teacher=teacher)
    assert metrics["robust_accuracy"] == {k: pytest.approx(v, abs=1e-9) for k, v in one.items()
                                          if k not in ("samples", "robust_seconds")}
    measured = evaluate(student, teacher, data.test, 512, torch.device("cpu"))
    for key in ("jacobian_cosine", "explanation_rank_correlation", "explanation_top10_iou"):
        assert metrics[key] == pytest.approx(measured[key], abs=1e-6), key
    settings = explain_settings({"_target_": "jacdistill_cli.explain.settings.faithfulness_settings", **explain})
    for name, net in (("student", student), ("teacher", teacher)):
        alone = faithfulness(net, data.test, Pixels.of(data), torch.device("cpu"), settings)
        recorded = metrics["faithfulness"][name]
        assert recorded["samples"] == alone["samples"] == 14
        for key in ("deletion_area", "insertion_area", "random_deletion_area", "random_insertion_area"):
            assert recorded[key] == pytest.approx(alone[key], abs=1e-6), (name, key)
