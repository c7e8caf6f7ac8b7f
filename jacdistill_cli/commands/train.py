"""`jacdistill train`: distil a student from a teacher, logging every loss term to TensorBoard."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.commands.records import hparams_of, single_run, summary_table
from jacdistill_cli.config.entry import one_line_errors
from jacdistill_cli.config.resolvers import register_resolvers
from jacdistill_cli.errors import UsageError, setting_error
from jacdistill_cli.storage import write_json

register_resolvers()


@one_line_errors("train")
def run(cfg: DictConfig) -> float:
    """Returns the final validation accuracy, so Hydra sweepers can optimise it. With
    `trainer.devices=N > 1` (and no torchrun/srun around it) it starts N workers and waits for them."""
    import contextlib

    from jacdistill_cli.loop import distributed
    from jacdistill_cli.loop.callbacks import Diverged
    from jacdistill_cli.records import directory, resume
    from jacdistill_cli.records.directory import run_directory
    from jacdistill_cli.records.signals import Interrupted, Signals

    validated = validate(cfg)  # before any work: nothing is written for a bad value
    run_dir = run_directory()
    world = distributed.world_from_environment()
    command = resume.resume_command(run_dir)
    lock = directory.DirectoryLock(run_dir) if world.main else contextlib.nullcontext()
    with lock, Signals() as signals:
        try:
            claim = claimed(cfg, run_dir) if world.main else None   # another config's results: refused here
            if claim is not None and claim.finished is not None and not world.distributed:
                # (under torchrun or srun every rank learns it from rank 0 in train(), and all return there)
                return float(claim.finished.get("val_accuracy", float("nan")))
            if cfg.trainer.devices > 1 and not world.distributed:
                return launched(cfg, run_dir, claim, command)
            return train(cfg, run_dir, world, signals, claim, validated)
        except Interrupted as stop:
            stopped(cfg, run_dir, stop, command)
        except Diverged as err:
            return diverged(err)


def diverged(err: Exception) -> float:
    """A diverged run ends in one line, exit status 1. A job of a sweep ends alone: the other jobs go on,
    the report lists it as diverged and the sweep exits with status 1 (run/sweep.py)."""
    import sys

    if distributed_rank() == 0:
        print(f"jacdistill train: error: {err}", file=sys.stderr)
    if multirun_job():
        return float("nan")
    raise SystemExit(1) from None


def multirun_job() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def distributed_rank() -> int:
    import os

    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def claimed(cfg: DictConfig, run_dir: Path):
    """The run directory claimed for this configuration (directory.Claim), its records written: skipped
    when this configuration finished there, cleared when started over."""
    import logging

    from jacdistill_cli.commands.startup import save_hydra_files, save_resolved_config
    from jacdistill_cli.loop import checkpointing
    from jacdistill_cli.records import directory

    log = logging.getLogger("jacdistill")
    claim = directory.claim_directory(OmegaConf.to_container(cfg, resolve=True), run_dir)
    if claim.finished is not None:
        log.info(f"this configuration finished in {run_dir} already (trainer.resume=auto): nothing to do")
        return claim
    directory.remove_stale_temporaries(run_dir)
    if claim.restart:
        for name in (directory.LAST, checkpointing.BEST, "metrics.json"):
            (run_dir / name).unlink(missing_ok=True)
    save_hydra_files(cfg, run_dir)
    save_resolved_config(cfg, run_dir)
    return claim


def launched(cfg: DictConfig, run_dir: Path, claim: Any, command: str) -> float:
    """`trainer.devices=N`: N workers through torch's elastic launcher; this process holds the run
    directory's lock and waits. A worker's one-line error or interruption is this command's."""
    import json
    import time

    from hydra.core.hydra_config import HydraConfig
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from jacdistill_cli.loop import distributed
    from jacdistill_cli.records import status
    from jacdistill_cli.records.signals import Interrupted

    # Hydra's own config (the groups chosen, the run mode) goes along: the workers' HPARAMS name the recipe
    # and preset as a one-process run's do, and rank 0 ends a single run with its summary table.
    hydra_cfg = HydraConfig.instance().cfg if HydraConfig.initialized() else None
    started = time.time_ns()

    def interrupted_now() -> bool:
        """Whether rank 0 recorded an interruption of this launch (and said how to resume)."""
        metrics = run_dir / "metrics.json"
        return (metrics.is_file() and metrics.stat().st_mtime_ns >= started
                and json.loads(metrics.read_text()).get("status") == status.INTERRUPTED)

    try:
        # SIGINT and SIGTERM reach the workers through torch's agent, SIGUSR1 (SLURM's warning before a time
        # limit) is forwarded: rank 0 saves at the next step, as one process does, and requeues under SLURM.
        result = distributed.launch(worker, (OmegaConf.to_yaml(cfg, resolve=True), str(run_dir), claim, command,
                                             hydra_cfg), cfg.trainer.devices, forward=FORWARDED)
    except SignalException as err:   # the agent stopped the workers with the signal this process got
        if not interrupted_now():   # stopped before training began: this process says so
            stopped(cfg, run_dir, Interrupted(int(err.sigval)), command)
        raise SystemExit(128 + int(err.sigval)) from None
    except ChildFailedError as err:
        if interrupted_now():
            codes = [f.exitcode for f in err.failures.values() if f.exitcode and f.exitcode > 128]
            raise SystemExit(codes[0] if codes else 1) from None   # rank 0 said how to resume
        raise UsageError(f"trainer.devices={cfg.trainer.devices}: a worker failed: {worker_failure(err)}") from None
    if isinstance(result, WorkerStopped):
        raise SystemExit(128 + result.signum)
    if isinstance(result, WorkerDiverged):
        return diverged(FloatingPointError(result.message))
    return result


