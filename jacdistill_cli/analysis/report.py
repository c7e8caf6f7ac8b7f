"""Reports over runs: the final metrics of every `train` run under a directory, grouped by their overrides.

A run is a directory with Hydra's `.hydra/overrides.yaml` whose job is `train`; it finished when its
`metrics.json` exists. Runs are grouped by their overrides other than `seed`, and each group gets the
mean and the sample standard deviation over its seeds. Runs that failed (an error in the run's log),
did not finish, or never started (a job of the sweep's grid without a directory) are listed by name.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf

from jacdistill_cli.config.resolvers import BASIC_SWEEPERS, job_dirname, swept_keys, varying_dirname
from jacdistill_cli.errors import UsageError
from jacdistill_cli.explain.figure import private_matplotlib_config
from jacdistill_cli.records.status import DIVERGED, FINISHED, INTERRUPTED, REFUSED
from jacdistill_cli.spec.sweep import expanded
from jacdistill_cli.storage import write_bytes, write_text

SEED_KEY = "seed"
# Columns of the printed table; the CSV has every numeric metric of metrics.json.
TABLE_METRICS = ("test_accuracy", "val_accuracy", "agreement", "jacobian_cosine")
# metrics.json's robust accuracies ({attack key: accuracy}), read as the metrics `robust_accuracy/<key>` and
# `teacher_robust_accuracy/<key>`: the table's robust columns, after the teacher's clean accuracy.
ROBUST = ("robust_accuracy", "teacher_robust_accuracy")
# The x-axis of the plot, in order of preference, when `x=auto` and the key varies across groups.
PREFERRED_X = ("dataset.samples_per_class", "alpha")
# What a run's metrics.json says (records/status.py: finished; diverged, its loss became non-finite, at which step;
# refused, a setting refused after its directory was claimed, why; interrupted, where and how to resume), and
# what report sees besides: a job whose log ends in an error, one without metrics.json, one never started.
FAILED, UNFINISHED, NOT_STARTED = "failed", "did not finish", "not started"
UNREADABLE = "unreadable"   # its .hydra files cannot be read: settings unknown


@dataclass
class Run:
    """One train job: where it is, the overrides it was given, its metrics if it finished."""

    name: str                      # its directory relative to the report's directory ("." for itself)
    overrides: dict[str, str]      # key -> value, as given on the command line or by the sweeper
    metrics: dict | None           # metrics.json, or None
    status: str = FINISHED         # FINISHED | FAILED | DIVERGED | UNFINISHED | NOT_STARTED
    detail: str = ""               # the error line of a failed run
    settings: dict[str, Any] = field(default_factory=dict)   # its config.yaml, flat: what an override left as is


@dataclass
class Group:
    """Runs that differ only in their seed."""

    key: tuple[tuple[str, str], ...]                  # (override key, value) pairs, seed left out
    runs: list[Run] = field(default_factory=list)

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.status == FINISHED]

    def values(self, metric: str) -> list[float]:
        found = [r.metrics.get(metric) for r in self.finished]
        return [float(v) for v in found if isinstance(v, (int, float)) and not isinstance(v, bool)]

    def mean_std(self, metric: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation (n - 1) over the finished runs; std is None for one run."""
        values = self.values(metric)
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class Report:
    directory: Path
    runs: list[Run]
    groups: list[Group]
    varying: list[str]               # override keys (seed aside) whose value differs between groups
    constant: dict[str, str]         # override keys with one value in every run
    metrics: list[str]               # numeric metrics found in metrics.json files, in a stable order


def parse_override(text: str) -> tuple[str, str]:
    """`+recipe=kd` -> ("recipe", "kd"); `~key` -> ("~key", "")."""
    key, _, value = str(text).partition("=")
    return key.lstrip("+"), value


def natural(value: str) -> tuple:
    """Sort key: numbers by value, before text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def last_error(log_file: Path) -> str:
    """The last ERROR line of a run's log, without its timestamp prefix, or ""."""
    if not log_file.is_file():
        return ""
    errors = [line for line in log_file.read_text(errors="replace").splitlines() if "][ERROR] - " in line]
    return errors[-1].split("][ERROR] - ", 1)[1].strip() if errors else ""


class Unreadable(Exception):
    """A run's .hydra file that is not the YAML Hydra writes."""


