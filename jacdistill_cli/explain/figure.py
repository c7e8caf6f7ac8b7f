"""The deletion and insertion curves of faithfulness() as an image for TensorBoard: two panels, one line per
network for its saliency (solid) and one for its random orders (dotted), areas in the legend.

Drawn with matplotlib's object API on an Agg canvas (no pyplot: no global backend, no window, no state
shared with other figures); matplotlib's config and font cache go to a temporary directory unless the user
set MPLCONFIGDIR, so that drawing writes nothing under the home directory.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Mapping

import numpy as np

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def private_matplotlib_config() -> None:
    """Point matplotlib's config and font cache (MPLCONFIGDIR) at a temporary directory (removed at exit) before
    matplotlib is first imported, so that drawing a figure writes nothing outside where it is asked to (by
    default matplotlib builds its font cache under ~/.cache/matplotlib); a MPLCONFIGDIR the user set, or a
    matplotlib already imported, is left as it is."""
    if "matplotlib" in sys.modules or os.environ.get("MPLCONFIGDIR"):
        return
    folder = tempfile.mkdtemp(prefix="jacdistill-matplotlib-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["MPLCONFIGDIR"] = folder


def _panel(axes, results: Mapping[str, Mapping[str, Any]], kind: str) -> None:
    for colour, (label, result) in zip(COLOURS * 4, results.items()):
        fractions = result["fractions"]
        axes.plot(fractions, result[f"{kind}_curve"], color=colour,
                  label=f"{label} saliency (area {result[f'{kind}_area']:.3f})")
        axes.plot(fractions, result[f"random_{kind}_curve"], color=colour, linestyle=":",
                  label=f"{label} random (area {result[f'random_{kind}_area']:.3f})")
    better = "lower" if kind == "deletion" else "higher"
    axes.set_title(f"{kind} ({better} area is better)", fontsize=10)
    axes.set_xlabel(f"fraction of pixels {'deleted' if kind == 'deletion' else 'inserted'}", fontsize=9)
    axes.set_ylabel("probability of the predicted class", fontsize=9)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    if results:
        axes.legend(fontsize=7)


def curves_image(results: Mapping[str, Mapping[str, Any]], dpi: int = 80) -> np.ndarray:
    """The curves of faithfulness() results by network ({"student": ..., "teacher": ...}; empty results
    are left out) as an RGB image, numpy [H, W, 3] uint8 (TensorBoard's add_image with dataformats="HWC")."""
    private_matplotlib_config()
    logging.getLogger("matplotlib").setLevel(logging.WARNING)   # no font-cache chatter
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = {label: result for label, result in results.items() if result}
    figure = Figure(figsize=(10, 4), dpi=dpi)
    canvas = FigureCanvasAgg(figure)
    deletion, insertion = figure.subplots(1, 2)
    _panel(deletion, shown, "deletion")
    _panel(insertion, shown, "insertion")
    samples = sorted({int(result.get("samples", 0)) for result in shown.values()})
    figure.suptitle(f"faithfulness of each network's own saliency, {'/'.join(map(str, samples))} samples",
                    fontsize=10)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