# The signals the launching process of trainer.devices=N passes on to its workers itself; torch's agent
# stops them with the others it gets (SIGINT, SIGTERM, SIGHUP, SIGQUIT).
FORWARDED = (signal.SIGUSR1,)


@dataclass(frozen=True)
class WorkerStopped:
    """What a worker of `trainer.devices=N` returns when a signal stopped it (rank 0 has recorded it)."""

    signum: int


@dataclass(frozen=True)
class WorkerDiverged:
    """What a worker returns when the run diverged (every rank stops at the same step; rank 0 recorded it)."""

    message: str


def worker(cfg_yaml: str, run_dir: str, claim: Any, command: str,
           hydra_cfg: DictConfig | None = None) -> float | WorkerStopped | WorkerDiverged:
    """One process of `trainer.devices=N`, started by torch's elastic launcher (RANK, WORLD_SIZE, ... set)."""
    import contextlib
    import logging
    import sys

    from hydra.core.hydra_config import HydraConfig

    if hydra_cfg is not None:
        HydraConfig.instance().set_config(hydra_cfg)
    from jacdistill_cli.errors import UsageError as Usage
    from jacdistill_cli.loop import distributed
    from jacdistill_cli.loop.callbacks import Diverged
    from jacdistill_cli.records.signals import Interrupted, Signals

    world = distributed.world_from_environment()
    logging.basicConfig(level=logging.INFO if world.main else logging.WARNING,
                        format=f"[%(asctime)s][rank {world.rank}][%(levelname)s] - %(message)s")
    cfg = OmegaConf.create(cfg_yaml)
    with Signals() as signals:
        try:
            return train(cfg, Path(run_dir), world, signals, claim)
        except Interrupted as stop:
            if world.main:
                with contextlib.suppress(SystemExit):   # the launching process exits with the status
                    stopped(cfg, Path(run_dir), stop, command)
            if stop.signum in FORWARDED:
                # Passed on by the launching process, whose agent is waiting for the workers' results (and takes a
                # non-zero exit for a failure, which it reports at length).
                return WorkerStopped(int(stop.signum))
            raise SystemExit(128 + int(stop.signum)) from None   # the agent is stopping the workers: it waits for exits
        except Diverged as err:
            return WorkerDiverged(str(err))
        except Usage as err:
            print(f"jacdistill train: error: {err}", file=sys.stderr)
            raise