def read_yaml(path: Path):
    """A YAML file as OmegaConf reads it; Unreadable (one line saying why) when it cannot be parsed."""
    try:
        return OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - yaml, OmegaConf and OS errors all mean the same here
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise Unreadable(f"{path.parent.name}/{path.name} is not valid YAML ({first})") from None


def read_overrides(run_dir: Path) -> dict[str, str]:
    """A run's command-line overrides from .hydra/overrides.yaml (a list of `key=value`)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    listed = read_yaml(path) or []
    if not OmegaConf.is_list(listed) and not isinstance(listed, list):
        raise Unreadable(".hydra/overrides.yaml holds no list of overrides")
    return dict(parse_override(o) for o in listed)


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        found: dict[str, Any] = {}
        for key, value in node.items():
            found.update(flat(value, f"{prefix}{key}."))
        return found
    return {prefix[:-1]: node}


def read_settings(run_dir: Path) -> dict[str, Any]:
    """A run's resolved config.yaml, flat (`trainer.epochs: 20`), and each group's option by its node's name
    (`jacobian: top1`); {} when it has none or it cannot be read."""
    try:
        config = OmegaConf.to_container(read_yaml(run_dir / "config.yaml"), resolve=False)
    except Unreadable:
        return {}
    if not isinstance(config, dict):
        return {}
    names = {key: node["name"] for key, node in config.items() if isinstance(node, dict) and "name" in node}
    return {**flat(config), **names}


def sweep_settings(sweep: Path) -> dict[str, Any]:
    """The settings a sweep's jobs share before their own overrides (its multirun.yaml, flat, as read_settings
    reads a run's config.yaml): what a job that never started would have had."""
    try:
        config = OmegaConf.to_container(read_yaml(sweep / "multirun.yaml"), resolve=False)
    except Unreadable:
        return {}
    config = {k: v for k, v in config.items() if k != "hydra"} if isinstance(config, dict) else {}
    names = {key: node["name"] for key, node in config.items() if isinstance(node, dict) and "name" in node}
    return {**flat(config), **names}


def setting(run: Run, key: str) -> str:
    """A run's value of an override key: as given, else as its config says (unknown: "")."""
    if key in run.overrides:
        return run.overrides[key]
    value = run.settings.get(key)
    return "" if value is None and key not in run.settings else str(value).replace("None", "null")


def job_name(run_dir: Path) -> str | None:
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    try:
        return OmegaConf.select(read_yaml(hydra_file), "hydra.job.name", default=None)
    except Unreadable:
        return None  # read_run says why


def read_run(run_dir: Path, root: Path) -> Run:
    name = run_dir.relative_to(root).as_posix() if run_dir != root else "."
    try:
        overrides = read_overrides(run_dir)
        if (run_dir / ".hydra" / "hydra.yaml").is_file():
            read_yaml(run_dir / ".hydra" / "hydra.yaml")
    except Unreadable as err:
        return Run(name, {}, None, UNREADABLE, str(err))
    settings = read_settings(run_dir)
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return Run(name, overrides, None, UNFINISHED, "metrics.json is not valid JSON", settings)
        if not isinstance(metrics, dict):
            return Run(name, overrides, None, UNFINISHED,
                       f"metrics.json holds a {type(metrics).__name__}, not an object of metrics", settings)
        if metrics.get("status") == INTERRUPTED:
            where = (f"at epoch {metrics.get('epoch')}, step {metrics.get('step')}" if metrics.get("step") is not None
                     else "before the student's first epoch")
            return Run(name, overrides, None, UNFINISHED, f"interrupted by {metrics.get('signal')} {where}; resume: "
                       f"{metrics.get('resume')}", settings)
        if metrics.get("status") in (DIVERGED, REFUSED):
            return Run(name, overrides, None, metrics["status"], str(metrics.get("error", "")), settings)
        return Run(name, overrides, flattened(metrics), settings=settings)
    error = last_error(run_dir / f"{job_name(run_dir) or 'train'}.log")
    if error:
        return Run(name, overrides, None, FAILED, error, settings)
    return Run(name, overrides, None, UNFINISHED, "no metrics.json", settings)


def flattened(metrics: dict) -> dict:
    """metrics.json with its robust accuracies ({"robust_accuracy": {"pgd_linf_0.1": ...}}) as metrics of their
    own (`robust_accuracy/pgd_linf_0.1`)."""
    flat = dict(metrics)
    for name in ROBUST:
        nested = flat.pop(name, None)
        if isinstance(nested, dict):
            flat.update({f"{name}/{key}": value for key, value in nested.items()})
    return flat


