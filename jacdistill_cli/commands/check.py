"""`jacdistill check`: prove each Jacobian method right on the configured networks and data.

Prints one row per method and one line on the common mistake; writes check.json in the run
directory; exit status 1 when any check fails (see jacdistill_cli.proofs.verify for what is checked).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from jacdistill_cli.config.entry import hydra_choices, one_line_errors
from jacdistill_cli.config.resolvers import register_resolvers

register_resolvers()


@one_line_errors("check")
def run(cfg: DictConfig) -> int:
    """Returns the number of checks that failed (exit status 1 when any did)."""
    import logging

    from jacdistill_cli.loop.device import seed_everything, select_device
    from jacdistill_cli.proofs.check_run import run_checks
    from jacdistill_cli.records.directory import run_directory
    from jacdistill_cli.spec.tools import check_spec
    from jacdistill_cli.storage import write_json, write_text
    from jacdistill_cli.zoo.data import build_data

    spec = check_spec(cfg, hydra_choices())   # every setting checked once: a bad value is refused here
    device = select_device(spec.device, key="device")
    run_dir = run_directory()
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(spec.config)))
    seed_everything(spec.seed)
    data = build_data(OmegaConf.create(spec.data.node)).to(device)
    result = run_checks(spec, data, device)   # what is checked said first
    print(result.text)
    write_json(run_dir / "check.json", result.record)
    logging.getLogger("jacdistill").info(f"run directory: {run_dir}")
    if result.failed:
        raise SystemExit(1)
    return 0


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="check")
def main(cfg: DictConfig) -> int:
    return run(cfg)