def worker_failure(err: Exception) -> str:
    """The first failed worker's error, in one line."""
    for failure in getattr(err, "failures", {}).values():
        message = failure.message if isinstance(failure.message, str) else str(failure.message)
        return (message.strip().splitlines() or ["unknown error"])[-1][:300]
    return str(err).strip().splitlines()[0]


@dataclass
class Session:
    """One process's part of a train run: its settings (checked once) and what it builds, in order."""

    cfg: DictConfig
    run_dir: Path
    world: Any                  # run/distributed.py World
    signals: Any                # run/resume.py Signals
    objective: Any              # config/settings.py ObjectiveSettings
    optim: Any                  # config/settings.py OptimSettings
    device: Any = None
    precision: Any = None
    data: Any = None
    reuse: bool = False         # teacher.reuse_outputs, decided before any training
    state: Any = None           # last.pt's content when the run continues
    logger: Any = None
    batches: Any = None         # the generator of the batch order and augmentation


def validate(cfg: DictConfig) -> tuple[Any, Any]:
    """Every setting of a train run (robustness and teacher.training too), checked before any work: (objective
    settings, optimiser settings)."""
    from jacdistill_cli.config import settings
    from jacdistill_cli.loop.saliency import SALIENCY_MODES
    from jacdistill_cli.records import directory
    from jacdistill_cli.robustness.settings import teacher_training

    if OmegaConf.select(cfg, "trainer.saliency", default="abs") not in SALIENCY_MODES:
        raise setting_error("trainer.saliency", cfg.trainer.saliency, f"it must be one of {', '.join(SALIENCY_MODES)}")
    validated = settings.validate_train(cfg)
    robustness(cfg)
    teacher_training(cfg.teacher)
    settings.choice(cfg, "trainer.resume", directory.RESUME_MODES)
    settings.choice(cfg, "trainer.select", directory.SELECT_MODES)
    if OmegaConf.select(cfg, "trainer.save_every_steps", default=None) is not None:
        settings.integer(cfg, "trainer.save_every_steps", allowed="it must be null (every epoch only) or an integer >= 1")
    if "save_every_epochs" in cfg.trainer:   # a trainer config of one's own without it saves every epoch
        settings.integer(cfg, "trainer.save_every_epochs", allowed="it must be an integer >= 1 (the last epoch saves "
                         "in any case)")
    return validated


def robustness(cfg: DictConfig) -> Any:
    """The `robustness` node, typed (robustness/settings.py RobustnessSettings; no attacks for none)."""
    from jacdistill_cli.robustness.settings import robustness_settings

    return robustness_settings(cfg.get("robustness"), seed=cfg.seed)


def train(cfg: DictConfig, run_dir: Path, world: Any, signals: Any, claim: Any,
          validated: tuple[Any, Any] | None = None) -> float:
    """The run in its directory: skipped when this configuration finished there, continued from
    last.pt when it was interrupted, otherwise from the start. Under torch.distributed, this rank's
    part of it: rank 0 claims and writes the directory, every rank continues from the same last.pt."""
    import torch

    from jacdistill_cli.commands.startup import start
    from jacdistill_cli.loop import distributed

    # (objective, optimiser) settings: checked by run() in this process, or here in a worker of trainer.devices=N
    objective, optim = validated or validate(cfg)
    session = Session(cfg, run_dir, world, signals, objective, optim)
    # (the resolved config is written once the directory is claimed)
    local_rank = world.local_rank if world.distributed else None
    session.device = start(cfg, write_config=False, local_rank=local_rank, run_dir=run_dir).device
    if OmegaConf.select(cfg, "trainer.threads", default=None) is not None:
        torch.set_num_threads(cfg.trainer.threads)  # small models: threads that wait on each other cost more
    # The process group is left on every way out (a rank that exits with gloo's still in place can abort).
    with distributed.joined(world, session.device.type):
        return train_in_group(session, claim)


