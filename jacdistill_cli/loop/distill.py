"""A train run's work in one process, from its spec to its results:

    preflight(spec)          data built, both models tried on it, teacher.reuse_outputs decided: everything
                             that can refuse the run does so here, before its directory is claimed
    Distillation.run(claim)  the teacher obtained (loaded, cached, or trained and cached), the student built
                             after it from the seed, one Distiller (DDP around the student), the Trainer fitted
                             with this run's callbacks, the selected weights tested (and attacked, and their
                             explanations measured, when asked), the results written whole
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from jacdistill_cli.engine.batchnorm import refuse_unconverted
from jacdistill_cli.engine.objective import objective_from_settings
from jacdistill_cli.errors import UsageError
from jacdistill_cli.loop.callbacks import (
    Checkpointing,
    ProgressBar,
    Saliency,
    SavePolicy,
    TeacherLevel,
    TensorBoard,
    interactive,
)
from jacdistill_cli.loop.device import describe_device, seed_everything, select_device
from jacdistill_cli.loop.distiller import Distiller, reuse_decision
from jacdistill_cli.loop.distributed import World, all_gather, barrier, broadcast, joined
from jacdistill_cli.loop.evaluation import evaluate, reused_teacher_outputs
from jacdistill_cli.loop.faithful import faithfulness_image, faithfulness_metrics, faithfulness_scalars
from jacdistill_cli.loop.logger import run_logger
from jacdistill_cli.loop.precision import Precision
from jacdistill_cli.loop.robust import robust_metrics, robust_scalars
from jacdistill_cli.loop.saliency import fixed_inputs
from jacdistill_cli.loop.summary import summary_table
from jacdistill_cli.loop.teacher import TeacherJob, checked_teacher_checkpoint, obtain_teacher, try_teacher
from jacdistill_cli.loop.trainer import Trainer
from jacdistill_cli.records.directory import BEST, Claim, RunPlace
from jacdistill_cli.records.signals import Interrupted, Signals
from jacdistill_cli.records.state import load_best, load_state
from jacdistill_cli.records.status import FINISHED
from jacdistill_cli.spec.run import TrainSpec
from jacdistill_cli.storage import write_json, write_torch
from jacdistill_cli.zoo.checkpoints import make_checkpoint
from jacdistill_cli.zoo.data import DataBundle, build_data
from jacdistill_cli.zoo.models import build_model, count_parameters, describe_architecture
from jacdistill_cli.zoo.probe import probe

log = logging.getLogger("jacdistill")


@dataclass(frozen=True)
class Prepared:
    """What the preflight found: the data (on the CPU), the precision, whether teacher outputs are reused."""

    data: DataBundle
    precision: Precision
    reuse: bool
    teacher_payload: dict[str, Any] | None = None   # teacher.checkpoint's content, read and checked


def try_models(spec: TrainSpec, data: DataBundle) -> dict[str, Any] | None:
    """Every model setting checked before any work: teacher and student built on the `meta` device (no memory,
    no random numbers drawn) and tried on two samples of the data; a student BatchNorm whose per-sample Jacobian
    would be wrong refused; a teacher.checkpoint read and checked against the teacher's architecture (returned);
    feature matching's module paths resolved on them (a wrong path stops the run before a teacher is trained)."""
    features = spec.objective.features
    matching = features.name != "none"
    meta = torch.device("meta")
    with meta:
        student = build_model(spec.student.architecture, data.input_shape, data.num_classes, "student")
    probe(student, data.input_shape, data.num_classes, "student", spec.student.selection)
    if spec.objective.method.uses_gradients:
        refuse_unconverted(student, None, spec.objective.method.batchnorm)
    payload = checked_teacher_checkpoint(spec.teacher, data)
    if payload is not None and not matching:
        return payload   # the checkpoint's own architecture: checked as it was read
    teacher = try_teacher(spec.teacher, data)
    if matching:
        features.matching(teacher, student, data.input_shape, meta)
    return payload


def preflight(spec: TrainSpec, device: torch.device) -> Prepared:
    """Everything that can refuse the run, before anything is written: the data, the models tried on it,
    teacher.reuse_outputs (said in one line when it is off for a reason)."""
    seed_everything(spec.seed)
    precision = Precision(spec.loop.precision, device.type)
    data = build_data(OmegaConf.create(spec.data.node))
    payload = try_models(spec, data)
    reuse, reasons = reuse_decision(spec.objective, spec.reuse_outputs, data, precision)
    if reasons and spec.reuse_outputs == "auto":
        log.info(f"teacher.reuse_outputs=auto: the teacher's outputs are computed every step, not reused: "
                 f"{'; '.join(reasons)}")
    for warning in spec.warnings:
        log.warning(warning)
    for part, why in spec.objective.idle:
        log.info(f"{why}: {part}={spec.config[part].get('name', part)} is not computed")
    return Prepared(data, precision, reuse, payload)


