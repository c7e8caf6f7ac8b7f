"""The Trainer's contract, with callbacks of the tests' own: the order of the hooks, the state a run continues
from (through last.pt), failures told to every callback, a run resumed mid-epoch ending as the one never
interrupted, the loss terms read from the device at the logging cadence (the means of their window), and a
step that never reads a tensor's value on the host."""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from helpers import objective

from jacdistill_cli.errors import Diverged
from jacdistill_cli.loop.callbacks import Callback, Checkpointing, SavePolicy
from jacdistill_cli.loop.distiller import Distiller
from jacdistill_cli.loop.trainer import Trainer
from jacdistill_cli.records.directory import LAST
from jacdistill_cli.records.signals import Interrupted, Signals
from jacdistill_cli.records.state import load_state
from jacdistill_cli.spec.run import LoopSpec, OptimSpec
from jacdistill_cli.zoo.data import DataBundle, TensorSplit

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 4, 4)


def data(samples: int = 12) -> DataBundle:
    generator = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(samples, *SHAPE, generator=generator), torch.arange(samples) % 3)
    return DataBundle("toy", split, split, split, 3, SHAPE)


def distiller(seed: int = 0) -> Distiller:
    """A student MLP (drawn from `seed`) and a frozen linear teacher (always the same: a run's teacher is not in
    its state) under KD + top1 (the engine's own objective)."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).requires_grad_(False).eval()
    torch.manual_seed(seed)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    generator = torch.Generator().manual_seed(seed)
    return Distiller(student, teacher, objective("kl", 4.0, 0.5, 0.0, {"name": "top1"}, generator))


def sgd(lr: float = 0.1) -> OptimSpec:
    return OptimSpec("sgd", lambda params: torch.optim.SGD(params, lr=lr), "constant")


def trainer(callbacks=(), epochs: int = 3, log_every_steps: int = 50, lr: float = 0.1) -> Trainer:
    return Trainer(LoopSpec(epochs, 4, 12, log_every_steps=log_every_steps), sgd(lr), torch.device("cpu"),
                   callbacks=callbacks, seed=0)


class Recorder(Callback):
    """Every hook it hears, in order, and a state of its own (how many steps it saw)."""

    def __init__(self):
        self.heard: list[tuple] = []
        self.steps = 0

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = 0 if state is None else state["steps"]

    def on_fit_start(self, trainer):
        self.heard.append(("fit_start",))

    def on_epoch_start(self, trainer, epoch):
        self.heard.append(("epoch_start", epoch))

    def on_step_end(self, trainer):
        self.steps += 1
        self.heard.append(("step_end", trainer.progress.step))

    def on_log(self, trainer, values):
        self.heard.append(("log", trainer.progress.step, tuple(sorted(values))))

    def on_train_epoch_end(self, trainer, epoch):
        self.heard.append(("train_epoch_end", epoch))

    def on_evaluation_end(self, trainer, val):
        self.heard.append(("evaluation_end", tuple(sorted(val))))

    def on_epoch_end(self, trainer, epoch, val):
        self.heard.append(("epoch_end", epoch, val is not None))

    def on_fit_end(self, trainer):
        self.heard.append(("fit_end",))

    def on_exception(self, trainer, error):
        self.heard.append(("exception", type(error).__name__))


def test_the_hooks_come_in_the_order_of_the_loop_and_the_terms_are_read_at_the_logging_cadence():
    recorder = Recorder()
    trainer(callbacks=[recorder], epochs=2, log_every_steps=2).fit(distiller(), data())
    terms = ("distill", "jacobian", "total")
    epoch = lambda e, first: [  # noqa: E731 - 3 steps an epoch; a read at step 2 of the run's count and at its end
        ("epoch_start", e), ("step_end", first), *([("log", first + 1, terms)] if (first + 1) % 2 == 0 else []),
        ("step_end", first + 1), *([("log", first + 2, terms)] if (first + 2) % 2 == 0 else []),
        ("step_end", first + 2), ("log", first + 2, terms), ("train_epoch_end", e),
        ("evaluation_end", ("accuracy", "agreement", "explanation_rank_correlation", "explanation_top10_iou",
                            "jacobian_cosine")), ("epoch_end", e, True)]
    expected = [("fit_start",), *epoch(1, 1), *epoch(2, 4), ("fit_end",)]
    # a read at a step comes before that step's on_step_end; an epoch's last read follows its last step
    assert [h for h in recorder.heard if h[0] != "log"] == [h for h in expected if h[0] != "log"]
    assert [h[1] for h in recorder.heard if h[0] == "log"] == [2, 3, 4, 6]


def test_what_is_logged_is_the_mean_of_the_steps_since_the_last_read():
    """log_every_steps=1 gives each step's terms; log_every_steps=3 their mean over the window (the epoch)."""
    class Values(Callback):
        def __init__(self):
            self.logged = []

        def on_log(self, trainer, values):
            self.logged.append((trainer.progress.step, values["total"]))

    every, windowed = Values(), Values()
    trainer(callbacks=[every], epochs=2, log_every_steps=1).fit(distiller(), data())
    trainer(callbacks=[windowed], epochs=2, log_every_steps=3).fit(distiller(), data())
    per_step = dict(every.logged)
    assert [step for step, _ in windowed.logged] == [3, 6]
    for step, mean in windowed.logged:
        assert mean == pytest.approx(sum(per_step[s] for s in range(step - 2, step + 1)) / 3, rel=1e-12)


