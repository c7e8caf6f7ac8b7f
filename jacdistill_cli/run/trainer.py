"""The training loop: objective, backward, step, evaluate. Reads top to bottom."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from jacdistill_cli.zoo.data import DataBundle, batches
from jacdistill_cli.engine.jacobian import class_gradients
from jacdistill_cli.engine.objective import TeacherOutputs
from jacdistill_cli.run.distributed import (SINGLE, World, average_gradients, broadcast_parameters, reduce_sums,
                                            shard)
from jacdistill_cli.run.logger import RunLogger
from jacdistill_cli.run.precision import Precision
from jacdistill_cli.run.resume import Checkpointer, Progress
from jacdistill_cli.run.saliency import saliency_image

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


# The progress bar: "epoch 3/20  45%|████     | 8/17 00:01, total 0.8490  distill 0.0230  jacobian 1.0556",
# the loss terms' running means shortened (names, then digits) until the line fits the terminal.
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {remaining}{postfix}"
SHORT_NAMES = {"total": "tot", "distill": "dist", "jacobian": "jac", "features": "feat"}
MIN_BAR = 5  # characters of the bar itself that the line keeps


def progress_postfix(means: dict[str, float], room: int) -> str:
    """The running means as `total 0.8490  distill 0.0230 ...` (total first), shortened to fit in `room`
    characters: full names with 4 decimals, short names (tot, dist, jac, feat), then 3 and 2 decimals."""
    ordered = sorted(means.items(), key=lambda item: item[0] != "total")
    text = ""
    for short, digits in ((False, 4), (True, 4), (True, 3), (True, 2)):
        text = "  ".join(f"{SHORT_NAMES.get(n, n) if short else n} {v:.{digits}f}" for n, v in ordered)
        if len(text) <= room:
            break
    return text


def progress_room(desc: str, total: int, file=None) -> int:
    """Characters left for the loss terms on a BAR_FORMAT line as wide as the terminal of `file` (default
    stderr; COLUMNS or 80 when it is none), less what tqdm puts before them (`, `) and the last column,
    which tqdm keeps free. The rest of a line too long for the terminal is cut by tqdm: it never wraps."""
    import os
    import shutil

    try:
        columns = os.get_terminal_size((file or sys.stderr).fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = shutil.get_terminal_size((80, 24)).columns
    return columns - 1 - len(f"{desc} 100%|{' ' * MIN_BAR}| {total}/{total} 00:00, ")


def interactive() -> bool:
    """Progress bars only when a person watches: stderr is a terminal."""
    return sys.stderr.isatty()


def fit(student: nn.Module, teacher: nn.Module | None, objective: Callable, data: DataBundle, *, epochs: int,
        batch_size: int, eval_batch_size: int, optim: Any, device: torch.device, logger: RunLogger,
        generator: torch.Generator, num_workers: int = 0, prefix: str = "",
        eval_every: int = 1, saliency_inputs: torch.Tensor | None = None, saliency: str = "abs",
        progress: bool | None = None,
        objective_parameters: Iterable[nn.Parameter] = (), checkpoint: Checkpointer | None = None,
        world: World = SINGLE, precision: Precision | None = None,
        reused: TeacherOutputs | None = None) -> dict[str, float]:
    """Train `student` on data.train; log every loss term per step under `prefix`, and every
    `eval_every` epochs (and after the last) the val metrics and, with a teacher, the saliency maps of
    `saliency_inputs` [n, *input] (maps drawn as `saliency`: abs or signed). A progress bar with the
    running loss terms shows each epoch when `progress` (default: stderr is a terminal). Returns the last
    val metrics with steps, epochs, train_seconds, samples_per_second.

    With a `checkpoint`, training continues from its last.pt (if it has one), saves last.pt every
    epoch (and every `every_steps` steps) and stops at the next step boundary when a signal arrives.
    `generator` (the batch order and augmentation) is the one stream a resumed epoch replays: the
    batches before the saved position are drawn again, not trained on.

    Under torch.distributed (`world`) `student` is the DDP-wrapped model, each rank steps on its shard of
    every batch and the logged terms are those of the global batch; `precision` runs the objective
    under autocast (and a GradScaler for float16). `reused`: the teacher's outputs for every training
    sample (`reused_teacher_outputs`), which then stand in for its passes."""
    from tqdm import tqdm

    progress = (interactive() if progress is None else progress) and world.main
    precision = precision or Precision("32", device.type)
    scaler = precision.scaler()
    evaluated = student.module if world.distributed else student
    # The objective's own parameters (a hint regressor) are optimised with the student's.
    objective_parameters = list(objective_parameters)
    broadcast_parameters(objective_parameters, world)
    optimizer, schedule = make_optimizer([*student.parameters(), *objective_parameters], optim, epochs)
    batches_per_epoch = max(1, math.ceil(len(data.train) / batch_size))
    at = checkpoint.restore(evaluated, optimizer, schedule) if checkpoint is not None else Progress()
    deferring = checkpoint.signals.deferring() if checkpoint is not None else contextlib.nullcontext()
    with deferring:
        for epoch in range(at.epoch, epochs + 1):
            student.train()
            started = time.perf_counter()
            skip = at.batch if epoch == at.epoch else 0
            if skip and at.epoch_start_generator is not None:
                generator.set_state(at.epoch_start_generator)  # replays the epoch's order up to the position
            else:
                at.running = {}
            at.epoch_start_generator = generator.get_state()
            desc = f"{prefix}epoch {epoch}/{epochs}"
            bar = tqdm(total=batches_per_epoch, initial=skip, desc=desc, leave=False, disable=not progress,
                       file=sys.stderr, dynamic_ncols=True, bar_format=BAR_FORMAT)
            for index, (inputs, labels, *samples) in enumerate(batches(
                    data.train, batch_size, True, generator, device, num_workers, indices=reused is not None)):
                if index < skip:
                    continue
                global_size = len(labels)
                inputs, labels, *samples = shard(inputs, labels, *samples, world=world)
                extra = {"gradient_scale": scaler.get_scale()} if scaler.is_enabled() else {}
                if reused is not None:
                    extra["teacher_outputs"] = reused.take(samples[0])
                with precision.autocast():
                    _, terms = objective(student, teacher, inputs, labels, **extra)
                optimizer.zero_grad(set_to_none=True)
                # DDP averages the ranks' gradients: weighting by the shard's share makes it the global batch's.
                share = len(labels) / global_size
                total = terms["total"] * (share * world.size) if world.distributed else terms["total"]
                scaler.scale(total).backward()
                average_gradients(objective_parameters, world)
                scaler.step(optimizer)
                scaler.update()
                at.step += 1
                at.batch = index + 1
                at.samples += global_size
                names = list(terms)
                values = dict(zip(names, reduce_sums([terms[n].item() * share for n in names], world, device)))
                if not math.isfinite(values["total"]) and not scaler.is_enabled():  # float16: the scaler skips it
                    raise FloatingPointError(f"loss/total is {values['total']} at step {at.step}: training diverged")
                logger.scalars({f"{prefix}loss/{name}": v for name, v in values.items()}, at.step)
                for name, v in values.items():
                    at.running[name] = at.running.get(name, 0.0) + v
                if progress:
                    bar.update()
                    bar.set_postfix_str(progress_postfix({name: v / bar.n for name, v in at.running.items()},
                                                         progress_room(desc, batches_per_epoch)), refresh=False)
                if checkpoint is not None:
                    at.train_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    checkpoint.after_step(evaluated, optimizer, schedule, end_of_epoch=at.batch == batches_per_epoch)
            bar.refresh()  # the epoch's final counts and running means, however fast it ran
            bar.close()
            schedule.step()
            at.train_seconds += time.perf_counter() - started
            summary = "  ".join(f"{name} {v / batches_per_epoch:.4f}" for name, v in at.running.items())
            val = None
            if epoch % eval_every == 0 or epoch == epochs:
                val = at.val = evaluate(evaluated, teacher, data.val, eval_batch_size, device, world)
                logger.scalars({f"{prefix}val/{name}": v for name, v in val.items()}, at.step)
                if world.main and teacher is not None and saliency_inputs is not None:
                    logger.image(f"{prefix}saliency/input_teacher_student",
                                 saliency_image(evaluated, teacher, saliency_inputs, saliency), at.step)
                summary += "  " + "  ".join(f"val_{name} {v:.4f}" for name, v in val.items())
            log.info(f"{prefix}epoch {epoch}/{epochs}  {summary}")
            at.epoch, at.batch = epoch + 1, 0
            at.epoch_start_generator = generator.get_state()
            if checkpoint is not None:
                checkpoint.after_epoch(evaluated, optimizer, schedule, val)
    return {**at.val, "steps": at.step, "epochs": epochs, "train_seconds": at.train_seconds,
            "samples_per_second": at.samples / max(at.train_seconds, 1e-9)}