def table_metrics(report: "Report") -> list[str]:
    """The printed table's columns: TABLE_METRICS, and with robust accuracies the teacher's clean accuracy,
    then each attack's robust accuracy of the student and of the teacher (`clean`, the accuracy on the
    attacked samples, is left to the CSV)."""
    columns = [m for m in TABLE_METRICS if m in report.metrics]
    robust = [m for m in report.metrics if m.startswith(tuple(f"{name}/" for name in ROBUST))
              and not m.endswith("/clean")]
    if robust:
        columns += [m for m in ("teacher_test_accuracy",) if m in report.metrics] + robust
    return columns


def robust_line(report: "Report") -> str | None:
    """How many test samples the runs' robust accuracy was measured on, at what cost; None without it."""
    finished = [r.metrics for r in report.runs if r.status == FINISHED and "robust_samples" in r.metrics]
    if not finished:
        return None
    samples = sorted({int(m["robust_samples"]) for m in finished})
    seconds = statistics.fmean(float(m.get("robust_seconds", 0.0)) for m in finished)
    counted = str(samples[0]) if len(samples) == 1 else f"{samples[0]} to {samples[-1]}"
    return (f"Robust accuracy (robust_accuracy/<attack>_<norm>_<epsilon>, epsilon and noise sigma in pixel scale "
            f"[0, 1]) on the first {counted} test samples of each run (robustness.samples), student and teacher "
            f"attacked in {seconds:.1f} s a run on average; teacher_robust_accuracy/* is the teacher's.")


