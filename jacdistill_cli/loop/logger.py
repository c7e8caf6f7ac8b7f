"""TensorBoard logging into the run directory itself (event files directly there, no subfolder).

Everything a run logs lives in one event file in its own directory, so `tensorboard --logdir SWEEP_DIR`
shows each job of a sweep as one run, named by the job's directory: scalars, images, a custom-scalars
layout, and the run's hyperparameters for the HPARAMS tab.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from jacdistill_cli.records.resume import drop_session_end

HParamValue = int | float | str | bool | None

# The metrics the HPARAMS tab lists first (it shows the first five of the list as columns), then the rest
# of the runs' scalars in this order of prefixes.
LEADING_METRICS = ("test/accuracy", "test/agreement", "test/jacobian_cosine", "val/accuracy")
METRIC_PREFIX_ORDER = ("test/", "val/", "teacher/test_accuracy", "teacher/robust_accuracy/", "loss/", "teacher/")
EXPERIMENT_SUFFIX = ".experiment"  # the file name suffix of the sweep's experiment summary


def hparam_values(hparams: Mapping[str, HParamValue]) -> dict[str, float | str]:
    """Values as the HPARAMS tab shows them best: integers and booleans as text, None left out."""
    values: dict[str, float | str] = {}
    for name, value in hparams.items():
        if value is None:
            continue
        if isinstance(value, bool):
            values[name] = str(value).lower()
        elif isinstance(value, int):
            values[name] = str(value)
        else:
            values[name] = value
    return values


def metric_order(tag: str) -> tuple:
    """Sort key of a scalar tag in the HPARAMS tab: LEADING_METRICS in their order, then by prefix."""
    if tag in LEADING_METRICS:
        return (0, LEADING_METRICS.index(tag), tag)
    rank = next((i for i, prefix in enumerate(METRIC_PREFIX_ORDER) if tag.startswith(prefix)),
                len(METRIC_PREFIX_ORDER))
    return (1 + rank, 0, tag)


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
        TensorBoard shows as a second run). Integers are written as text, which the tab shows as they
        are (it prints every number with 5 significant digits: a seed of 1 would read 1.0000), and
        booleans as `true`/`false`. A run writes no experiment summary of its own: TensorBoard takes
        one summary for the whole log directory, so each run would hide the others' values; the sweep
        writes one for all its runs when it ends (write_sweep_experiment), and until then TensorBoard
        builds it from the runs.
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        _, session_start, _ = hparams_summaries(hparam_values(hparams), {})
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


@contextlib.contextmanager
def run_logger(run_dir: Path, main: bool, hparams: Mapping[str, HParamValue], continued_step: int | None = None,
               restart: bool = False) -> Iterator[RunLogger | NullLogger]:
    """Rank 0's TensorBoard writer in the run directory for the block (the other ranks log nothing), its
    hparams session ended as succeeded when the block ends normally, failed otherwise. Continued from
    `continued_step`: earlier files' events after it are dropped; started over (`restart`): all of them."""
    if not main:
        yield NullLogger()
        return
    if continued_step is not None or restart:
        drop_session_end(run_dir)  # the interrupted session's end; this one ends it again
    logger = RunLogger(run_dir, purge_step=continued_step + 1 if continued_step is not None else 0 if restart
                       else None)
    if continued_step is None:
        logger.hparams_start(hparams)  # its metrics: the final test/..., val/... scalars
    else:
        logger.hparams_continue()
    succeeded = False
    try:
        yield logger
        succeeded = True
    finally:
        logger.hparams_end(succeeded)
        logger.close()


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


def sweep_experiment(sweep_dir: Path) -> Any:
    """The HPARAMS experiment of the runs under `sweep_dir` as TensorBoard's own hparams backend builds
    it from them (each hyperparameter's type, whether it differs between runs, the metrics: every scalar
    tag), with the metrics reordered by metric_order and no list of allowed values for text
    hyperparameters (the tab would otherwise hide the runs of another sweep in the same log directory
    whose values are not in it); and the directory of the first of those runs by name. (None, None) when
    no run under it has hyperparameters."""
    import logging

    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.context import RequestContext
    from tensorboard.plugins.base_plugin import TBContext
    from tensorboard.plugins.hparams.backend_context import Context
    from tensorboard.plugins.hparams.metadata import SESSION_START_INFO_TAG

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # no per-file chatter in the sweep's log
    sweep_dir = str(sweep_dir)
    # Scalars only, one value each: their tags are the metrics; images and the rest are not loaded.
    multiplexer = EventMultiplexer(size_guidance={"scalars": 1, "images": 1, "tensors": 1, "histograms": 1})
    multiplexer.AddRunsFromDirectory(sweep_dir)
    multiplexer.Reload()
    backend = Context(TBContext(logdir=sweep_dir, data_provider=MultiplexerDataProvider(multiplexer, sweep_dir)))
    request = RequestContext()
    content = backend.hparams_metadata(request, "")
    experiment = backend.experiment_from_metadata(request, "", True, content,
                                                  backend.hparams_from_data_provider(request, "", limit=None))
    sessions = sorted(run for run, tags in content.items() if SESSION_START_INFO_TAG in tags)
    if not experiment.hparam_infos or not sessions:
        return None, None
    metrics = sorted(experiment.metric_infos, key=lambda info: metric_order(info.name.tag))
    del experiment.metric_infos[:]
    experiment.metric_infos.extend(metrics)
    for info in experiment.hparam_infos:
        if info.HasField("domain_discrete"):
            info.ClearField("domain_discrete")
    return experiment, Path(sweep_dir) / sessions[0]


def write_sweep_experiment(sweep_dir: Path) -> Path | None:
    """Write the HPARAMS experiment of the sweep's runs (sweep_experiment) into an event file of its own in
    the directory of the sweep's first run (by name), replacing one written before anywhere in the sweep;
    TensorBoard uses it instead of building its own, so the tab leads with LEADING_METRICS. In a run's
    directory it adds no run to TensorBoard's lists (an event file directly in the sweep directory would
    be a run named `.`). Returns the file, or None when there is nothing to summarise."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams.metadata import EXPERIMENT_TAG, create_summary_metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.writer import FileWriter

    sweep_dir = Path(sweep_dir)
    for old in sweep_dir.rglob(f"events.out.tfevents.*{EXPERIMENT_SUFFIX}"):
        old.unlink()
    experiment, first_run = sweep_experiment(sweep_dir)
    if experiment is None:
        return None
    metadata = create_summary_metadata(HParamsPluginData(experiment=experiment))
    writer = FileWriter(str(first_run), filename_suffix=EXPERIMENT_SUFFIX)
    writer.add_summary(Summary(value=[Summary.Value(tag=EXPERIMENT_TAG, metadata=metadata)]))
    writer.close()
    return next(first_run.glob(f"events.out.tfevents.*{EXPERIMENT_SUFFIX}"))