def test_state_round_trips_through_last_pt_with_each_callbacks_own(tmp_path):
    recorder, signals = Recorder(), Signals()
    saving = Checkpointing(tmp_path, SavePolicy(every_epochs=1, epochs=2), signals, best_payload=lambda val: {})
    trained = trainer(callbacks=[recorder, saving], epochs=2)
    trained.fit(distiller(), data())
    state = load_state(tmp_path / LAST)
    assert state["version"] == 3 and state["callbacks"]["Recorder"] == {"steps": 6}
    assert state["callbacks"]["Checkpointing"]["best"]["epoch"] in (1, 2)
    assert state["progress"]["epoch"] == 3 and state["progress"]["step"] == 6
    assert set(state["generators"]) == {"batches", "objective"}
    fresh_recorder = Recorder()
    resumed = trainer(callbacks=[fresh_recorder, Checkpointing(tmp_path, SavePolicy(), Signals(),
                                                               best_payload=lambda val: {})], epochs=2)
    resumed.fit(distiller(seed=1), data(), state)   # another student's weights: replaced by the state's
    assert fresh_recorder.steps == 6 and resumed.progress.step == 6 and resumed.progress.epoch == 3
    assert all(torch.equal(a, b) for a, b in zip(trained.distiller.state_dict().values(),
                                                 resumed.distiller.state_dict().values()))
    assert ("step_end", 1) not in fresh_recorder.heard   # nothing trained again


def test_a_failure_is_told_to_every_callback_and_raised():
    class Failing(Callback):
        def on_step_end(self, trainer):
            if trainer.progress.step == 2:
                raise RuntimeError("out of memory")

    before, after = Recorder(), Recorder()
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer(callbacks=[before, Failing(), after]).fit(distiller(), data())
    assert before.heard[-1] == after.heard[-1] == ("exception", "RuntimeError")
    assert ("fit_end",) not in before.heard


def test_a_run_stopped_mid_epoch_and_resumed_ends_as_the_one_never_stopped(tmp_path):
    """A signal (real, to this process) at step 5, in epoch 2 of 3: last.pt is saved at that step, the run
    stops; continued from last.pt it ends with the weights, progress and best of the uninterrupted run."""
    whole = trainer(epochs=3)
    whole.fit(distiller(), data())

    class Signal(Callback):
        def on_step_end(self, trainer):
            if trainer.progress.step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    with Signals() as signals:
        saving = Checkpointing(tmp_path, SavePolicy(epochs=3), signals, best_payload=lambda val: {})
        with pytest.raises(Interrupted) as stopped:
            trainer(callbacks=[Signal(), saving], epochs=3).fit(distiller(), data())
    assert stopped.value.signum == signal.SIGTERM and (stopped.value.epoch, stopped.value.step) == (2, 5)
    state = load_state(tmp_path / LAST)
    assert state["progress"]["step"] == 5 and state["progress"]["batch"] == 2
    resumed = trainer(epochs=3)
    resumed.fit(distiller(seed=7), data(), state)
    assert resumed.progress.step == whole.progress.step == 9
    assert resumed.progress.val == whole.progress.val
    assert all(torch.equal(a, b) for a, b in zip(whole.distiller.state_dict().values(),
                                                 resumed.distiller.state_dict().values()))