def run_directories(root: Path) -> list[Path]:
    """Directories at or below `root` holding a train job (`.hydra/overrides.yaml`, job name train)."""
    found = [p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"]
    return sorted((d for d in found if job_name(d) in (None, "train")), key=lambda d: d.as_posix())


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The override lists of every job of a sweep made by Hydra's basic sweeper, from its multirun.yaml:
    the command line's overrides and the config's hydra.sweeper.params, expanded the way the sweeper
    does. None when unknown (another sweeper, such as Optuna, chooses its jobs as it goes)."""
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        return None
    try:
        cfg = OmegaConf.load(multirun)
        if OmegaConf.select(cfg, "hydra.sweeper._target_", default="") not in BASIC_SWEEPERS:
            return None
        params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
        return expanded(dict(params), list(OmegaConf.select(cfg, "hydra.overrides.task", default=None) or []))
    except Exception:  # noqa: BLE001 - an unreadable grid only loses the "not started" rows
        return None


def collect(directory: Path) -> list[Run]:
    """Every train run at or below `directory`, plus the jobs of its sweeps that never started."""
    root = Path(directory)
    dirs = run_directories(root)
    runs = [read_run(d, root) for d in dirs]
    sweeps = sorted({p.parent for p in root.rglob("multirun.yaml")})  # rglob includes root's own
    for sweep in sweeps:
        jobs = expected_jobs(sweep)
        if jobs is None:
            continue
        started = [r.overrides for d, r in zip(dirs, runs) if sweep in d.parents and r.status != UNREADABLE]
        try:
            excluded = set(OmegaConf.select(read_yaml(sweep / "multirun.yaml"),
                                            "hydra.job.config.override_dirname.exclude_keys", default=None) or [])
        except Unreadable:
            continue
        for job in jobs:
            overrides = dict(parse_override(o) for o in job)
            if overrides not in started:
                # Named as its directory would have been: the overrides the sweep varies, sorted.
                dirname = job_dirname(varying_dirname(job, swept_keys(str(sweep.resolve())), sorted(excluded)), "?")
                name = (sweep.relative_to(root) / dirname).as_posix()
                runs.append(Run(name, overrides, None, NOT_STARTED, "no job directory", sweep_settings(sweep)))
    return runs


def build_report(directory: Path) -> Report:
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"dir={str(directory)!r} is not allowed: it is not a directory; give a run or sweep "
                         "directory, such as outputs/train/multirun/DATE/TIME")
    runs = collect(directory)
    if not runs:
        raise UsageError(f"dir={str(directory)!r} is not allowed: it holds no train run (no .hydra/overrides.yaml "
                         "of a `jacdistill train` job at or below it)")
    if all(r.status == UNREADABLE for r in runs):
        raise UsageError(f"dir={str(directory)!r} is not allowed: no run under it can be read: {runs[0].name}: "
                         f"{runs[0].detail}")
    keys = sorted({k for r in runs for k in r.overrides if k != SEED_KEY})
    values = {k: {setting(r, k) for r in runs} for k in keys}
    varying = [k for k in keys if len(values[k]) > 1]
    constant = {k: next(iter(values[k])) for k in keys if len(values[k]) == 1}
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = tuple((k, setting(run, k)) for k in varying)
        groups.setdefault(key, Group(key)).runs.append(run)
    ordered = sorted(groups.values(), key=lambda g: [natural(v) for _, v in g.key])
    metrics = metric_names(r.metrics for r in runs if r.metrics)
    return Report(directory, runs, ordered, varying, constant, metrics)


def metric_names(all_metrics: Iterable[dict]) -> list[str]:
    names: list[str] = []
    for metrics in all_metrics:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in names:
                names.append(name)
    return [m for m in TABLE_METRICS if m in names] + [m for m in names if m not in TABLE_METRICS]


def short(value: float | None, digits: int = 4) -> str:
    """A metric for the table: '–' when missing, nan/inf as such (a diverged run shows as one)."""
    if value is None:
        return "–"
    return str(value) if not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(report: Report) -> str:
    """The table: one row per group, mean ± std over seeds, then the runs that did not finish."""
    finished = sum(r.status == FINISHED for r in report.runs)
    lines = [f"Runs under {report.directory}: {finished} of {len(report.runs)} finished, "
             f"{len(report.groups)} group(s); mean ± std over seeds (sample std, n - 1)."]
    if report.constant:
        lines.append("Same in every run: " + " ".join(f"{k}={v}" for k, v in report.constant.items()))
    robust = robust_line(report)
    if robust is not None:
        lines.append(robust)
    lines.append("")
    metrics = table_metrics(report)
    any_unfinished = any(len(g.finished) < len(g.runs) for g in report.groups)
    header = [*report.varying, "runs", *(["not finished"] if any_unfinished else []), *metrics]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for group in report.groups:
        cells = [value or "(default)" for _, value in group.key]
        cells.append(str(len(group.finished)))
        if any_unfinished:
            cells.append(str(len(group.runs) - len(group.finished)))
        for metric in metrics:
            mean, std = group.mean_std(metric)
            cells.append(short(mean) if std is None else f"{short(mean)} ± {short(std)}")
        lines.append("| " + " | ".join(cells) + " |")
    problems = [r for r in report.runs if r.status != FINISHED]
    if problems:
        lines += ["", f"{len(problems)} run(s) without results:", ""]
        lines += [f"- {r.name}: {r.status} ({r.detail})" for r in sorted(problems, key=lambda r: r.name)]
    return "\n".join(lines) + "\n"


def write_csv(report: Report, path: Path) -> None:
    """One row per group: its override values, run counts, then mean and std of every numeric metric."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([*report.varying, "runs", "not_finished", "seeds",
                     *[f"{m}_{s}" for m in report.metrics for s in ("mean", "std")]])
    for group in report.groups:
        seeds = " ".join(r.overrides.get(SEED_KEY, "") for r in group.finished)
        row: list = [value for _, value in group.key]
        row += [len(group.finished), len(group.runs) - len(group.finished), seeds]
        for metric in report.metrics:
            mean, std = group.mean_std(metric)
            row += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
        writer.writerow(row)
    write_text(path, text.getvalue())


def numeric(values: Iterable[str]) -> bool:
    try:
        [float(v) for v in values]
        return True
    except ValueError:
        return False


def x_axis(report: Report, choice: str = "auto") -> str | None:
    """The override key to plot along x: `choice`, or samples_per_class, alpha, another numeric key."""
    numeric_keys = [k for k in report.varying
                    if numeric(v for g in report.groups for key, v in g.key if key == k)]
    if choice != "auto":
        if choice not in numeric_keys:
            allowed = ", ".join(["auto", *numeric_keys]) if numeric_keys else "auto (no numeric override varies)"
            raise UsageError(f"x={choice!r} is not allowed: it must be one of {allowed}")
        return choice
    for key in PREFERRED_X:
        if key in numeric_keys:
            return key
    return numeric_keys[0] if numeric_keys else None


