"""`jacdistill report`: grouping, statistics, CSV, plot data and bad input, on run directories laid out
as Hydra and `jacdistill train` lay them out (the sweep tests report a real sweep)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

from jacdistill_cli.analysis.report import build_report, markdown, plot_lines, write_report, x_axis
from jacdistill_cli.commands.report import translate_argv
from jacdistill_cli.errors import UsageError

# test accuracy of each (samples_per_class, recipe) over seeds 0, 1, 2
ACCURACY = {
    ("1", "kd"): [0.61, 0.64, 0.58], ("1", "kd_jacobian"): [0.66, 0.69, 0.67],
    ("10", "kd"): [0.88, 0.90, 0.89], ("10", "kd_jacobian"): [0.90, 0.91, 0.93],
}


def make_run(run_dir: Path, overrides: list[str], metrics: dict | None, log: str = "") -> Path:
    """A train job directory: Hydra's .hydra/ files, train.log, and metrics.json when it finished."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"name": "train"}}}))
    (run_dir / "train.log").write_text(log)
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for (size, recipe), accuracies in ACCURACY.items():
        for seed, accuracy in enumerate(accuracies):
            overrides = [f"dataset.samples_per_class={size}", f"recipe={recipe}", f"seed={seed}",
                         "experiment=digits_fewshot"]
            make_run(root / f"dataset.samples_per_class={size},recipe={recipe},seed={seed}", overrides,
                     {"test_accuracy": accuracy, "agreement": accuracy - 0.01, "val_accuracy": accuracy + 0.01,
                      "jacobian_cosine": 0.5, "steps": 100, "device": "cpu"})
    return root


def test_groups_by_overrides_other_than_seed_with_mean_and_sample_std(sweep):
    report = build_report(sweep)
    assert report.varying == ["dataset.samples_per_class", "recipe"]
    assert report.constant == {"experiment": "digits_fewshot"}
    assert [dict(g.key) for g in report.groups] == [  # numbers in numeric order
        {"dataset.samples_per_class": s, "recipe": r} for s in ("1", "10") for r in ("kd", "kd_jacobian")]
    for group in report.groups:
        values = ACCURACY[tuple(v for _, v in group.key)]
        mean, std = group.mean_std("test_accuracy")
        assert mean == pytest.approx(statistics.fmean(values)) and std == pytest.approx(statistics.stdev(values))
        assert len(group.finished) == 3
    assert "device" not in report.metrics and "steps" in report.metrics  # numeric metrics only
    table = markdown(report)
    values = ACCURACY[("1", "kd_jacobian")]
    assert (f"| 1 | kd_jacobian | 3 | {statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} |"
            in table)
    assert "Same in every run: experiment=digits_fewshot" in table


@pytest.mark.slow
def test_csv_and_png_are_written_into_the_directory(sweep):
    write_report(sweep)
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert len(rows) == 4
    row = rows[0]
    assert (row["dataset.samples_per_class"], row["recipe"], row["runs"], row["seeds"]) == ("1", "kd", "3", "0 1 2")
    assert float(row["test_accuracy_mean"]) == pytest.approx(statistics.fmean(ACCURACY[("1", "kd")]), rel=1e-12)
    assert float(row["test_accuracy_std"]) == pytest.approx(statistics.stdev(ACCURACY[("1", "kd")]), rel=1e-12)
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep / "report.md").read_text() == markdown(build_report(sweep))


def test_plot_is_accuracy_against_samples_per_class_one_line_per_recipe(sweep):
    report = build_report(sweep)
    assert x_axis(report) == "dataset.samples_per_class"
    lines = plot_lines(report, "test_accuracy", "dataset.samples_per_class")
    assert set(lines) == {"recipe=kd", "recipe=kd_jacobian"}
    assert [x for x, _, _ in lines["recipe=kd"]] == [1.0, 10.0]
    assert lines["recipe=kd"][1][1] == pytest.approx(statistics.fmean(ACCURACY[("10", "kd")]))
    with pytest.raises(UsageError, match="x='recipe' is not allowed"):
        x_axis(report, "recipe")


def test_alpha_is_the_x_axis_when_it_is_swept(tmp_path):
    for alpha in ("0", "0.5"):
        for jacobian in ("top1", "exact"):
            make_run(tmp_path / f"alpha={alpha},jacobian={jacobian}", [f"alpha={alpha}", f"jacobian={jacobian}"],
                     {"test_accuracy": 0.5 + float(alpha) / 10})
    report = build_report(tmp_path)
    assert x_axis(report) == "alpha"
    assert set(plot_lines(report, "test_accuracy", "alpha")) == {"jacobian=exact", "jacobian=top1"}


