"""A sweep a researcher can read: a real multirun through the console script (Hydra's joblib launcher),
read back with TensorBoard's own event readers, then reported with `jacdistill report`."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, run_cli
from PIL import Image
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.context import RequestContext
from tensorboard.plugins.base_plugin import TBContext
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.backend_context import Context as HParamsContext

from jacdistill_cli.analysis.report import build_report
from jacdistill_cli.config.resolvers import MAX_DIRNAME, job_dirname
from jacdistill_cli.loop.saliency import CAPTION_HEIGHT, LABEL_WIDTH, TILE, saliency_grid, saliency_image

ALPHAS, SEEDS = ("0.2", "0.8"), ("0", "1")
# Named by what the sweep varies, keys sorted; the constant overrides (trainer.epochs=1, ...) left out.
RUNS = {f"alpha={a},seed={s}": (a, s) for a in ALPHAS for s in SEEDS}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, teacher_cache) -> Path:
    """4 jobs (alpha x seed), 1 epoch each, two at a time in joblib's worker processes; HOME is a fresh
    directory, so that whatever the sweep (and the report it ends with) writes outside it shows."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "home").mkdir()
    result = run_cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     f"alpha={','.join(ALPHAS)}", f"seed={','.join(SEEDS)}", *FAST, "trainer.threads=1",
                     f"hydra.sweep.dir={root / 'sweep'}", cwd=root,
                     env={"JACDISTILL_CACHE": str(teacher_cache), "HOME": str(root / "home"),
                          "XDG_CACHE_HOME": str(root / "home" / ".cache"), "MPLCONFIGDIR": ""})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Joblib.Parallel" in result.stdout + result.stderr  # the jobs ran through the joblib launcher
    (root / "sweep" / "stdout.txt").write_text(result.stdout)
    assert sorted(p.name for p in root.iterdir()) == ["home", "sweep"] and not list((root / "home").iterdir())
    return root / "sweep"


@pytest.mark.slow
def test_a_multirun_says_where_it_is_and_leaves_its_report(sweep):
    stdout = (sweep / "stdout.txt").read_text().splitlines()
    where = f"jacdistill train: sweep directory {sweep.resolve()}"
    # the first line once every job is checked, and the last
    assert stdout[0] == f"jacdistill train: 4 jobs checked; sweep directory {sweep.resolve()}" and stdout[-1] == where
    report = (sweep / "report.md").read_text()
    assert report in "\n".join(stdout) and "| 0.2 | 2 |" in report and "| 0.8 | 2 |" in report
    assert next(csv.DictReader(open(sweep / "report.csv")))["runs"] == "2"
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def accumulator(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_tensorboard_sees_each_job_as_one_run_named_by_its_overrides(sweep):
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(sweep))
    multiplexer.Reload()
    # Exactly one run per job, named by its overrides: no extra run for hparams in a subfolder, nor for the
    # sweep's experiment summary, which is a file of its own in the first run's directory.
    assert set(multiplexer.Runs()) == set(RUNS)
    first = sorted(RUNS)[0]
    for name in RUNS:
        files = sorted(p.name for p in (sweep / name).glob("events.out.tfevents.*"))
        assert len(files) == (2 if name == first else 1) and not list((sweep / name).glob("*/**/events.out.tfevents.*"))
    (summary,) = (sweep / first).glob("events.out.tfevents.*.experiment")
    summary_only = EventAccumulator(str(summary))
    summary_only.Reload()
    assert summary_only.Tags()["scalars"] == [] and summary_only.Tags()["images"] == []
    assert list(summary_only.PluginTagToContent(hparams_metadata.PLUGIN_NAME)) == [hparams_metadata.EXPERIMENT_TAG]