def plot_lines(report: Report, metric: str, key: str) -> dict[str, list[tuple[float, float, float]]]:
    """{line label: [(x, mean, std), ...] sorted by x}: one line per combination of the varying keys
    other than `key` (its label, such as `recipe=kd`), one point per group with a finished run."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for group in report.groups:
        mean, std = group.mean_std(metric)
        if mean is None:
            continue
        label = ", ".join(f"{k}={v}" for k, v in group.key if k != key) or metric
        lines.setdefault(label, []).append((float(dict(group.key)[key]), mean, std or 0.0))
    return {label: sorted(points) for label, points in lines.items()}


def robust_panel(report: Report, metric: str) -> str | None:
    """The robust accuracy drawn beside `metric`: the student's first L∞ PGD accuracy (else its first PGD's,
    else its first attack's), None without robust accuracies or when `metric` is one already."""
    student = [m for m in report.metrics if m.startswith("robust_accuracy/") and not m.endswith("/clean")]
    if not student or metric.startswith(tuple(f"{name}/" for name in ROBUST)):
        return None
    return next((m for prefix in ("robust_accuracy/pgd_linf_", "robust_accuracy/pgd_") for m in student
                 if m.startswith(prefix)), student[0])


def draw(report: Report, path: Path, metric: str = "test_accuracy", x: str = "auto") -> None:
    """`metric` (mean ± std) against the x key, one line per combination of the other varying keys;
    horizontal bars per group when no numeric key varies. With robust accuracies, a second panel beside it
    draws one (robust_panel) the same way."""
    import logging

    private_matplotlib_config()
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no font-cache chatter in the report
    import matplotlib.pyplot as plt

    key = x_axis(report, x)
    metrics = [metric, *([robust] if (robust := robust_panel(report, metric)) else [])]
    figure, panels = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4.5), squeeze=False)
    for axes, drawn in zip(panels[0], metrics):
        panel(axes, report, drawn, key)
    figure.suptitle("/".join(report.directory.resolve().parts[-3:]), fontsize=9)
    with warnings.catch_warnings():   # matplotlib's notice when long labels do not fit: the figure is drawn all the same
        warnings.simplefilter("ignore")
        figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, dpi=120, format="png")
    write_bytes(path, image.getbuffer())
    plt.close(figure)


def panel(axes, report: Report, metric: str, key: str | None) -> None:
    """One metric of the report on matplotlib `axes`: against `key`, or as bars per group when it is None."""
    if key is None:
        labels = [",".join(f"{k}={v}" for k, v in g.key) or "all runs" for g in report.groups]
        stats = [g.mean_std(metric) for g in report.groups]
        axes.barh(range(len(labels)), [m if m is not None else 0 for m, _ in stats],
                  xerr=[s or 0 for _, s in stats], color="tab:blue", alpha=0.8, capsize=3)
        axes.set_yticks(range(len(labels)), labels, fontsize=8)
        axes.set_xlabel(f"{metric} (mean ± std over seeds)")
    else:
        lines = plot_lines(report, metric, key)
        for label, points in lines.items():
            axes.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                          marker="o", capsize=3, label=label)
        xs = [p[0] for points in lines.values() for p in points]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
            axes.set_xscale("log")
            axes.set_xticks(sorted(set(xs)), [f"{v:g}" for v in sorted(set(xs))])
        axes.set_xlabel(key)
        axes.set_ylabel(f"{metric} (mean ± std over seeds)")
        if lines:
            axes.legend(fontsize=8)
    axes.grid(alpha=0.3)


OUTPUT_NAMES = ("report.md", "report.csv", "report.png")


def write_report(directory: Path, metric: str = "test_accuracy", x: str = "auto") -> tuple[Report, str, list[Path]]:
    """Build the report of `directory` and write report.md, report.csv and, when a run finished,
    report.png into it (a report.png of an earlier report is removed when none did: no empty plot).
    Returns the report, its Markdown text and the files written."""
    report = build_report(directory)
    if metric not in report.metrics and any(r.metrics for r in report.runs):
        raise UsageError(f"metric={metric!r} is not allowed: it must be one of {', '.join(report.metrics)}")
    x_axis(report, x)  # a bad x stops before anything is written
    text = markdown(report)
    directory = Path(directory)
    written = [directory / "report.md", directory / "report.csv"]
    write_text(written[0], text)
    write_csv(report, written[1])
    png = directory / "report.png"
    if any(group.values(metric) for group in report.groups):
        draw(report, png, metric, x)
        written.append(png)
    elif png.is_file():
        png.unlink()
    return report, text, written
