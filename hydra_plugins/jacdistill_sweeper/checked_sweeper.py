"""jacdistill's sweeper: Hydra's basic sweeper that composes and checks every job of a sweep before the first
one starts (a bad value refuses the sweep in one line, no job runs). Hydra finds sweepers in the
`hydra_plugins` namespace only; the checks themselves are jacdistill_cli.spec.sweep's."""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class CheckedSweeper(BasicSweeper):
    """Runs the jobs Hydra's basic sweeper runs, in its order, once every one of them passed its command's
    settings check; names the jobs that would be the same run."""

    def sweep(self, arguments: list[str]) -> Any:
        from jacdistill_cli.spec.sweep import check_sweep

        check_sweep(self.config, self.hydra_context.config_loader, {} if self.params is None else dict(self.params),
                    list(arguments))
        return super().sweep(arguments)