def train_in_group(session: Session, claim: Any) -> float:
    """train() in its process group (if any): prepare, obtain the teacher, fit, test, write."""
    import logging

    from jacdistill_cli.loop.callbacks import Diverged
    from jacdistill_cli.records.signals import Interrupted
    from jacdistill_cli.records.state import load_state

    log = logging.getLogger("jacdistill")
    claim = shared_claim(session, claim)
    if claim.finished is not None:
        return float(claim.finished.get("val_accuracy", float("nan")))
    prepare(session)
    session.state = load_state(claim.resume) if claim.resume is not None else None
    session.logger = open_logger(session, claim)
    checkpointer = None
    try:
        distiller, teacher_info = build_distiller(session)
        checkpointer = make_checkpointer(session, distiller)
        history = fitted(session, distiller, checkpointer, teacher_info["teacher_test_accuracy"])
        metrics = tested(session, distiller, teacher_info, history, checkpointer)
    except Interrupted as stop:
        close_logger(session, False)
        if stop.progress is None and checkpointer is not None:
            stop.progress = checkpointer.progress
        raise
    except Diverged as err:
        close_logger(session, False)
        if session.world.main:
            write_json(session.run_dir / "metrics.json", {"status": DIVERGED, "step": err.step, "epoch": err.epoch,
                                                          "loss_total": str(err.value), "error": str(err)})
        log.error(f"failed: {err}")
        raise
    except Exception as err:
        # In the run's train.log, where `jacdistill report` finds why a job of a sweep has no metrics.
        log.error(f"failed: {type(err).__name__}: {err}")
        close_logger(session, False)
        raise
    return finished(session, distiller, metrics)


DIVERGED = "diverged"


def shared_claim(session: Session, claim: Any) -> Any:
    """Rank 0's claim of the run directory, on every rank (which must all have the same directory)."""
    import logging

    from jacdistill_cli.loop import distributed

    world, run_dir = session.world, session.run_dir
    if world.distributed and len(set(distributed.all_gather(str(run_dir), world))) > 1:
        raise UsageError("the ranks of this run have different run directories; under torchrun or srun give every "
                         "rank the same hydra.run.dir=...")
    claim = distributed.broadcast(claim, world)
    logging.getLogger("jacdistill").info(f"run directory: {run_dir}" +
                                         (f" ({world.size} processes)" if world.distributed else ""))
    return claim


def prepare(session: Session) -> None:
    """Seed, precision, data; every model setting and teacher.reuse_outputs decided before any training."""
    from jacdistill_cli.commands.startup import check_models, data
    from jacdistill_cli.config.settings import precision
    from jacdistill_cli.loop.device import seed_everything
    from jacdistill_cli.loop.precision import Precision

    cfg = session.cfg
    seed_everything(cfg.seed)
    session.precision = Precision(precision(cfg), session.device.type)
    session.data = data(cfg.dataset, session.device)
    check_models(cfg, session.data, session.objective)
    session.reuse = reuse_teacher_outputs(cfg, session.objective, session.data, session.precision)


def open_logger(session: Session, claim: Any) -> Any:
    """Rank 0's TensorBoard writer in the run directory (the others log nothing). Continued: earlier files'
    events after the saved step are dropped; started over: all of them."""
    from jacdistill_cli.loop.logger import NullLogger, RunLogger
    from jacdistill_cli.records import resume

    if not session.world.main:
        return NullLogger()
    step = None if session.state is None else int(session.state["progress"]["step"])
    if step is not None or claim.restart:
        resume.drop_session_end(session.run_dir)  # the interrupted session's end; this one ends it again
    logger = RunLogger(session.run_dir, purge_step=step + 1 if step is not None else 0 if claim.restart else None)
    if step is None:
        logger.hparams_start(hparams_of(session.cfg))  # its metrics: the final test/..., val/... scalars
    else:
        logger.hparams_continue()
    return logger


