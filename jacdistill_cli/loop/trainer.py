"""The training loop (`Trainer`): objective, backward, step, evaluate; the rest of a run is callbacks."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacdistill_cli.engine.jacobian import class_gradients
from jacdistill_cli.engine.objective import TeacherOutputs
from jacdistill_cli.loop.callbacks import Callback
from jacdistill_cli.loop.checkpointing import Progress
from jacdistill_cli.loop.distiller import Distiller
from jacdistill_cli.loop.distributed import SINGLE, World, reduce_sums, shard
from jacdistill_cli.loop.precision import Precision
from jacdistill_cli.zoo.data import DataBundle, batches

log = logging.getLogger("jacdistill")


def make_optimizer(params, optim: Any, epochs: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimiser of the typed `optim` settings (config/settings.py `OptimSettings`: its target called
    with the parameters), with a per-epoch cosine, constant or multi-step schedule."""
    optimizer = optim.build(params)
    if optim.schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    elif optim.schedule == "multistep":
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(optim.milestones),
                                                        gamma=optim.gamma)
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    return optimizer, schedule


@torch.no_grad()
def _predict(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs)


def evaluate(student: nn.Module, teacher: nn.Module | None, split, batch_size: int, device: torch.device,
             world: World = SINGLE) -> dict[str, float]:
    """accuracy; with a teacher also agreement (same argmax) and jacobian_cosine (mean cosine of the
    two networks' input-gradients of the teacher's top class), over the whole split (under
    torch.distributed each rank takes its shard of each batch, and the sums are reduced)."""
    was_training = student.training
    student.eval()
    totals = {"accuracy": 0.0, "agreement": 0.0, "jacobian_cosine": 0.0}
    count = 0
    for inputs, labels in batches(split, batch_size, False, None, device):
        inputs, labels = shard(inputs, labels, world=world)
        if not len(labels):
            continue
        if teacher is None:
            totals["accuracy"] += (_predict(student, inputs).argmax(1) == labels).sum().item()
        else:
            student_inputs = inputs.detach().requires_grad_(True)
            teacher_inputs = inputs.detach().requires_grad_(True)
            with torch.enable_grad():
                student_logits = student(student_inputs)
                teacher_logits = teacher(teacher_inputs)
                top = teacher_logits.argmax(1)
                student_grads = class_gradients(student_logits, student_inputs, top, create_graph=False)
                teacher_grads = class_gradients(teacher_logits, teacher_inputs, top, create_graph=False)
            predicted = student_logits.detach().argmax(1)
            totals["accuracy"] += (predicted == labels).sum().item()
            totals["agreement"] += (predicted == top).sum().item()
            totals["jacobian_cosine"] += F.cosine_similarity(
                student_grads.flatten(1), teacher_grads.flatten(1), dim=1, eps=1e-12).sum().item()
        count += len(labels)
    student.train(was_training)
    *sums, count = reduce_sums([*totals.values(), count], world, device)
    metrics = {k: v / max(count, 1) for k, v in zip(totals, sums)}
    if teacher is None:
        metrics = {"accuracy": metrics["accuracy"]}
    return metrics


def reused_teacher_outputs(objective: Any, teacher: nn.Module, split: Any, batch_size: int,
                           device: torch.device) -> TeacherOutputs:
    """The teacher's side of a step (`Objective.teacher_outputs`) for every sample of a split held in
    memory, in the split's order, computed batch by batch as a step computes it."""
    parts = [objective.teacher_outputs(teacher, inputs, labels)
             for inputs, labels in batches(split, batch_size, False, None, device)]
    gradients = None if parts[0].gradients is None else torch.cat([p.gradients for p in parts], dim=1)
    return TeacherOutputs(torch.cat([p.logits for p in parts]), gradients)


@dataclass(frozen=True)
class LoopSettings:
    """The loop's own settings (the trainer group's, or a teacher's): epochs, batch sizes, evaluation."""

    epochs: int
    batch_size: int
    eval_batch_size: int
    eval_every: int = 1
    num_workers: int = 0


