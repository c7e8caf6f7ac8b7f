"""The status a run records in metrics.json, one name each: what `report` and resuming read back."""

from __future__ import annotations

FINISHED, INTERRUPTED, DIVERGED, REFUSED = "finished", "interrupted", "diverged", "refused"