def hparams_experiment(logdir: Path):
    """The experiment TensorBoard's HPARAMS tab shows for `logdir`, and its sessions (run -> hparams),
    from TensorBoard's own hparams backend."""
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    backend = HParamsContext(TBContext(logdir=str(logdir),
                                       data_provider=MultiplexerDataProvider(multiplexer, str(logdir))))
    request = RequestContext()
    content = backend.hparams_metadata(request, "")
    experiment = backend.experiment_from_metadata(request, "", True, content,
                                                  backend.hparams_from_data_provider(request, "", limit=None))
    sessions = {run for run, tags in content.items() if hparams_metadata.SESSION_START_INFO_TAG in tags}
    return experiment, sessions


@pytest.mark.slow
def test_hparams_tab_leads_with_accuracy_and_compares_the_whole_sweep(sweep, tmp_path):
    experiment, sessions = hparams_experiment(sweep)
    assert sessions == set(RUNS)
    # The tab shows the first five metrics as columns: the student's test and validation accuracy first.
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert metrics[:4] == ["test/accuracy", "test/agreement", "test/jacobian_cosine", "val/accuracy"]
    assert {"loss/total", "loss/jacobian", "teacher/test_accuracy"} <= set(metrics[4:])
    differs = {info.name: info.differs for info in experiment.hparam_infos}
    assert differs["alpha"] and differs["seed"]  # what the sweep varies
    assert not differs["loss"] and not differs["jacobian"] and not differs["temperature"]
    assert not differs["trainer.epochs"] and "recipe" not in differs  # no recipe chosen: left blank
    infos = {info.name: info for info in experiment.hparam_infos}
    alpha = infos["alpha"]
    assert (alpha.domain_interval.min_value, alpha.domain_interval.max_value) == (0.2, 0.8)
    # Text hyperparameters list no allowed values: the tab would hide another sweep's runs by them.
    assert not infos["seed"].HasField("domain_discrete") and not infos["loss"].HasField("domain_discrete")

    # Two sweeps in one log directory: every run of both is a session of the tab, whichever summary it takes.
    both = tmp_path / "both"
    shutil.copytree(sweep, both / "a")
    shutil.copytree(sweep, both / "b")
    experiment, sessions = hparams_experiment(both)
    assert sessions == {f"{s}/{run}" for s in "ab" for run in RUNS}
    assert [info.name.tag for info in experiment.metric_infos][:4] == metrics[:4]


