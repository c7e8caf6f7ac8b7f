"""`jacdistill train`: distil a student from a teacher, logging every loss term to TensorBoard."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.registry import label
from jacdistill_cli.config.entry import one_line_errors
from jacdistill_cli.errors import UsageError
from jacdistill_cli.run.runtime import register_resolvers

register_resolvers()

# Custom-scalars layout: one chart per loss term the run logs and per validation metric, each drawn with
# every run of the sweep (TensorBoard merges the runs' layouts, so a term no run logs gets no chart).
VAL_METRICS = ("accuracy", "agreement", "jacobian_cosine")


def charts(terms: list[str]) -> dict[str, dict[str, list[str]]]:
    """The layout for a run whose objective returns `terms` (total first)."""
    ordered = sorted(terms, key=lambda term: term != "total")
    return {"loss terms (per step)": {f"loss/{term}": [f"^loss/{term}$"] for term in ordered},
            "validation (per evaluation)": {f"val/{name}": [f"^val/{name}$"] for name in VAL_METRICS}}


def with_layout(objective, logger):
    """`objective`, which writes the run's custom-scalars layout when its first step shows the terms."""
    written = False

    def first_step_writes_layout(student, teacher, inputs, labels, **options):
        nonlocal written
        logits, terms = objective(student, teacher, inputs, labels, **options)
        if not written:
            logger.layout(charts(list(terms)))
            written = True
        return logits, terms

    return first_step_writes_layout


NOT_HPARAMS = {"cache_dir"}


def compact(node: DictConfig) -> str:
    """A model node's architecture on one line: `mlp(hidden=[64], batchnorm=False)`."""
    from jacdistill_cli.zoo.models import architecture, describe_architecture

    return describe_architecture(architecture(node))


