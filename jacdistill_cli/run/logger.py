"""TensorBoard logging into the run directory itself (event files directly there, no subfolder).

Everything a run logs lives in one event file in its own directory, so `tensorboard --logdir SWEEP_DIR`
shows each job of a sweep as one run, named by the job's directory: scalars, images, a custom-scalars
layout, and the run's hyperparameters for the HPARAMS tab.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

HParamValue = int | float | str | bool | None


class RunLogger:
    def __init__(self, run_dir: Path, purge_step: int | None = None):
        """`purge_step`: a run continued (or started over) in its directory; TensorBoard drops the
        events of earlier files at this step and after, so no step is shown twice."""
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir), flush_secs=10, purge_step=purge_step)
        self._hparams_open = False

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, body: str, step: int = 0) -> None:
        self.writer.add_text(tag, body, step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        """image: [3, height, width] (or [1, height, width]) with values in [0, 1]."""
        self.writer.add_image(tag, image.detach().float().clamp(0, 1).cpu(), step, dataformats="CHW")

    def layout(self, charts: Mapping[str, Mapping[str, list[str]]]) -> None:
        """A custom-scalars layout: {category: {chart title: [tag regexes drawn together]}}."""
        self.writer.add_custom_scalars({category: {title: ["Multiline", list(tags)] for title, tags in group.items()}
                                        for category, group in charts.items()})

    def hparams_start(self, hparams: Mapping[str, HParamValue]) -> None:
        """Record this run's hyperparameters for TensorBoard's HPARAMS tab (a None value is left blank).

        Written through the run's own file writer (torch's add_hparams would open a subfolder, which
        TensorBoard shows as a second run), and without an experiment summary: TensorBoard then builds
        the experiment from every run of the sweep, marks the hyperparameters that differ, and takes
        the runs' scalars (their last values: test/accuracy, val/accuracy, ...) as the metrics.
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        values = {name: (str(v).lower() if isinstance(v, bool) else v) for name, v in hparams.items()}
        _, session_start, _ = hparams_summaries(values, {})
        self.writer._get_file_writer().add_summary(session_start)
        self._hparams_open = True

    def hparams_continue(self) -> None:
        """A resumed run continues the session its first part started (TensorBoard keeps a tag's
        first record, so a second start would be ignored); hparams_end closes it."""
        self._hparams_open = True

    def hparams_end(self, succeeded: bool) -> None:
        """Close the run's hparams session as succeeded or failed (shown in the HPARAMS tab's Status)."""
        if not self._hparams_open:
            return
        self.writer._get_file_writer().add_summary(_session_end(succeeded))
        self._hparams_open = False

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class NullLogger:
    """What the ranks other than 0 log to under torch.distributed: nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _session_end(succeeded: bool) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME, SESSION_END_INFO_TAG
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

    status = Status.Value("STATUS_SUCCESS" if succeeded else "STATUS_FAILURE")
    content = HParamsPluginData(session_end_info=SessionEndInfo(status=status), version=PLUGIN_DATA_VERSION)
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME,
                                                                      content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=metadata)])