@pytest.mark.slow
def test_each_run_holds_its_hparams_metrics_layout_and_saliency_maps(sweep):
    for name, (alpha, seed) in RUNS.items():
        run_dir = sweep / name
        events = accumulator(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

        # HParams: this run's values and its status, in its own event file.
        content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
        start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
        end = hparams_metadata.parse_session_end_info_plugin_data(content[hparams_metadata.SESSION_END_INFO_TAG])
        hparams = {k: (v.number_value if v.WhichOneof("kind") == "number_value" else v.string_value)
                   for k, v in start.hparams.items()}
        # Integers as text (the tab prints numbers as 4.0000): the seed reads 0, the epochs 1.
        assert hparams["alpha"] == pytest.approx(float(alpha)) and hparams["seed"] == seed
        assert hparams["trainer.epochs"] == "1" and hparams["trainer.batch_size"] == "64"
        assert (hparams["loss"], hparams["jacobian"], hparams["dataset"]) == ("kl", "top1", "digits")
        assert hparams["temperature"] == 4 and hparams["hard_weight"] == 0
        assert "recipe" not in hparams  # no recipe chosen: left blank
        assert hparams["jacobian.normalize"] == "true" and hparams["jacobian.batchnorm"] == "batch"
        assert hparams["teacher"].startswith("cnn(") and hparams["student"].startswith("mlp(")
        assert "samples_per_class" not in hparams  # null: the whole training split, left blank
        assert end.status == Status.Value("STATUS_SUCCESS")
        # No experiment summary of its own: the sweep writes one for all its runs (above).
        if name != sorted(RUNS)[0]:
            assert hparams_metadata.EXPERIMENT_TAG not in content
        assert scalars["test/accuracy"][-1] == pytest.approx(metrics["test_accuracy"])
        assert scalars["val/accuracy"][-1] == pytest.approx(metrics["val_accuracy"])
        assert scalars["test/jacobian_cosine"][-1] == pytest.approx(metrics["jacobian_cosine"])

        # Custom scalars: one chart per loss term (with every run of the sweep), one per validation metric.
        (config,) = events.Tensors("custom_scalars__config__")
        layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
        charts = [chart for category in layout.category for chart in category.chart]
        assert [c.title for c in charts] == ["loss/total", "loss/distill", "loss/jacobian",  # no hard, features
                                             "val/accuracy", "val/agreement", "val/jacobian_cosine",
                                             "val/explanation_rank_correlation", "val/explanation_top10_iou"]
        for chart in charts:
            assert [tag for tag in scalars if any(re.search(p, tag) for p in chart.multiline.tag)] == [chart.title]
        # The teacher's accuracy: a level line from the first step to the last, not a lone point.
        teacher = events.Scalars("teacher/test_accuracy")
        assert [e.step for e in teacher] == [0, metrics["steps"]]
        assert [e.value for e in teacher] == [pytest.approx(metrics["teacher_test_accuracy"])] * 2

        # Saliency: one image per evaluation (1 epoch), 3 rows (input, teacher, student) of 8 images,
        # labelled on the left, each column's gradient cosine under it.
        images = events.Images("saliency/input_teacher_student")
        assert len(images) == 1 and images[0].step == metrics["steps"]
        assert (images[0].width, images[0].height) == (LABEL_WIDTH + 8 * (TILE + 2) + 2,
                                                        3 * (TILE + 2) + 2 + CAPTION_HEIGHT)
        picture = Image.open(io.BytesIO(images[0].encoded_image_string)).convert("L")
        picture = torch.tensor(np.asarray(picture), dtype=torch.float32)
        rows = [picture[2 + r * (TILE + 2): 2 + r * (TILE + 2) + TILE, LABEL_WIDTH:] for r in range(3)]
        assert all(picture[2 + r * (TILE + 2): 2 + r * (TILE + 2) + TILE, :LABEL_WIDTH].max() > 128
                   for r in range(3))  # a label (white text on black) beside each row
        assert all(row.std() > 0 for row in rows)
        assert not torch.equal(rows[1], rows[2])  # teacher and student maps differ after one epoch


@pytest.mark.slow
def test_report_of_the_sweep_gives_the_means_and_stds_of_its_metrics_json(sweep):
    result = run_cli("report", str(sweep), cwd=sweep)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert [row["alpha"] for row in rows] == list(ALPHAS)
    for row in rows:
        runs = [json.loads((sweep / name / "metrics.json").read_text())
                for name, (alpha, _) in RUNS.items() if alpha == row["alpha"]]
        assert int(row["runs"]) == 2 and row["not_finished"] == "0" and row["seeds"] == "0 1"
        for metric in ("test_accuracy", "val_accuracy", "agreement", "jacobian_cosine", "train_seconds"):
            values = [run[metric] for run in runs]
            assert float(row[f"{metric}_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert float(row[f"{metric}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-12)
        mean, std = float(row["test_accuracy_mean"]), float(row["test_accuracy_std"])
        assert re.search(rf"\| {row['alpha']} \| 2 \| {mean:.4f} ± {std:.4f} \|", result.stdout)
    assert "Same in every run: teacher.epochs=2 trainer.epochs=1 trainer.threads=1" in result.stdout
    assert (sweep / "report.md").read_text() in result.stdout
    png = sweep / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(png).size[0] > 300


@pytest.mark.slow
def test_report_lists_failed_unfinished_and_never_started_jobs(sweep, tmp_path, teacher_cache):
    copy = tmp_path / "sweeps"
    shutil.copytree(sweep, copy / "grid")
    names = sorted(RUNS)
    (copy / "grid" / names[3] / "metrics.json").unlink()   # alpha=0.8, seed=1: killed before the end
    shutil.rmtree(copy / "grid" / names[1])                 # alpha=0.2, seed=1: never started
    # A job whose loss diverges ends alone in one line (the other jobs go on), its metrics.json says so, and
    # the sweep exits with status 1 after its report.
    failed = run_cli("train", "-m", "optim.lr=1e30,0.001", *FAST, "trainer.threads=1",
                     f"hydra.sweep.dir={copy / 'diverged'}",
                     cwd=tmp_path, env={"JACDISTILL_CACHE": str(teacher_cache)})
    assert failed.returncode == 1, failed.stderr
    assert [line for line in failed.stderr.splitlines() if "error" in line] == [
        line for line in failed.stderr.splitlines() if line.startswith("jacdistill train: error: loss/total is ")]
    # (Hydra names the job by the value as it reads it: 1e+30)
    assert "optim.lr=1e+30: diverged (loss/total is " in (copy / "diverged" / "report.md").read_text()
    assert json.loads((copy / "diverged" / "optim.lr=0.001" / "metrics.json").read_text())["status"] == "finished"
    where = f"jacdistill train: sweep directory {(copy / 'diverged').resolve()}"
    assert failed.stdout.splitlines()[-1] == where

    report = build_report(copy)
    status = {run.name: (run.status, run.detail) for run in report.runs}
    assert status[f"grid/{names[3]}"] == ("did not finish", "no metrics.json")
    assert status[f"grid/{names[1]}"][0] == "not started"
    assert status["diverged/optim.lr=1e+30"][0] == "diverged" and "training diverged" in status["diverged/optim.lr=1e+30"][1]
    groups = {dict(g.key)["alpha"]: g for g in report.groups if dict(g.key)["alpha"]}
    assert (len(groups["0.2"].finished), len(groups["0.2"].runs)) == (1, 2)
    assert (len(groups["0.8"].finished), len(groups["0.8"].runs)) == (1, 2)
    kept = json.loads((copy / "grid" / names[2] / "metrics.json").read_text())["test_accuracy"]
    assert groups["0.8"].mean_std("test_accuracy") == (pytest.approx(kept), None)

    result = run_cli("report", str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 run(s) without results" in result.stdout
    assert re.search(r"diverged/optim.lr=1e\+30: diverged \(loss/total is ", result.stdout)
    assert f"grid/{names[1]}: not started" in result.stdout


@pytest.mark.slow
def test_a_sweep_rerun_skips_finished_jobs_and_resumes_the_others(sweep, tmp_path, teacher_cache):
    copy = tmp_path / "grid"
    shutil.copytree(sweep, copy)
    names = sorted(RUNS)
    for name in ("metrics.json", "student.pt"):                  # killed after its last epoch, before the test
        (copy / names[3] / name).unlink()
    for name in ("metrics.json", "student.pt", "last.pt"):       # killed before its first save
        (copy / names[1] / name).unlink()
    kept = {name: (copy / name / "metrics.json").stat().st_mtime_ns for name in (names[0], names[2])}
    result = run_cli("train", "-m", f"alpha={','.join(ALPHAS)}", f"seed={','.join(SEEDS)}", *FAST,
                     "trainer.threads=1", f"hydra.sweep.dir={copy}", cwd=tmp_path,
                     env={"JACDISTILL_CACHE": str(teacher_cache)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finished in") == 2 and result.stdout.count("resuming from") == 1
    assert {name: (copy / name / "metrics.json").stat().st_mtime_ns for name in kept} == kept
    wall_clock = ("train_seconds", "samples_per_second", "teacher_source")   # teacher_source: cache now
    for name in (names[1], names[3]):   # the same results as the sweep never interrupted
        again, first = (json.loads((root / name / "metrics.json").read_text()) for root in (copy, sweep))
        assert {k: v for k, v in again.items() if k not in wall_clock} == {
            k: v for k, v in first.items() if k not in wall_clock}
        events = EventAccumulator(str(copy / name), size_guidance={"scalars": 0})
        events.Reload()   # the terms are read at each epoch's end (and every 50 steps): each step once
        assert [e.step for e in events.Scalars("loss/total")] == [first["steps"]]


def test_job_directory_names_are_readable_unique_and_fit_a_file_name():
    assert job_dirname("alpha=0.3,jacobian=exact", 0) == "alpha=0.3,jacobian=exact"
    assert job_dirname("", 7) == "7"
    # Characters a file name cannot hold are replaced, and a hash keeps such names apart.
    slash, underscore = job_dirname("teacher.checkpoint=a/b.pt", 0), job_dirname("teacher.checkpoint=a_b.pt", 1)
    assert "/" not in slash and slash != underscore and slash.startswith("teacher.checkpoint=a_b.pt~")
    long_a = job_dirname(",".join(f"key{i}=value{i}" for i in range(40)), 0)
    long_b = job_dirname(",".join(f"key{i}=value{i}" for i in range(41)), 1)
    assert len(long_a) <= MAX_DIRNAME and len(long_b) <= MAX_DIRNAME and long_a != long_b
    # A sweeper that may draw the same values twice (Optuna) gets the job number in front.
    from omegaconf import OmegaConf

    optuna = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.OptunaSweeper"}}})
    assert job_dirname("alpha=0.31", 12, _root_=optuna) == "012,alpha=0.31"


def test_saliency_grid_shows_inputs_and_both_maps_for_one_and_three_channels():
    torch.manual_seed(0)
    for channels in (1, 3):
        inputs = torch.randn(5, channels, 6, 6)
        teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * 36, 4))
        student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * 36, 4))
        grid = saliency_image(student, teacher, inputs)
        assert grid.shape == (3, 3 * (TILE + 2) + 2 + CAPTION_HEIGHT, LABEL_WIDTH + 5 * (TILE + 2) + 2)
        assert grid.min() >= 0 and grid.max() <= 1
        # Row 2, column 1: the teacher's |gradient| of its top class for input 0, scaled to [0, 1]
        # (to the 1/255 of an 8-bit image).
        top = teacher(inputs).argmax(1)
        weights = teacher[1].weight[top[0]].detach().view(channels, 6, 6)
        expected = weights.abs().amax(0)
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        tile = grid[0, TILE + 4: 2 * TILE + 4, LABEL_WIDTH + 2: LABEL_WIDTH + TILE + 2]
        scaled = torch.nn.functional.interpolate(expected[None, None], size=(TILE, TILE), mode="nearest")[0, 0]
        assert torch.allclose(tile, scaled, atol=0.5 / 255 + 1e-6)
        # Signed: red where the gradient (summed over channels) is positive, blue where negative.
        signed = saliency_grid(inputs, torch.stack([weights] * 5), torch.stack([weights] * 5), mode="signed",
                               labels=False)
        tile = signed[:, TILE + 4: 2 * TILE + 4, 2: TILE + 2]
        summed = torch.nn.functional.interpolate(weights.sum(0)[None, None], size=(TILE, TILE))[0, 0]
        red, blue = tile[0] - tile[2], summed / summed.abs().max()
        assert torch.allclose(red, blue, atol=1e-6)
    flat = saliency_grid(torch.randn(2, 10), torch.randn(2, 10), torch.randn(2, 10), tile=8, labels=False)
    assert flat.shape == (3, 3 * 10 + 2, 2 * 10 + 2)


def test_saliency_grid_labels_each_column_with_the_cosine_of_the_two_gradients():
    """The numbers under the columns are the cosines of the gradients: drawn text, compared by pixels
    with the same grid for known cosines."""
    inputs = torch.rand(3, 1, 6, 6)
    teacher = torch.randn(3, 1, 6, 6)
    student = torch.stack([teacher[0], -teacher[1], torch.randn(1, 6, 6)])
    cosines = torch.nn.functional.cosine_similarity(teacher.flatten(1), student.flatten(1), dim=1)
    assert cosines[0] == pytest.approx(1) and cosines[1] == pytest.approx(-1)
    grid = saliency_grid(inputs, teacher, student)
    from jacdistill_cli.loop.saliency import _labelled

    plain = saliency_grid(inputs, teacher, student, labels=False)
    assert torch.equal(grid, _labelled(plain, TILE, cosines.tolist()))
    assert not torch.equal(grid, _labelled(plain, TILE, [0.5, 0.5, 0.5]))


def test_progress_bars_show_running_loss_terms_only_when_asked(capsys, tmp_path, monkeypatch):

    from jacdistill_cli.engine.objective import cross_entropy_objective
    from jacdistill_cli.loop.callbacks import ProgressBar, TensorBoard
    from jacdistill_cli.loop.distiller import Distiller
    from jacdistill_cli.loop.logger import RunLogger
    from jacdistill_cli.loop.trainer import Trainer
    from jacdistill_cli.spec.run import LoopSpec
    from jacdistill_cli.zoo.data import DataBundle, TensorSplit

    split = TensorSplit(torch.randn(40, 1, 4, 4), torch.arange(40) % 2)
    data = DataBundle("toy", split, split, split, 2, (1, 4, 4))
    from jacdistill_cli.spec.run import OptimSpec

    optim = OptimSpec("adam", lambda params: torch.optim.Adam(params, lr=0.01), "constant")
    for progress in (True, False):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        logger = RunLogger(tmp_path / str(progress))
        callbacks = [TensorBoard(logger), *([ProgressBar()] if progress else [])]
        Trainer(LoopSpec(2, 8, 40, log_every_steps=1), optim, torch.device("cpu"), callbacks=callbacks).fit(
            Distiller(model, None, cross_entropy_objective), data)
        logger.close()
        err = capsys.readouterr().err
        if progress:  # tqdm: one bar per epoch, 5 batches of 8, with the running mean of each loss term
            assert "epoch 2/2" in err and "5/5" in err and "hard " in err and "total " in err
        else:
            assert "epoch" not in err


def test_progress_bar_fits_80_columns(tmp_path):
    """On a pseudo-terminal of 80 columns, every state of a bar fits in one line: the usual terms in full
    or shortened, and with five terms and a long description the bar is cut by tqdm, never wrapped."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    from tqdm import tqdm

    from jacdistill_cli.loop.callbacks import BAR_FORMAT, progress_postfix, progress_room

    def shown(desc: str, terms: dict[str, float], columns: int) -> list[str]:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        with os.fdopen(slave, "w") as terminal:
            bar = tqdm(total=1234, desc=desc, file=terminal, dynamic_ncols=True, bar_format=BAR_FORMAT,
                       mininterval=0)
            for _ in range(3):
                bar.update(400)
                bar.set_postfix_str(progress_postfix(terms, progress_room(desc, 1234, terminal)))
            bar.close()
        written = b""
        while True:  # everything written, until the closed terminal reads as ended
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            written += chunk
        os.close(master)
        written = written.decode()
        lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line) for line in re.split(r"[\r\n]", written)]
        return [line for line in lines if line.strip()]

    usual = {"distill": 0.0231, "jacobian": 1.0556, "total": 0.8490, "hard": 2.1234}
    lines = shown("epoch 12/100", usual, 80)
    assert lines and all(len(line) < 80 for line in lines), [len(line) for line in lines]
    assert re.search(r"1200/1234 \S+, tot 0\.85\d*  dist 0\.02\d*  jac 1\.0[56]\d*  hard 2\.12\d*$", lines[-1])
    wide = shown("epoch 12/100", usual, 160)
    assert wide[-1].endswith("total 0.8490  distill 0.0231  jacobian 1.0556  hard 2.1234")
    every = shown("teacher/epoch 100/100", {**usual, "features": 0.5}, 80)
    assert all(len(line) < 80 for line in every) and ", tot 0.85  dist" in every[-1]
