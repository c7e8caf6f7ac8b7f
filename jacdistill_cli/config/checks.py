"""Value checks shared by every config group's entries: each raises `SettingError(key, value, allowed)`,
which the registry turns into one line naming the group's key (`jacobian.squared=2 is not allowed: ...`)."""

from __future__ import annotations

import math
from typing import Any, Iterable


class SettingError(Exception):
    """A setting out of range, named by its key inside the node (the registry adds the group)."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(key, value, allowed)
        self.key, self.value, self.allowed = key, value, allowed


def number(key: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False,
           allowed: str = "") -> float:
    """A finite number within [low, high] (or (low, high] with low_open)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        result = float(value)
    except (TypeError, ValueError):
        raise SettingError(key, value, allowed or "it must be a number") from None
    too_low = low is not None and (result <= low if low_open else result < low)
    if not math.isfinite(result) or too_low or (high is not None and result > high):
        raise SettingError(key, value, allowed)
    return result


def whole(key: str, value: Any, low: int = 1, allowed: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingError(key, value, allowed or f"it must be an integer >= {low}")
    return value


def one_of(key: str, value: Any, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise SettingError(key, value, f"it must be one of {', '.join(options)}")
    return value


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingError(key, value, "it must be true or false")
    return value
