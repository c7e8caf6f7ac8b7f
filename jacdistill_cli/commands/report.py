"""`jacdistill report DIR`: a table of the final metrics of every train run under a run or sweep directory."""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from jacdistill_cli.config.entry import one_line_errors
from jacdistill_cli.config.keys import hydra_quoted
from jacdistill_cli.config.resolvers import register_resolvers

register_resolvers()


def translate_argv(args: list[str]) -> list[str]:
    """`jacdistill report DIR [overrides]`: a first argument that names a directory, or is no `key=value`
    override, is the directory, passed as a quoted `dir=` override (job directories hold `=` and `,`)."""
    if args and not args[0].startswith("-") and (os.path.isdir(args[0]) or "=" not in args[0]):
        return [f"dir={hydra_quoted(args[0])}", *args[1:]]
    return args


@one_line_errors("report")
def run(cfg: DictConfig) -> None:
    from jacdistill_cli.analysis.report import write_report
    from jacdistill_cli.errors import UsageError

    if cfg.dir is None or str(cfg.dir).strip() == "":
        raise UsageError("dir=null is not allowed: give the run or sweep directory, as in "
                         "`jacdistill report outputs/train/multirun/DATE/TIME`")
    directory = os.path.expanduser(str(cfg.dir))
    _, text, written = write_report(directory, metric=str(cfg.metric), x=str(cfg.x))
    print(text, end="")
    print(f"\nwritten: {', '.join(str(path) for path in written)}")
    if not any(path.name == "report.png" for path in written):
        print("no report.png: no run has finished yet")


@hydra.main(version_base="1.3", config_path="pkg://jacdistill_cli.conf", config_name="report")
def main(cfg: DictConfig) -> None:
    run(cfg)
