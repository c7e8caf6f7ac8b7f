"""TensorBoard logging into the run directory itself (event files directly there, no subfolder)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir), flush_secs=10)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, body: str, step: int = 0) -> None:
        self.writer.add_text(tag, body, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