class Distillation:
    """One process's part of a train run in its claimed directory (rank 0 writes it)."""

    def __init__(self, spec: TrainSpec, place: RunPlace, world: World, signals: Signals, device: torch.device,
                 prepared: Prepared):
        self.spec, self.place, self.world, self.signals, self.device = spec, place, world, signals, device
        self.precision, self.reuse, self.teacher_payload = prepared.precision, prepared.reuse, prepared.teacher_payload
        self.data = prepared.data.to(device)

    def run(self, claim: Claim) -> float:
        """Continued from last.pt when the claim says so; returns the validation accuracy (for sweepers)."""
        state = load_state(claim.resume) if claim.resume is not None else None
        step = None if state is None else int(state["progress"]["step"])
        with run_logger(self.place.run_dir, self.world.main, self.spec.hparams, step, claim.restart) as logger:
            job = TeacherJob(self.spec.teacher, self.spec.data, self.spec.seed, self.spec.loop.eval_batch_size,
                             self.spec.loop.num_workers)
            teacher, info = obtain_teacher(job, self.data, self.device, logger, self.world, self.place.run_dir,
                                           self.teacher_payload)
            distiller = self.distiller(teacher)
            history, best = self.fit(distiller, logger, info["teacher_test_accuracy"], state)
            metrics = self.tested(distiller, info, history, best)
            self.signals.hold()   # the results are written whole, whatever signal arrives now
            student, teacher_robust = robust_scalars(metrics)
            logger.scalars(teacher_robust, 0)   # the teacher's robust accuracy: a level line from the first step
            logger.scalars({"test/accuracy": metrics["test_accuracy"], "test/agreement": metrics["agreement"],
                            **{f"test/{k}": metrics[k] for k in ("jacobian_cosine", *EXPLANATION)},
                            **student, **teacher_robust, **faithfulness_scalars(metrics)}, metrics["steps"])
            if "faithfulness" in metrics:
                logger.image("explain/deletion_insertion", faithfulness_image(metrics["faithfulness"]),
                             metrics["steps"])
        self.write_results(distiller, metrics)
        if self.signals.pending is not None:
            raise Interrupted(self.signals.pending, finished=True)
        return metrics["val_accuracy"]

    def distiller(self, teacher: torch.nn.Module) -> Distiller:
        """The student built once (after the teacher, from the seed), the objective, one Distiller."""
        spec, data, device = self.spec, self.data, self.device
        seed_everything(spec.seed)
        student = build_model(spec.student.architecture, data.input_shape, data.num_classes, "student").to(device)
        log.info(f"student {describe_architecture(spec.student.architecture)}: {count_parameters(student)} "
                 f"parameters; teacher: {count_parameters(teacher)}")
        generator = torch.Generator(device=device).manual_seed(spec.seed)
        objective, matching = objective_from_settings(spec.objective, teacher, student, data.input_shape, device,
                                                      generator)
        if matching is not None:
            log.info(f"features={matching.method}: " + "; ".join(p.describe() for p in matching.pairs))
        distiller = Distiller(student, teacher, objective, matching).distribute(self.world, device,
                                                                                spec.loop.sync_batchnorm)
        if self.reuse:
            distiller.reuse(reused_teacher_outputs(objective, teacher, data.train, spec.loop.batch_size, device))
            log.info(f"teacher outputs computed once for the {len(data.train)} training samples and reused every "
                     "epoch (teacher.reuse_outputs)")
        return distiller

    def fit(self, distiller: Distiller, logger: Any, teacher_accuracy: float,
            state: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The Trainer with this run's callbacks, fitted: the last validation metrics and the loop's counts, and
        the best validation accuracy's epoch and step."""
        spec, place = self.spec, self.place
        policy = SavePolicy(spec.checkpoints.save_every_steps, spec.checkpoints.save_every_epochs, spec.loop.epochs)
        checkpointing = Checkpointing(place.run_dir, policy, self.signals, flush=logger.flush,
                                      best_payload=lambda val: self.payload(distiller, {f"val_{k}": v
                                                                                        for k, v in val.items()}))
        callbacks = [TensorBoard(logger, layout=True), TeacherLevel(logger, teacher_accuracy),
                     Saliency(logger, fixed_inputs(self.data.val, self.device), spec.loop.saliency),
                     *([ProgressBar()] if interactive() and self.world.main else []), checkpointing]
        trainer = Trainer(spec.loop, spec.optim, self.device, world=self.world, precision=self.precision,
                          callbacks=callbacks, seed=spec.seed)
        return trainer.fit(distiller, self.data, state), checkpointing.best

    def payload(self, distiller: Distiller, metrics: dict[str, Any]) -> dict[str, Any]:
        """student.pt's (and best.pt's) content: the student's checkpoint with the objective's own entries."""
        payload = make_checkpoint(distiller.student, "student", self.spec.student.architecture, self.data, metrics)
        return {**payload, **distiller.checkpoint_entries()}

    def tested(self, distiller: Distiller, info: dict[str, Any], history: dict[str, Any],
               best: dict[str, Any]) -> dict[str, Any]:
        """The test metrics of the selected weights (last, or best.pt's), then metrics.json's content."""
        spec, world = self.spec, self.world
        val = {k: history[k] for k in VAL_KEYS}
        if spec.checkpoints.select == "best":
            barrier(world)   # best.pt is written by rank 0
            payload = load_best(self.place.run_dir / BEST, distiller)
            val = {k: payload["metrics"][f"val_{k}"] for k in val}
        test = evaluate(distiller.student, distiller.teacher, self.data.test, spec.loop.eval_batch_size, self.device,
                        world)
        cached = Path(info["path"]) if info["source"] in ("cache", "trained") else None
        robust = robust_metrics(distiller.student, distiller.teacher, self.data, self.device, world, spec.robustness,
                                history["train_seconds"] / max(history["epochs"], 1),
                                cached if cached is not None and cached.parent != self.place.run_dir else None)
        faithful = faithfulness_metrics(distiller, self.data, self.device, world, spec.explain)
        return {
            "status": FINISHED, "selected": spec.checkpoints.select, "best_epoch": best["epoch"],
            "best_step": best["step"], "best_val_accuracy": best["val_accuracy"], "test_accuracy": test["accuracy"],
            **{k: test[k] for k in VAL_KEYS if k != "accuracy"}, **{f"val_{k}": v for k, v in val.items()},
            "teacher_test_accuracy": info["teacher_test_accuracy"],
            **{k: history[k] for k in ("train_seconds", "samples_per_second", "epochs", "steps")}, "seed": spec.seed,
            "device": describe_device(self.device), "torch": torch.__version__, "world_size": world.size,
            "precision": self.precision.name, "teacher_source": info["source"], "teacher_checkpoint": info["path"],
            "student_parameters": count_parameters(distiller.student),
            "teacher_parameters": count_parameters(distiller.teacher), **robust, **faithful}

    def write_results(self, distiller: Distiller, metrics: dict[str, Any]) -> None:
        """student.pt and metrics.json (rank 0), the run's lines and a single run's summary table."""
        if self.world.main:
            floats = {k: v for k, v in metrics.items() if isinstance(v, float)}
            write_torch(self.place.run_dir / "student.pt", self.payload(distiller, floats))
            write_json(self.place.run_dir / "metrics.json", metrics)
        log.info(f"test accuracy {metrics['test_accuracy']:.4f}  agreement {metrics['agreement']:.4f}  "
                 f"jacobian_cosine {metrics['jacobian_cosine']:.4f}  (teacher {metrics['teacher_test_accuracy']:.4f})"
                 + (f"  from the best epoch {metrics['best_epoch']}" if metrics["selected"] == "best" else ""))
        log.info(f"run directory: {self.place.run_dir}")
        if not self.place.multirun and self.world.main:
            print(summary_table(metrics, self.place.run_dir))


EXPLANATION = ("explanation_rank_correlation", "explanation_top10_iou")
VAL_KEYS = ("accuracy", "agreement", "jacobian_cosine", *EXPLANATION)


def shared_claim(claim: Claim | None, place: RunPlace, world: World) -> Claim:
    """Rank 0's claim of the run directory, on every rank (which must all have the same directory)."""
    if world.distributed and len(set(all_gather(str(place.run_dir), world))) > 1:
        raise UsageError("the ranks of this run have different run directories; under torchrun or srun give every "
                         "rank the same hydra.run.dir=...")
    claim = broadcast(claim, world)
    log.info(f"run directory: {place.run_dir}" + (f" ({world.size} processes)" if world.distributed else ""))
    return claim


def distilled(spec: TrainSpec, place: RunPlace, world: World, signals: Signals, claim: Claim | None,
              prepared: Prepared | None = None) -> float:
    """This process's part of the run in its process group (if any): on its device, with rank 0's claim,
    prepared here unless the preflight ran in this process already."""
    device = select_device(spec.loop.device, world.local_rank if world.distributed else None)
    if spec.loop.threads is not None:
        torch.set_num_threads(spec.loop.threads)  # small models: threads that wait on each other cost more
    # The process group is left on every way out (a rank that exits with gloo's still in place can abort).
    with joined(world, device.type):
        claim = shared_claim(claim, place, world)
        if claim.finished is not None:
            return float(claim.finished.get("val_accuracy", float("nan")))
        return Distillation(spec, place, world, signals, device, prepared or preflight(spec, device)).run(claim)