def close_logger(session: Session, succeeded: bool) -> None:
    session.logger.hparams_end(succeeded)
    session.logger.close()


def build_distiller(session: Session) -> tuple[Any, dict[str, Any]]:
    """The teacher obtained once, the student built once (after the teacher, from the seed), the objective,
    all in one Distiller; DDP around the student under torch.distributed."""
    import logging

    import torch

    from jacdistill_cli.commands.startup import teacher_settings
    from jacdistill_cli.engine.objective import objective_from_settings
    from jacdistill_cli.loop.device import seed_everything
    from jacdistill_cli.loop.distiller import Distiller
    from jacdistill_cli.loop.teacher import obtain_teacher
    from jacdistill_cli.loop.trainer import reused_teacher_outputs
    from jacdistill_cli.zoo.models import architecture, build_model, count_parameters, describe_architecture

    log = logging.getLogger("jacdistill")
    cfg, data, device = session.cfg, session.data, session.device
    teacher, info = obtain_teacher(teacher_settings(cfg), data, device, session.logger, session.world,
                                   session.run_dir)
    seed_everything(cfg.seed)
    spec = architecture(cfg.student)
    student = build_model(spec, data.input_shape, data.num_classes, "student").to(device)
    log.info(f"student {describe_architecture(spec)}: {count_parameters(student)} parameters; "
             f"teacher: {count_parameters(teacher)}")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    objective, matching = objective_from_settings(session.objective, teacher, student, data.input_shape, device,
                                                  generator)
    if matching is not None:
        log.info(f"features={matching.method}: " + "; ".join(p.describe() for p in matching.pairs))
    distiller = Distiller(student, teacher, objective, matching).distribute(session.world, device,
                                                                            cfg.trainer.sync_batchnorm)
    if session.reuse:
        distiller.reuse(reused_teacher_outputs(objective, teacher, data.train, cfg.trainer.batch_size, device))
        log.info(f"teacher outputs computed once for the {len(data.train)} training samples and reused every "
                 "epoch (teacher.reuse_outputs)")
    return distiller, info


