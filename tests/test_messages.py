"""Every message says what is wrong and what to do: the teacher's own row of robust accuracy, a warm-up longer
than the run, teacher-output reuse turned off, a run interrupted before its student trained or refused after its
directory was claimed (as `report` lists them), and `report` over runs of unrelated sweeps."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from jacdistill_cli.analysis.report import build_report, markdown, write_report
from jacdistill_cli.config.resolvers import register_resolvers
from jacdistill_cli.loop.distill import preflight
from jacdistill_cli.records.directory import RunPlace
from jacdistill_cli.records.outcome import interruption_line, outcome
from jacdistill_cli.records.signals import Interrupted
from jacdistill_cli.robustness.measure import robust_accuracy
from jacdistill_cli.robustness.pixels import Pixels
from jacdistill_cli.robustness.settings import robustness_settings
from jacdistill_cli.spec.build import train_spec
from jacdistill_cli.spec.sweep import task_config
from jacdistill_cli.zoo.data import build_data
from jacdistill_cli.zoo.models import mlp

register_resolvers()


def spec_of(*overrides: str):
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        cfg, choices = task_config(compose(config_name="train", overrides=list(overrides), return_hydra_config=True))
    return train_spec(cfg, choices)


def test_the_teachers_row_says_why_it_has_no_transfer_attack(caplog):
    caplog.set_level(logging.INFO, logger="jacdistill")
    data = build_data(OmegaConf.create({"_target_": "jacdistill_cli.zoo.data.digits", "name": "digits",
                                        "val_fraction": 0.2, "test_fraction": 0.2}))
    settings = robustness_settings({"attacks": [{"name": "transfer_pgd", "norm": "linf", "eps": 0.1, "steps": 2}],
                                    "samples": 8})
    teacher = mlp((1, 8, 8), 10, hidden=[8]).eval()
    result = robust_accuracy(teacher, data.test, Pixels.of(data), torch.device("cpu"), settings, role="teacher")
    assert "transfer_pgd_linf_0.1" not in result
    assert ("robustness: transfer_pgd_linf_0.1 is not measured for the teacher: the teacher is the network a "
            "transfer attack is made on") in caplog.text


def test_a_warm_up_longer_than_the_run_is_said_with_the_setting_that_keeps_the_proportion():
    assert spec_of("loss=dkd", "trainer.epochs=24").warnings == ()
    (line,) = spec_of("loss=dkd", "trainer.epochs=5").warnings
    assert line == ("loss.warmup_epochs=20 is longer than the run (trainer.epochs=5): the dkd loss never reaches its "
                    "full weight (it reaches 0.25 of it); loss.warmup_epochs=1 keeps the published proportion (20 of "
                    "240)")
    assert spec_of("loss=dkd", "loss.warmup_epochs=4", "trainer.epochs=5").warnings == ()


def test_what_turns_teacher_output_reuse_off_is_said_in_one_line(caplog):
    caplog.set_level(logging.INFO, logger="jacdistill")
    prepared = preflight(spec_of("trainer.precision=bf16"), torch.device("cpu"))
    assert not prepared.reuse
    assert ("teacher.reuse_outputs=auto: the teacher's outputs are computed every step, not reused: "
            "trainer.precision=bf16") in caplog.text
    caplog.clear()
    assert preflight(spec_of(), torch.device("cpu")).reuse and "not reused" not in caplog.text


def finished_run(directory, overrides: list[str], config: dict, metrics: dict):
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (directory / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: train\n")
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (directory / "metrics.json").write_text(json.dumps(metrics))


def test_report_over_unrelated_runs_shows_only_the_columns_that_vary(tmp_path):
    """Two runs of different sweeps, each with overrides the other left at its value: a setting the two runs
    share is no column, however each was given; report.png is drawn without a library warning."""
    config = {"alpha": 0.5, "trainer": {"epochs": 20}, "jacobian": {"name": "top1"}, "seed": 0}
    finished_run(tmp_path / "a", ["alpha=0.5", "trainer.epochs=20"], config, {"test_accuracy": 0.8})
    finished_run(tmp_path / "b", ["jacobian=top1", "seed=1"], {**config, "seed": 1}, {"test_accuracy": 0.7})
    finished_run(tmp_path / "c", ["jacobian=exact"], {**config, "jacobian": {"name": "exact"}},
                 {"test_accuracy": 0.6})
    report = build_report(tmp_path)
    assert report.varying == ["jacobian"]
    assert report.constant == {"alpha": "0.5", "trainer.epochs": "20"}
    assert "(default)" not in markdown(report)


@pytest.mark.slow   # drawing report.png: matplotlib's first font cache starts fc-list, a process
def test_report_png_of_long_labels_is_drawn_without_a_library_warning(tmp_path):
    config = {"trainer": {"epochs": 20}, "jacobian": {"name": "top1"}}
    for name in ("with-a-rather-long-name-a", "with-a-rather-long-name-b"):
        finished_run(tmp_path / name, [f"jacobian={name * 3}"], config, {"test_accuracy": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(tmp_path)
    assert (tmp_path / "report.png").is_file()


def test_runs_interrupted_before_their_student_or_refused_after_their_claim_say_so(tmp_path):
    place = RunPlace(tmp_path / "run", command="jacdistill train hydra.run.dir=RUN")
    stop = Interrupted(2)
    stop.teacher = True
    assert interruption_line(place, stop) == ("interrupted by SIGINT before the student's first epoch (while the "
                                              "teacher trained); resume with: jacdistill train hydra.run.dir=RUN")
    for name, metrics in (("interrupted", {"status": "interrupted", "signal": "SIGINT", "epoch": None, "step": None,
                                           "resume": "jacdistill train"}),
                          ("refused", {"status": "refused", "error": "teacher.checkpoint=x does not fit"})):
        finished_run(tmp_path / "runs" / name, [f"seed={len(name)}"], {"seed": len(name)}, metrics)
    lines = markdown(build_report(tmp_path / "runs"))
    assert "- interrupted: did not finish (interrupted by SIGINT before the student's first epoch; resume: " in lines
    assert "- refused: refused (teacher.checkpoint=x does not fit)" in lines


def test_a_refusal_after_the_claim_is_recorded_for_report(tmp_path):
    from jacdistill_cli.errors import UsageError

    place = RunPlace(tmp_path)
    with pytest.raises(UsageError), outcome(place, main=True) as ended:
        ended.claimed = True
        raise UsageError("teacher.checkpoint=x is not allowed: another architecture")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "status": "refused", "error": "teacher.checkpoint=x is not allowed: another architecture"}