@pytest.mark.slow
def test_one_run_directory_is_a_group_of_one_without_std(tmp_path):
    run = make_run(tmp_path / "run", [], {"test_accuracy": 0.75})
    report, text, _ = write_report(run)
    assert [len(g.finished) for g in report.groups] == [1] and report.groups[0].mean_std("test_accuracy") == (0.75, None)
    assert "| 1 | 0.7500 |" in text
    assert next(csv.DictReader(open(run / "report.csv")))["test_accuracy_std"] == ""


def test_runs_without_metrics_are_listed_with_the_reason(sweep):
    failed = sweep / "dataset.samples_per_class=1,recipe=kd,seed=3"
    make_run(failed, ["dataset.samples_per_class=1", "recipe=kd", "seed=3", "experiment=digits_fewshot"], None,
             log="[2026-01-01 10:00:00,000][jacdistill][INFO] - run directory: x\n"
                 "[2026-01-01 10:00:01,000][jacdistill][ERROR] - failed: FloatingPointError: loss/total is nan\n")
    running = sweep / "dataset.samples_per_class=1,recipe=kd,seed=4"
    make_run(running, ["dataset.samples_per_class=1", "recipe=kd", "seed=4", "experiment=digits_fewshot"], None)
    report = build_report(sweep)
    status = {run.name: (run.status, run.detail) for run in report.runs if run.status != "finished"}
    assert status == {failed.name: ("failed", "failed: FloatingPointError: loss/total is nan"),
                      running.name: ("did not finish", "no metrics.json")}
    group = report.groups[0]
    assert (len(group.finished), len(group.runs)) == (3, 5)  # the statistics use the finished runs only
    assert group.mean_std("test_accuracy")[0] == pytest.approx(statistics.fmean(ACCURACY[("1", "kd")]))
    table = markdown(report)
    assert "| 1 | kd | 3 | 2 |" in table and "2 run(s) without results" in table


@pytest.mark.parametrize("path", ["outputs/x/alpha=0.3,seed=0", "it's here", "C:\\runs\\a", "a\\'b", "end\\", "cost${x}"])
def test_a_bare_directory_becomes_a_quoted_dir_override_that_hydra_reads_back(tmp_path, path):
    directory = tmp_path / path
    directory.mkdir(parents=True)
    (override,) = translate_argv([str(directory)])
    with initialize_config_module("jacdistill_cli.conf", version_base="1.3"):
        assert compose("report", overrides=[override]).dir == str(directory)
    assert translate_argv(["metric=agreement"]) == ["metric=agreement"]
    assert translate_argv(["missing-dir", "x=alpha"])[0] == "dir='missing-dir'"


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, sweep):
    work = tmp_path / "work"
    work.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "missing")], "dir="),
        ([str(empty)], "holds no train run"),
        ([str(sweep), "x=recipe"], "x='recipe' is not allowed"),
        ([str(sweep), "metric=speed"], "metric='speed' is not allowed"),
        ([], "dir=null is not allowed"),
    ]
    for args, message in cases:
        result = cli("report", *args, cwd=work)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jacdistill report: error: ") and message in lines[0], lines
    assert not (tmp_path / "missing").exists() and not list(empty.iterdir()) and not list(work.iterdir())
    assert not list(sweep.glob("report.*"))
    # HOME and the cache directories are fresh: matplotlib's font cache goes to a temporary directory.
    home = tmp_path / "home"
    home.mkdir()
    ok = cli("report", str(sweep), cwd=work, env={"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
                                                  "XDG_CONFIG_HOME": str(home / ".config"), "MPLCONFIGDIR": ""})
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in sweep.glob("report.*")) == ["report.csv", "report.md", "report.png"]
    assert not list(work.iterdir())  # no run directory, log or .hydra/ of the report's own
    assert not list(home.iterdir())


def test_no_plot_when_no_run_finished(tmp_path):
    """Runs that failed or are still running get the table that says so, and no empty report.png (one
    left by an earlier report is removed)."""
    root = tmp_path / "sweep"
    make_run(root / "alpha=0.1", ["alpha=0.1"], None, "[2026-01-01][jacdistill][ERROR] - failed: RuntimeError: boom")
    make_run(root / "alpha=0.2", ["alpha=0.2"], None)
    (root / "report.png").write_bytes(b"an earlier plot")
    _, text, written = write_report(root)
    assert [p.name for p in written] == ["report.md", "report.csv"] and not (root / "report.png").exists()
    assert "0 of 2 finished" in text and "alpha=0.1: failed (failed: RuntimeError: boom)" in text