def choice_of(group: str) -> str | None:
    """The option chosen for a config group without keys of its own (recipe, experiment), or None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The run's hyperparameters, flat, for TensorBoard's HPARAMS tab: every top-level setting (alpha,
    temperature, hard_weight, seed, ...), the recipe and experiment preset, the distillation loss, the
    Jacobian method and each of its settings, teacher, student, dataset, samples_per_class (None: the whole
    training split), optimiser."""
    hparams: dict[str, Any] = {key: value for key, value in cfg.items()
                               if key not in NOT_HPARAMS and isinstance(value, (int, float, str, bool))}
    hparams["recipe"] = choice_of("recipe")
    hparams["experiment"] = choice_of("experiment")
    hparams["loss"] = label("loss", cfg.loss)
    hparams["jacobian"] = label("jacobian", cfg.jacobian)
    for key, value in cfg.jacobian.items():
        if key not in ("name", "_target_") and isinstance(value, (int, float, str, bool)):
            hparams[f"jacobian.{key}"] = value
    hparams["teacher"] = str(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else compact(cfg.teacher)
    hparams["student"] = compact(cfg.student)
    hparams["dataset"] = label("dataset", cfg.dataset)
    hparams["samples_per_class"] = OmegaConf.select(cfg, "dataset.samples_per_class", default=None)
    from jacdistill_cli.engine.pairs import parse_pairs

    hparams["features"] = label("features", cfg.features) if OmegaConf.select(cfg, "features") else "none"
    if hparams["features"] != "none":
        for key, value in cfg.features.items():
            if key not in ("name", "_target_"):
                hparams[f"features.{key}"] = value if isinstance(value, (int, float, str, bool)) else (
                    "architecture defaults" if value is None else str([list(p) for p in parse_pairs(value)]))
    hparams["optim"] = label("optim", cfg.optim)
    hparams["optim.lr"] = cfg.optim.lr
    hparams["trainer.epochs"] = cfg.trainer.epochs
    hparams["trainer.batch_size"] = cfg.trainer.batch_size
    return hparams


def single_run() -> bool:
    """Whether this is a single run (not a job of a multirun, whose sweep ends with its report)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN


def summary_table(metrics: dict[str, Any], run_dir) -> str:
    """What a single run ends with on stdout: the student's test metrics beside the teacher's accuracy,
    then time, device and where the run is."""
    rows = [("test accuracy", f"{metrics['test_accuracy']:.4f}", f"{metrics['teacher_test_accuracy']:.4f}"),
            ("agreement with the teacher", f"{metrics['agreement']:.4f}", ""),
            ("input-gradient cosine", f"{metrics['jacobian_cosine']:.4f}", ""),
            ("val accuracy", f"{metrics['val_accuracy']:.4f}", "")]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'':{width}}  student  teacher", *(f"{n:{width}}  {s:>7}  {t:>7}".rstrip() for n, s, t in rows),
             f"{metrics['epochs']} epoch{'s' if metrics['epochs'] != 1 else ''}, {metrics['steps']} steps in "
             f"{metrics['train_seconds']:.1f} s "
             f"({metrics['samples_per_second']:.0f} samples/s) on {metrics['device']}, seed {metrics['seed']}",
             f"run directory: {run_dir}"]
    return "\n".join(lines)


@one_line_errors("train")
def run(cfg: DictConfig) -> float:
    """Returns the final validation accuracy, so Hydra sweepers can optimise it. With
    `trainer.devices=N > 1` (and no torchrun/srun around it) it starts N workers and waits for them."""
    import contextlib

    from jacdistill_cli.config import settings
    from jacdistill_cli.run import distributed, resume
    from jacdistill_cli.errors import setting_error
    from jacdistill_cli.run.runtime import SALIENCY_MODES

    if OmegaConf.select(cfg, "trainer.saliency", default="abs") not in SALIENCY_MODES:
        raise setting_error("trainer.saliency", cfg.trainer.saliency,
                            f"it must be one of {', '.join(SALIENCY_MODES)}")
    from jacdistill_cli.run.runtime import run_directory

    validated = settings.validate_train(cfg)  # before any work: nothing is written for a bad value
    resume.validate(cfg)
    run_dir = run_directory()
    world = distributed.world_from_environment()
    command = resume.resume_command(run_dir)
    lock = resume.DirectoryLock(run_dir) if world.main else contextlib.nullcontext()
    with lock, resume.Signals() as signals:
        try:
            claim = claimed(cfg, run_dir) if world.main else None   # another config's results: refused here
            if claim is not None and claim.finished is not None and not world.distributed:
                # (under torchrun or srun every rank learns it from rank 0 in train(), and all return there)
                return float(claim.finished.get("val_accuracy", float("nan")))
            if cfg.trainer.devices > 1 and not world.distributed:
                return launched(cfg, run_dir, claim, command)
            return train(cfg, run_dir, world, signals, claim, validated)
        except resume.Interrupted as stop:
            stopped(cfg, run_dir, stop, command)


def claimed(cfg: DictConfig, run_dir: Path):
    """The run directory claimed for this configuration (resume.Claim), its records written: skipped
    when this configuration finished there, cleared when started over."""
    import logging

    from jacdistill_cli.run import resume
    from jacdistill_cli.run.runtime import save_resolved_config

    log = logging.getLogger("jacdistill")
    claim = resume.claim_directory(cfg, run_dir)
    if claim.finished is not None:
        log.info(f"this configuration finished in {run_dir} already (trainer.resume=auto): nothing to do")
        return claim
    resume.remove_stale_temporaries(run_dir)
    if claim.restart:
        for name in (resume.LAST, resume.BEST, "metrics.json"):
            (run_dir / name).unlink(missing_ok=True)
    resume.save_hydra_files(cfg, run_dir)
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

    from jacdistill_cli.run import distributed, resume

    # Hydra's own config (the groups chosen, the run mode) goes along: the workers' HPARAMS name the recipe
    # and preset as a one-process run's do, and rank 0 ends a single run with its summary table.
    hydra_cfg = HydraConfig.instance().cfg if HydraConfig.initialized() else None
    started = time.time_ns()

    def interrupted_now() -> bool:
        """Whether rank 0 recorded an interruption of this launch (and said how to resume)."""
        metrics = run_dir / "metrics.json"
        return (metrics.is_file() and metrics.stat().st_mtime_ns >= started
                and json.loads(metrics.read_text()).get("status") == resume.INTERRUPTED)

    try:
        # SIGINT and SIGTERM reach the workers through torch's agent, SIGUSR1 (SLURM's warning before a time
        # limit) is forwarded: rank 0 saves at the next step, as one process does, and requeues under SLURM.
        result = distributed.launch(worker, (OmegaConf.to_yaml(cfg, resolve=True), str(run_dir), claim, command,
                                             hydra_cfg), cfg.trainer.devices, forward=FORWARDED)
    except SignalException as err:   # the agent stopped the workers with the signal this process got
        if not interrupted_now():   # stopped before training began: this process says so
            stopped(cfg, run_dir, resume.Interrupted(int(err.sigval)), command)
        raise SystemExit(128 + int(err.sigval)) from None
    except ChildFailedError as err:
        if interrupted_now():
            codes = [f.exitcode for f in err.failures.values() if f.exitcode and f.exitcode > 128]
            raise SystemExit(codes[0] if codes else 1) from None   # rank 0 said how to resume
        raise UsageError(f"trainer.devices={cfg.trainer.devices}: a worker failed: {worker_failure(err)}") from None
    if isinstance(result, WorkerStopped):
        raise SystemExit(128 + result.signum)
    return result


# The signals the launching process of trainer.devices=N passes on to its workers itself; torch's agent
# stops them with the others it gets (SIGINT, SIGTERM, SIGHUP, SIGQUIT).
FORWARDED = (signal.SIGUSR1,)


@dataclass(frozen=True)
class WorkerStopped:
    """What a worker of `trainer.devices=N` returns when a signal stopped it (rank 0 has recorded it)."""

    signum: int


def worker(cfg_yaml: str, run_dir: str, claim: Any, command: str,
           hydra_cfg: DictConfig | None = None) -> float | WorkerStopped:
    """One process of `trainer.devices=N`, started by torch's elastic launcher (RANK, WORLD_SIZE, ... set)."""
    import contextlib
    import logging
    import sys

    from hydra.core.hydra_config import HydraConfig

    if hydra_cfg is not None:
        HydraConfig.instance().set_config(hydra_cfg)
    from jacdistill_cli.errors import UsageError as Usage
    from jacdistill_cli.run import distributed, resume

    world = distributed.world_from_environment()
    logging.basicConfig(level=logging.INFO if world.main else logging.WARNING,
                        format=f"[%(asctime)s][rank {world.rank}][%(levelname)s] - %(message)s")
    cfg = OmegaConf.create(cfg_yaml)
    with resume.Signals() as signals:
        try:
            return train(cfg, Path(run_dir), world, signals, claim)
        except resume.Interrupted as stop:
            if world.main:
                with contextlib.suppress(SystemExit):   # the launching process exits with the status
                    stopped(cfg, Path(run_dir), stop, command)
            if stop.signum in FORWARDED:
                # Passed on by the launching process, whose agent is waiting for the workers' results (and takes a
                # non-zero exit for a failure, which it reports at length).
                return WorkerStopped(int(stop.signum))
            raise SystemExit(128 + int(stop.signum)) from None   # the agent is stopping the workers: it waits for exits
        except Usage as err:
            print(f"jacdistill train: error: {err}", file=sys.stderr)
            raise


def worker_failure(err: Exception) -> str:
    """The first failed worker's error, in one line."""
    for failure in getattr(err, "failures", {}).values():
        message = failure.message if isinstance(failure.message, str) else str(failure.message)
        return (message.strip().splitlines() or ["unknown error"])[-1][:300]
    return str(err).strip().splitlines()[0]


def train(cfg: DictConfig, run_dir: Path, world: Any, signals: Any, claim: Any,
          validated: tuple[Any, Any] | None = None) -> float:
    """The run in its directory: skipped when this configuration finished there, continued from
    last.pt when it was interrupted, otherwise from the start. Under torch.distributed, this rank's
    part of it: rank 0 claims and writes the directory, every rank continues from the same last.pt."""
    import torch

    from jacdistill_cli.config import settings
    from jacdistill_cli.run import distributed
    from jacdistill_cli.run.runtime import select_device

    # (objective, optimiser) settings: checked by run() in this process, or here in a worker of trainer.devices=N
    objective_settings, optim_settings = validated or settings.validate_train(cfg)
    device = select_device(cfg.trainer.device, world.local_rank if world.distributed else None)
    if OmegaConf.select(cfg, "trainer.threads", default=None) is not None:
        torch.set_num_threads(cfg.trainer.threads)  # small models: threads that wait on each other cost more
    # The process group is left on every way out (a rank that exits with gloo's still in place can abort).
    with distributed.joined(world, device.type):
        return train_in_group(cfg, run_dir, world, signals, claim, objective_settings, optim_settings, device)


def train_in_group(cfg: DictConfig, run_dir: Path, world: Any, signals: Any, claim: Any, objective_settings: Any,
                   optim_settings: Any, device: Any) -> float:
    """train() in its process group (if any)."""
    import logging

    import torch

    from jacdistill_cli.engine.objective import objective_from_settings
    from jacdistill_cli.run import distributed, resume
    from jacdistill_cli.run.logger import NullLogger, RunLogger
    from jacdistill_cli.run.precision import Precision, precision_name
    from jacdistill_cli.run.runtime import describe_device, seed_everything
    from jacdistill_cli.run.saliency import fixed_inputs
    from jacdistill_cli.run.teacher import obtain_teacher
    from jacdistill_cli.run.trainer import evaluate, fit, reused_teacher_outputs
    from jacdistill_cli.storage import write_json, write_torch
    from jacdistill_cli.zoo.checkpoints import make_checkpoint
    from jacdistill_cli.zoo.data import build_data
    from jacdistill_cli.zoo.models import architecture, build_model, count_parameters, describe_architecture

    log = logging.getLogger("jacdistill")
    if world.distributed and len(set(distributed.all_gather(str(run_dir), world))) > 1:
        raise UsageError("the ranks of this run have different run directories; under torchrun or srun give every "
                         "rank the same hydra.run.dir=...")
    claim = distributed.broadcast(claim, world)   # rank 0 claimed the directory
    log.info(f"run directory: {run_dir}" + (f" ({world.size} processes)" if world.distributed else ""))
    if claim.finished is not None:
        return float(claim.finished.get("val_accuracy", float("nan")))
    seed_everything(cfg.seed)
    precision = Precision(precision_name(cfg.trainer.precision), device.type)

    data = build_data(cfg.dataset).to(device)
    spec = architecture(cfg.student)
    student = build_model(spec, data.input_shape, data.num_classes, "student")  # checks settings before the teacher
    features = objective_settings.features
    if features.name != "none":   # a wrong module path stops here, before a teacher is trained
        features.matching(build_model(architecture(cfg.teacher), data.input_shape, data.num_classes, "teacher"),
                          student, data.input_shape)
    state = resume.load_state(claim.resume) if claim.resume is not None else None
    resumed_step = None if state is None else int(state["progress"]["step"])
    if world.main and (resumed_step is not None or claim.restart):
        resume.drop_session_end(run_dir)  # the interrupted session's end; this one ends it again
    # Continued: earlier files' events after the saved step are dropped; started over: all of them.
    logger = RunLogger(run_dir, purge_step=resumed_step + 1 if resumed_step is not None else
                       0 if claim.restart else None) if world.main else NullLogger()
    if resumed_step is None:
        logger.hparams_start(hparams_of(cfg))  # its metrics: the final test/..., val/... scalars
    else:
        logger.hparams_continue()
    succeeded = False
    feature_matching = checkpoint = None
    try:
        teacher, teacher_info = obtain_teacher(cfg, data, device, logger, world, run_dir)
        if resumed_step is None:
            logger.scalars({"teacher/test_accuracy": teacher_info["teacher_test_accuracy"]}, 0)

        seed_everything(cfg.seed)
        student = build_model(spec, data.input_shape, data.num_classes, "student").to(device)
        log.info(f"student {describe_architecture(spec)}: {count_parameters(student)} parameters; "
                 f"teacher: {count_parameters(teacher)}")
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        objective, feature_matching = objective_from_settings(objective_settings, teacher, student,
                                                              data.input_shape, device, generator)
        if feature_matching is not None:
            log.info(f"features={feature_matching.method}: " + "; ".join(p.describe() for p in feature_matching.pairs))
        trained = student
        if world.distributed:
            if cfg.trainer.sync_batchnorm:
                trained = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
            # Never static_graph: with it DDP skips the all-reduce of gradients reached through
            # input-gradients (each rank would keep its own).
            trained = torch.nn.parallel.DistributedDataParallel(
                trained, device_ids=[device.index] if device.type == "cuda" else None)
            student = trained.module

        def student_payload(metrics: dict) -> dict:
            payload = make_checkpoint(student, "student", spec, data, metrics)
            if feature_matching is not None:
                payload["features"] = feature_matching.checkpoint_entry()  # the hint regressors
            return payload

        reused = None
        if reuse_teacher_outputs(cfg, objective, data, precision):
            reused = reused_teacher_outputs(objective, teacher, data.train, cfg.trainer.batch_size, device)
            log.info(f"teacher outputs computed once for the {len(data.train)} training samples and reused every "
                     "epoch (teacher.reuse_outputs)")
        batch_generator = torch.Generator().manual_seed(cfg.seed)
        checkpoint = resume.Checkpointer(
            run_dir, every_steps=OmegaConf.select(cfg, "trainer.save_every_steps", default=None),
            every_epochs=OmegaConf.select(cfg, "trainer.save_every_epochs", default=1), epochs=cfg.trainer.epochs,
            generators={"batches": batch_generator, "objective": generator},
            modules={"features": feature_matching} if feature_matching is not None else {},
            best_payload=lambda val: student_payload({f"val_{k}": v for k, v in val.items()}),
            signals=signals, flush=logger.flush, state=state, world=world, device=device)
        history = fit(trained, teacher, with_layout(objective, logger), data, epochs=cfg.trainer.epochs,
                      batch_size=cfg.trainer.batch_size, eval_batch_size=cfg.trainer.eval_batch_size,
                      optim=optim_settings, device=device, logger=logger,
                      generator=batch_generator, num_workers=cfg.trainer.num_workers,
                      eval_every=cfg.trainer.eval_every, saliency_inputs=fixed_inputs(data.val, device),
                      saliency=OmegaConf.select(cfg, "trainer.saliency", default="abs"),
                      objective_parameters=feature_matching.parameters() if feature_matching is not None else (),
                      checkpoint=checkpoint, world=world, precision=precision, reused=reused)
        selected = {"selected": cfg.trainer.select, "best_epoch": checkpoint.best["epoch"],
                    "best_step": checkpoint.best["step"], "best_val_accuracy": checkpoint.best["val_accuracy"]}
        val = {k: history[k] for k in ("accuracy", "agreement", "jacobian_cosine")}
        if cfg.trainer.select == "best":
            distributed.barrier(world)   # best.pt is written by rank 0
            best = resume.load_best(run_dir / resume.BEST, student, feature_matching)
            val = {k: best["metrics"][f"val_{k}"] for k in val}
        test = evaluate(student, teacher, data.test, cfg.trainer.eval_batch_size, device, world)
        metrics = {
            "status": resume.FINISHED, **selected,
            "test_accuracy": test["accuracy"], "agreement": test["agreement"],
            "jacobian_cosine": test["jacobian_cosine"], "val_accuracy": val["accuracy"],
            "val_agreement": val["agreement"], "val_jacobian_cosine": val["jacobian_cosine"],
            "teacher_test_accuracy": teacher_info["teacher_test_accuracy"],
            "train_seconds": history["train_seconds"], "samples_per_second": history["samples_per_second"],
            "epochs": history["epochs"], "steps": history["steps"], "seed": cfg.seed,
            "device": describe_device(device), "torch": torch.__version__,
            "world_size": world.size, "precision": precision.name,
            "teacher_source": teacher_info["source"], "teacher_checkpoint": teacher_info["path"],
            "student_parameters": count_parameters(student), "teacher_parameters": count_parameters(teacher),
        }
        with signals.deferring(raise_pending=False):  # the results are written whole, whatever arrives
            logger.scalars({"test/accuracy": test["accuracy"], "test/agreement": test["agreement"],
                            "test/jacobian_cosine": test["jacobian_cosine"],
                            # at the first and the last step: a level line to read the student's curves against
                            "teacher/test_accuracy": teacher_info["teacher_test_accuracy"]}, history["steps"])
            succeeded = True
            logger.hparams_end(succeeded)
            logger.close()
            if world.main:
                write_torch(run_dir / "student.pt",
                            student_payload({k: v for k, v in metrics.items() if isinstance(v, float)}))
                write_json(run_dir / "metrics.json", metrics)
    except resume.Interrupted as stop:
        logger.hparams_end(False)
        logger.close()
        if stop.progress is None and checkpoint is not None:
            stop.progress = checkpoint.progress
        raise
    except Exception as err:
        # In the run's train.log, where `jacdistill report` finds why a job of a sweep has no metrics.
        log.error(f"failed: {type(err).__name__}: {err}")
        logger.hparams_end(False)
        logger.close()
        raise
    log.info(f"test accuracy {metrics['test_accuracy']:.4f}  agreement {metrics['agreement']:.4f}  "
             f"jacobian_cosine {metrics['jacobian_cosine']:.4f}  (teacher {metrics['teacher_test_accuracy']:.4f})"
             + (f"  from the best epoch {selected['best_epoch']}" if cfg.trainer.select == "best" else ""))
    log.info(f"run directory: {run_dir}")
    if single_run() and world.main:
        print(summary_table(metrics, run_dir))
    if signals.pending is not None:
        raise resume.Interrupted(signals.pending, None, finished=True)
    return metrics["val_accuracy"]


def reuse_teacher_outputs(cfg: DictConfig, objective: Any, data: Any, precision: Any) -> bool:
    """teacher.reuse_outputs: auto reuses when it can (one line refuses `true` when it cannot)."""
    from jacdistill_cli.zoo.data import in_memory

    if not objective.reads_teacher:
        return False   # no term reads the teacher: no step runs it, nothing to keep
    reasons = []
    if not objective.teacher_reusable:
        reasons.append(f"the teacher's side of jacobian={objective.method.name} with features="
                       f"{objective_features(objective)} is not a function of the sample alone (or is too large to keep)")
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


def objective_features(objective: Any) -> str:
    return "none" if objective.matching is None else objective.matching.method


def stopped(cfg: DictConfig, run_dir, stop, command: str) -> None:
    """After a signal: metrics.json says interrupted (unless the run had finished), one line says
    how to resume, SIGUSR1 under SLURM requeues the job; exit status 128 + the signal's number."""
    import logging
    import sys

    from jacdistill_cli.run import resume
    from jacdistill_cli.storage import write_json

    log = logging.getLogger("jacdistill")
    name = resume.SIGNALS.get(stop.signum, str(stop.signum))
    if stop.finished:
        line = f"stopped by {name} after the run finished; its results are in {run_dir}"
    else:
        at = stop.progress
        where = f"at epoch {at.epoch}, step {at.step}" if at is not None else "before training began"
        saved = (run_dir / resume.LAST).is_file()
        if (run_dir / "config.yaml").is_file():  # else stopped before the directory was claimed: no record
            write_json(run_dir / "metrics.json", {
                "status": resume.INTERRUPTED, "signal": name, "epoch": at.epoch if at else None,
                "step": at.step if at else None, "last_checkpoint": str(run_dir / resume.LAST) if saved else None,
                "resume": command})
        line = f"interrupted by {name} {where}{' (last.pt saved)' if saved else ''}; resume with: {command}"
    log.warning(line)
    warning = resume.requeue_under_slurm() if stop.signum == resume.signal.SIGUSR1 else None
    print(f"jacdistill train: {line}", file=sys.stderr)
    if warning:
        print(f"jacdistill train: warning: {warning}", file=sys.stderr)
    raise SystemExit(128 + int(stop.signum))


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)
