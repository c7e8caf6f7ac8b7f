"""Run a command's `run(cfg)` in this process, with the config composed as the console script would."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict


def run_command(command: str, overrides: list[str], run_dir: Path) -> Any:
    """Compose conf/<command>.yaml with `overrides`, make `run_dir` Hydra's run directory, call
    jacdistill_cli.commands.<command>.run and return what it returns."""
    module = importlib.import_module(f"jacdistill_cli.commands.{command}")
    with initialize_config_module(config_module="jacdistill_cli.conf", version_base="1.3"):
        cfg = compose(config_name=command, overrides=list(overrides), return_hydra_config=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return module.run(cfg)