def test_save_every_epochs_saves_every_nth_epoch_the_last_and_on_a_signal(tmp_path):
    """trainer.save_every_epochs=3 over 7 epochs of 3 steps: last.pt after epochs 3, 6 and 7; with
    save_every_steps=2 every second step saves too, except at an epoch's end that saves anyway; a signal
    (real, to this process) saves at the next boundary whatever the policy, then stops the run."""
    def saved_at():
        if not (tmp_path / LAST).exists():
            return None
        progress = torch.load(tmp_path / LAST, weights_only=True)["progress"]
        return progress["epoch"], progress["step"]

    class Watch(Callback):
        def __init__(self, stop_at=None):
            self.saves, self.stop_at = [], stop_at

        def on_step_end(self, trainer):
            if trainer.progress.step == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

    def train(every_steps, stop_at=None):
        (tmp_path / LAST).unlink(missing_ok=True)
        seen = set()

        class After(Callback):
            def on_step_end(self, trainer):
                seen.add(saved_at())

            on_epoch_end = lambda self, trainer, epoch, val: seen.add(saved_at())  # noqa: E731

        with Signals() as signals:
            saving = Checkpointing(tmp_path, SavePolicy(every_steps, every_epochs=3, epochs=7), signals,
                                   best_payload=lambda val: {})
            # the watcher before the checkpoint (which saves and stops), the record after it
            callbacks = [Watch(stop_at), saving, After()]
            Trainer(LoopSpec(7, 4, 12), sgd(), torch.device("cpu"), callbacks=callbacks).fit(distiller(), data())
        return sorted(s for s in seen if s is not None)

    assert train(None) == [(4, 9), (7, 18), (8, 21)]
    # (step 12 ends epoch 4, which the epoch policy does not save: the step policy saves it, still in epoch 4)
    assert train(2) == [(1, 2), (2, 4), (2, 6), (3, 8), (4, 9), (4, 10), (4, 12), (5, 14), (6, 16), (7, 18),
                        (7, 20), (8, 21)]
    with pytest.raises(Interrupted) as stopped:
        train(None, stop_at=5)   # epoch 2's second step, which does not save by the policy
    assert stopped.value.signum == signal.SIGTERM and saved_at() == (2, 5)


def test_a_non_finite_total_stops_the_run_at_its_step_before_anything_is_saved_from_it(tmp_path):
    """The divergence is read at the logging cadence, but names the step where it appeared; last.pt, saved
    before every read, never holds weights from after it."""
    with Signals() as signals:
        saving = Checkpointing(tmp_path, SavePolicy(every_steps=4, epochs=5), signals, best_payload=lambda val: {})
        with pytest.raises(Diverged) as diverged:
            trainer(callbacks=[saving], epochs=5, log_every_steps=100, lr=1e30).fit(distiller(), data())
    assert math.isnan(diverged.value.value) or math.isinf(diverged.value.value)
    assert diverged.value.step == 2   # SGD at lr 1e30: the first step's update makes the second step's loss non-finite
    assert not (tmp_path / LAST).exists()   # the first save was due at step 4: refused, the total had diverged


def host_reads(monkeypatch) -> list[str]:
    """Each read of a tensor's value (item, tolist, numpy, bool/float/int of a tensor) made by jacdistill's
    own code (the caller's file under jacdistill_cli/), by where it was made."""
    import jacdistill_cli

    package = str(Path(jacdistill_cli.__file__).parent)
    reads: list[str] = []
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __original=original, __name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(package):
                reads.append(f"{__name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("log_every_steps", [1, 4])
def test_the_loop_reads_the_device_at_the_logging_cadence_only(monkeypatch, tmp_path, log_every_steps):
    """N steps and E epochs read tensor values at most ceil(N / log_every_steps) + c E times, c not growing with
    the batches per epoch; each save adds one read at most."""
    counts = {}
    for samples in (12, 48):   # 3 and 12 steps an epoch
        reads = host_reads(monkeypatch)
        with Signals() as signals:
            saving = Checkpointing(tmp_path, SavePolicy(epochs=2), signals, best_payload=lambda val: {})
            fitted = trainer(callbacks=[saving], epochs=2, log_every_steps=log_every_steps)
            fitted.fit(distiller(), data(samples))
        steps, epochs = fitted.progress.step, 2
        counts[samples] = len(reads)
        monkeypatch.undo()
        per_epoch = 3   # the epoch's last read, its evaluation's one read, the signal check under DDP: at most
        assert len(reads) <= math.ceil(steps / log_every_steps) + per_epoch * epochs + 2, reads
    if log_every_steps == 4:   # 4x the steps: the reads grow with the steps / log_every_steps alone
        assert counts[48] - counts[12] <= math.ceil(24 / 4) - math.floor(6 / 4) + 1
