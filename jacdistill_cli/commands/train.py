"""`jacdistill train`: distil a student from a teacher, logging every loss term to TensorBoard."""

from __future__ import annotations

import contextlib

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.entry import hydra_choices, one_line_errors
from jacdistill_cli.config.resolvers import register_resolvers

register_resolvers()


@one_line_errors("train")
def run(cfg: DictConfig) -> float:
    """The run in its directory: skipped when this configuration finished there, continued from last.pt when
    it was interrupted, otherwise from the start. Returns the final validation accuracy, so Hydra sweepers can
    optimise it. Under torch.distributed, this rank's part of it; with `trainer.devices=N > 1` (and no
    torchrun/srun around it) N workers started here."""
    from jacdistill_cli.loop.device import select_device
    from jacdistill_cli.loop.distill import distilled, preflight
    from jacdistill_cli.loop.distributed import world_from_environment
    from jacdistill_cli.loop.launch import launched
    from jacdistill_cli.records.directory import DirectoryLock, RunPlace, claimed
    from jacdistill_cli.records.outcome import outcome
    from jacdistill_cli.records.signals import Signals
    from jacdistill_cli.spec.build import train_spec

    spec = train_spec(cfg, hydra_choices())   # every setting checked once: a bad value is refused here
    place = RunPlace.of_hydra(cfg)
    world = world_from_environment()
    device = select_device(spec.loop.device, world.local_rank if world.distributed else None)
    prepared = preflight(spec, device)        # the data, both models tried on it: refused before any record
    lock = DirectoryLock(place) if world.main else contextlib.nullcontext()
    with outcome(place, world.main) as ended, lock, Signals() as signals:
        claim = claimed(spec.config, place) if world.main else None   # another configuration's results: refused
        ended.claimed = claim is not None and claim.finished is None
        if claim is not None and claim.finished is not None and not world.distributed:
            return float(claim.finished.get("val_accuracy", float("nan")))
        if spec.loop.devices > 1 and not world.distributed:
            return launched(OmegaConf.to_yaml(cfg, resolve=True), hydra_choices(), place, claim, spec.loop.devices)
        return distilled(spec, place, world, signals, claim, prepared)
    return ended.result


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)
