"""The faithfulness of the student's and the teacher's own explanations at the end of a train run
(explain=NAME; explain/faithfulness.py), as metrics.json's entries, TensorBoard's scalars and an image of the
curves. Under torch.distributed each rank measures its blocks of samples and the sums are reduced."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jacdistill_cli.explain.faithfulness import faithfulness
from jacdistill_cli.explain.figure import curves_image
from jacdistill_cli.explain.settings import ExplainSettings
from jacdistill_cli.loop.distributed import World, reduce_sums
from jacdistill_cli.robustness.pixels import Pixels

AREAS = ("deletion_area", "insertion_area", "random_deletion_area", "random_insertion_area")


def faithfulness_metrics(distiller: Any, data: Any, device: torch.device, world: World,
                         settings: ExplainSettings) -> dict[str, Any]:
    """{"faithfulness": {"student": {...}, "teacher": {...}}} on the test split ({} with explain=none)."""
    if not settings.enabled:
        return {}
    pixels = Pixels.of(data)
    common = dict(part=(world.rank, world.size), reduce=lambda values: reduce_sums(values, world, device))
    networks = {"student": distiller.student, "teacher": distiller.teacher}
    return {"faithfulness": {name: faithfulness(net, data.test, pixels, device, settings, **common)
                             for name, net in networks.items()}}


def faithfulness_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """test/explain/<network>/<area> for TensorBoard (and the HPARAMS tab's metrics)."""
    return {f"test/explain/{name}/{key}": result[key] for name, result in metrics.get("faithfulness", {}).items()
            for key in AREAS}


def faithfulness_image(results: dict[str, Any]) -> Tensor:
    """The deletion and insertion curves of both networks, [3, H, W] in [0, 1]."""
    return torch.from_numpy(curves_image(results)).permute(2, 0, 1).float() / 255