def student_payload(session: Session, distiller: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """student.pt's (and best.pt's) content: the student's checkpoint with the objective's own entries."""
    from jacdistill_cli.zoo.checkpoints import make_checkpoint
    from jacdistill_cli.zoo.models import architecture

    payload = make_checkpoint(distiller.student, "student", architecture(session.cfg.student), session.data, metrics)
    return {**payload, **distiller.checkpoint_entries()}


def make_checkpointer(session: Session, distiller: Any) -> Any:
    import torch

    from jacdistill_cli.loop import checkpointing

    trainer = session.cfg.trainer
    policy = checkpointing.SavePolicy(OmegaConf.select(trainer, "save_every_steps", default=None),
                               OmegaConf.select(trainer, "save_every_epochs", default=1), trainer.epochs)
    session.batches = torch.Generator().manual_seed(session.cfg.seed)
    generators = {"batches": session.batches, "objective": distiller.objective.generator}
    return checkpointing.Checkpointer(
        session.run_dir, policy, session.signals, generators=generators, state=session.state,
        best_payload=lambda val: student_payload(session, distiller, {f"val_{k}": v for k, v in val.items()}),
        world=session.world, device=session.device)


def fitted(session: Session, distiller: Any, checkpointer: Any, teacher_accuracy: float) -> dict[str, Any]:
    """The Trainer with this run's callbacks, fitted: the last validation metrics and the loop's counts."""
    from jacdistill_cli.commands.startup import loop_settings
    from jacdistill_cli.loop.callbacks import (
        Checkpointing,
        Divergence,
        ProgressBar,
        Saliency,
        TeacherLevel,
        TensorBoard,
        interactive,
    )
    from jacdistill_cli.loop.saliency import fixed_inputs
    from jacdistill_cli.loop.trainer import Trainer

    logger = session.logger
    callbacks = [Divergence(), TensorBoard(logger, layout=True),
                 TeacherLevel(logger, teacher_accuracy, continued=session.state is not None),
                 Saliency(logger, fixed_inputs(session.data.val, session.device),
                          OmegaConf.select(session.cfg, "trainer.saliency", default="abs")),
                 *([ProgressBar()] if interactive() and session.world.main else []),
                 Checkpointing(checkpointer, logger.flush)]
    trainer = Trainer(loop_settings(session.cfg), session.optim, session.device, world=session.world,
                      precision=session.precision, callbacks=callbacks)
    return trainer.fit(distiller, session.data, session.batches)


def tested(session: Session, distiller: Any, teacher_info: dict[str, Any], history: dict[str, Any],
           checkpointer: Any) -> dict[str, Any]:
    """The test metrics of the selected weights (last, or best.pt's), then metrics.json's content."""
    import torch

    from jacdistill_cli.loop import checkpointing, distributed
    from jacdistill_cli.loop.device import describe_device
    from jacdistill_cli.loop.robust import robust_metrics
    from jacdistill_cli.loop.trainer import evaluate
    from jacdistill_cli.records import status
    from jacdistill_cli.records.state import load_best
    from jacdistill_cli.zoo.models import count_parameters

    cfg, world = session.cfg, session.world
    best = checkpointer.best
    val = {k: history[k] for k in ("accuracy", "agreement", "jacobian_cosine")}
    if cfg.trainer.select == "best":
        distributed.barrier(world)   # best.pt is written by rank 0
        payload = load_best(session.run_dir / checkpointing.BEST, distiller)
        val = {k: payload["metrics"][f"val_{k}"] for k in val}
    test = evaluate(distiller.student, distiller.teacher, session.data.test, cfg.trainer.eval_batch_size,
                    session.device, world)
    cached = Path(teacher_info["path"]) if teacher_info["source"] in ("cache", "trained") else None
    robust = robust_metrics(distiller.student, distiller.teacher, session.data, session.device, world, robustness(cfg),
                            history["train_seconds"] / max(history["epochs"], 1),
                            cached if cached is not None and cached.parent != session.run_dir else None)
    return {
        "status": status.FINISHED, "selected": cfg.trainer.select, "best_epoch": best["epoch"],
        "best_step": best["step"], "best_val_accuracy": best["val_accuracy"],
        "test_accuracy": test["accuracy"], "agreement": test["agreement"],
        "jacobian_cosine": test["jacobian_cosine"], "val_accuracy": val["accuracy"],
        "val_agreement": val["agreement"], "val_jacobian_cosine": val["jacobian_cosine"],
        "teacher_test_accuracy": teacher_info["teacher_test_accuracy"],
        **{k: history[k] for k in ("train_seconds", "samples_per_second", "epochs", "steps")}, "seed": cfg.seed,
        "device": describe_device(session.device), "torch": torch.__version__,
        "world_size": world.size, "precision": session.precision.name,
        "teacher_source": teacher_info["source"], "teacher_checkpoint": teacher_info["path"],
        "student_parameters": count_parameters(distiller.student),
        "teacher_parameters": count_parameters(distiller.teacher), **robust,
    }


def finished(session: Session, distiller: Any, metrics: dict[str, Any]) -> float:
    """The results written whole, whatever signal arrives meanwhile; the summary of a single run."""
    import logging

    from jacdistill_cli.loop.robust import robust_scalars
    from jacdistill_cli.storage import write_torch

    log = logging.getLogger("jacdistill")
    with session.signals.deferring(raise_pending=False):  # the results are written whole, whatever arrives
        student, teacher = robust_scalars(metrics)
        session.logger.scalars(teacher, 0)   # the teacher's robust accuracy: a level line from the first step
        session.logger.scalars({"test/accuracy": metrics["test_accuracy"], "test/agreement": metrics["agreement"],
                                "test/jacobian_cosine": metrics["jacobian_cosine"], **student, **teacher},
                               metrics["steps"])
        close_logger(session, True)
        if session.world.main:
            floats = {k: v for k, v in metrics.items() if isinstance(v, float)}
            write_torch(session.run_dir / "student.pt", student_payload(session, distiller, floats))
            write_json(session.run_dir / "metrics.json", metrics)
    log.info(f"test accuracy {metrics['test_accuracy']:.4f}  agreement {metrics['agreement']:.4f}  "
             f"jacobian_cosine {metrics['jacobian_cosine']:.4f}  (teacher {metrics['teacher_test_accuracy']:.4f})"
             + (f"  from the best epoch {metrics['best_epoch']}" if metrics["selected"] == "best" else ""))
    log.info(f"run directory: {session.run_dir}")
    if single_run() and session.world.main:
        print(summary_table(metrics, session.run_dir))
    if session.signals.pending is not None:
        from jacdistill_cli.records.signals import Interrupted
        raise Interrupted(session.signals.pending, None, finished=True)
    return metrics["val_accuracy"]


def reuse_teacher_outputs(cfg: DictConfig, objective: Any, data: Any, precision: Any) -> bool:
    """teacher.reuse_outputs: auto reuses when it can (one line refuses `true` when it cannot). Decided from
    the objective's settings, before any teacher is obtained."""
    from jacdistill_cli.engine.objective import distillation_objective
    from jacdistill_cli.zoo.data import in_memory

    built = distillation_objective(objective.loss, objective.alpha, objective.hard_weight, objective.method, None,
                                   None, objective.terms)
    if not built.reads_teacher:
        return False   # no term reads the teacher: no step runs it, nothing to keep
    features = objective.features.name
    reasons = []
    if features != "none" or not built.teacher_reusable:
        reasons.append(f"the teacher's side of jacobian={built.method.name} with features={features} is not a "
                       "function of the sample alone (or is too large to keep)")
    if getattr(data.train, "augment", None) is not None:
        reasons.append("the training split is augmented (dataset.augment=true)")
    if not in_memory(data.train):
        reasons.append("the training split is not held in memory (dataset.max_memory_mb)")
    if precision.name != "32":
        reasons.append(f"trainer.precision={precision.name}")
    setting = cfg.teacher.get("reuse_outputs", "auto")
    if setting is True and reasons:
        raise UsageError(f"teacher.reuse_outputs=true is not allowed: {reasons[0]}; use teacher.reuse_outputs=auto "
                         "or false")
    return setting is True or (setting == "auto" and not reasons)


def stopped(cfg: DictConfig, run_dir, stop, command: str) -> None:
    """After a signal: metrics.json says interrupted (unless the run had finished), one line says
    how to resume, SIGUSR1 under SLURM requeues the job; exit status 128 + the signal's number."""
    import logging
    import sys

    from jacdistill_cli.records import directory, resume, status
    from jacdistill_cli.records.signals import SIGNALS

    log = logging.getLogger("jacdistill")
    name = SIGNALS.get(stop.signum, str(stop.signum))
    if stop.finished:
        line = f"stopped by {name} after the run finished; its results are in {run_dir}"
    else:
        at = stop.progress
        where = f"at epoch {at.epoch}, step {at.step}" if at is not None else "before training began"
        saved = (run_dir / directory.LAST).is_file()
        if (run_dir / "config.yaml").is_file():  # else stopped before the directory was claimed: no record
            write_json(run_dir / "metrics.json", {
                "status": status.INTERRUPTED, "signal": name, "epoch": at.epoch if at else None,
                "step": at.step if at else None, "last_checkpoint": str(run_dir / directory.LAST) if saved else None,
                "resume": command})
        line = f"interrupted by {name} {where}{' (last.pt saved)' if saved else ''}; resume with: {command}"
    log.warning(line)
    warning = resume.requeue_under_slurm() if stop.signum == signal.SIGUSR1 else None
    print(f"jacdistill train: {line}", file=sys.stderr)
    if warning:
        print(f"jacdistill train: warning: {warning}", file=sys.stderr)
    raise SystemExit(128 + int(stop.signum))


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)
