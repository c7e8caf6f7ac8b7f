"""`jacdistill bench`: time one step of each Jacobian method against plain distillation and the
naive reference; print a table per class count and write bench.json in the run directory.

Exit status 0 whether or not the timing targets are met (times depend on the machine and its
load); bench.json and the table say which are.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.entry import hydra_choices, one_line_errors
from jacdistill_cli.config.resolvers import register_resolvers

register_resolvers()


@one_line_errors("bench")
def run(cfg: DictConfig) -> dict[str, Any]:
    """Returns what bench.json holds."""
    import logging

    import torch

    from jacdistill_cli.loop.device import select_device
    from jacdistill_cli.proofs.bench_run import run_bench
    from jacdistill_cli.records.directory import run_directory
    from jacdistill_cli.spec.tools import bench_spec
    from jacdistill_cli.storage import write_text

    spec = bench_spec(cfg, hydra_choices())   # every setting checked once: a bad value is refused here
    device = select_device(spec.device, key="device")   # one line for a GPU torch does not see
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    run_dir = run_directory()
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(spec.config)))
    results = run_bench(spec, device, run_dir)
    logging.getLogger("jacdistill").info(f"bench.json: {run_dir / 'bench.json'}")
    return results


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="bench")
def main(cfg: DictConfig) -> Any:
    run(cfg)