class Trainer:
    """The loop: steps, epochs, evaluation, precision and the process group; everything else a run does
    around it (checkpoints, signals, divergence, TensorBoard, saliency, the progress bar) is a callback
    (run/callbacks.py).

    `fit(distiller, data, generator)` trains the distiller (run/distiller.py) on data.train and returns the
    last validation metrics with steps, epochs, train_seconds and samples_per_second. `generator` draws
    the batch order and augmentation: the one stream a resumed epoch replays (the batches before the saved
    position are drawn again, not trained on). Under torch.distributed (`world`) each rank steps on its
    shard of every batch and the logged terms are those of the global batch; `precision` runs the
    objective under autocast (and a GradScaler for float16)."""

    def __init__(self, loop: LoopSettings, optim: Any, device: torch.device, *, world: World = SINGLE,
                 precision: Precision | None = None, callbacks: Iterable[Callback] = (), prefix: str = ""):
        self.loop, self.optim, self.device, self.world = loop, optim, device, world
        self.precision = precision or Precision("32", device.type)
        self.callbacks = list(callbacks)
        self.prefix = prefix   # of the epoch log lines ("teacher/" while a teacher trains)
        self.scaler = self.precision.scaler()
        self.progress = Progress()

    def emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def fit(self, distiller: Distiller, data: DataBundle, generator: torch.Generator) -> dict[str, float]:
        self.distiller, self.data, self.generator = distiller, data, generator
        self.optimizer, self.schedule = make_optimizer(list(distiller.parameters()), self.optim, self.loop.epochs)
        self.batches_per_epoch = max(1, math.ceil(len(data.train) / self.loop.batch_size))
        with contextlib.ExitStack() as stack:
            for callback in self.callbacks:
                stack.enter_context(callback.fitting(self))
            self.emit("on_fit_start")
            for epoch in range(self.progress.epoch, self.loop.epochs + 1):
                self.train_epoch(epoch)
                self.end_epoch(epoch)
            self.emit("on_fit_end")
        at = self.progress
        return {**at.val, "steps": at.step, "epochs": self.loop.epochs, "train_seconds": at.train_seconds,
                "samples_per_second": at.samples / max(at.train_seconds, 1e-9)}

    def train_epoch(self, epoch: int) -> None:
        at = self.progress
        self.distiller.train()
        started = time.perf_counter()
        skip = at.batch
        if skip and at.epoch_start_generator is not None:
            self.generator.set_state(at.epoch_start_generator)  # replays the epoch's order up to the position
        else:
            at.running = {}
        at.epoch_start_generator = self.generator.get_state()
        self.emit("on_epoch_start", epoch)
        for index, (inputs, labels, *samples) in enumerate(batches(
                self.data.train, self.loop.batch_size, True, self.generator, self.device, self.loop.num_workers,
                indices=self.distiller.reads_indices)):
            if index < skip:
                continue
            values, global_size = self.step(inputs, labels, samples)
            at.step, at.batch, at.samples = at.step + 1, index + 1, at.samples + global_size
            for name, v in values.items():
                at.running[name] = at.running.get(name, 0.0) + v
            at.train_seconds += time.perf_counter() - started
            self.emit("on_step_end", values)
            started = time.perf_counter()
        self.emit("on_train_epoch_end", epoch)
        self.schedule.step()
        at.train_seconds += time.perf_counter() - started

    def step(self, inputs: Tensor, labels: Tensor, samples: list[Tensor]) -> tuple[dict[str, float], int]:
        """One optimiser step on this rank's shard of the batch: (the global batch's terms, its size)."""
        global_size = len(labels)
        inputs, labels, *samples = shard(inputs, labels, *samples, world=self.world)
        options: dict[str, Any] = {"epoch": self.progress.epoch}   # a loss with a warm-up reads it (DKD)
        if self.scaler.is_enabled():
            options["gradient_scale"] = self.scaler.get_scale()
        with self.precision.autocast():
            _, terms = self.distiller(inputs, labels, samples[0] if samples else None, **options)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients: weighting by the shard's share makes it the global batch's.
        share = len(labels) / global_size
        total = terms["total"] * (share * self.world.size) if self.world.distributed else terms["total"]
        self.scaler.scale(total).backward()
        self.distiller.after_backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        names = list(terms)
        return dict(zip(names, reduce_sums([terms[n].item() * share for n in names], self.world, self.device))), \
            global_size

    def end_epoch(self, epoch: int) -> None:
        """Evaluate when due (every `eval_every` epochs and after the last), log the epoch's line, count it."""
        at = self.progress
        summary = "  ".join(f"{name} {v / self.batches_per_epoch:.4f}" for name, v in at.running.items())
        val = None
        if epoch % self.loop.eval_every == 0 or epoch == self.loop.epochs:
            val = at.val = evaluate(self.distiller.student, self.distiller.teacher, self.data.val,
                                    self.loop.eval_batch_size, self.device, self.world)
            self.emit("on_evaluation_end", val)
            summary += "  " + "  ".join(f"val_{name} {v:.4f}" for name, v in val.items())
        log.info(f"{self.prefix}epoch {epoch}/{self.loop.epochs}  {summary}")
        at.epoch, at.batch = epoch + 1, 0
        at.epoch_start_generator = self.generator.get_state()
        self.emit("on_epoch_end", epoch, val)
