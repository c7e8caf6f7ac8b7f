"""The composed config, read once by a run spec's builder (spec/build.py), which records every key it reads.

Each setting is read through a `Reader`: a value checked in one line (`KEY=VALUE is not allowed: ...`), or a
whole node handed to its `_target_` (config/registry.py). What the builder never read is `unread()`: a key a
command composes and never reads would be accepted and do nothing, so the tests require it to be empty for
every command's composed config (it is read, or refused in one line).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from jacdistill_cli.config import checks
from jacdistill_cli.config.checks import SettingError
from jacdistill_cli.errors import UsageError, setting_error

_MISSING = object()


def leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key path of a config down to its values (a list is one value): `trainer.epochs`, ..."""
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            child = node._get_node(key)
            keys += leaf_keys(child, f"{path}.") if isinstance(child, DictConfig) and len(child) else [path]
    return keys


class Reader:
    """Reads `cfg` (a composed DictConfig) and remembers what it read."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.read: set[str] = set()

    def has(self, key: str) -> bool:
        """Whether the config holds `key` (not recorded as read)."""
        node: Any = self.cfg
        for part in key.split("."):
            if not isinstance(node, DictConfig) or part not in node:
                return False
            node = node._get_node(part)
        return True

    def value(self, key: str, default: Any = _MISSING) -> Any:
        """The value at `key` (a node as its DictConfig); `default` when the config has no such key."""
        self.read.add(key)
        if default is not _MISSING and not self.has(key):
            return default
        return OmegaConf.select(self.cfg, key, throw_on_missing=True)

    def plain(self, key: str, default: Any = _MISSING) -> Any:
        """The value at `key` as plain Python (a node resolved into dicts and lists)."""
        found = self.value(key, default)
        return OmegaConf.to_container(found, resolve=True) if isinstance(found, (DictConfig, ListConfig)) else found

    def node(self, key: str) -> DictConfig | None:
        """The node at `key`, all of it read (it is handed to what builds it); None when absent or null."""
        found = self.value(key, None)
        return found if isinstance(found, DictConfig) else None

    def _checked(self, check: Callable, key: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return check(key, self.value(key), *args, **kwargs)
        except SettingError as err:
            raise setting_error(err.key, err.value, err.allowed) from None

    def real(self, key: str, low: float | None = None, high: float | None = None, low_open: bool = False,
             allowed: str = "") -> float:
        """A finite number within [low, high] (or (low, high] with low_open)."""
        return self._checked(checks.number, key, low, high, low_open, allowed)

    def integer(self, key: str, low: int = 1, allowed: str = "") -> int:
        return self._checked(checks.whole, key, low, allowed)

    def optional_integer(self, key: str, low: int = 1, allowed: str = "") -> int | None:
        """An integer >= low, or null (also when the config has no such key)."""
        if self.value(key, None) is None:
            return None
        return self.integer(key, low, allowed)

    def choice(self, key: str, options: Iterable[str]) -> str:
        return self._checked(checks.one_of, key, options)

    def flag(self, key: str) -> bool:
        return self._checked(checks.boolean, key)

    def unread(self) -> list[str]:
        """The config's keys that no read reached (neither the key nor a node above it)."""
        def reached(key: str) -> bool:
            parts = key.split(".")
            return any(".".join(parts[:i]) in self.read for i in range(1, len(parts) + 1))

        return [key for key in leaf_keys(self.cfg) if not reached(key)]

    def refuse_unless_null(self, key: str, why: str) -> None:
        """A key that this command composes but cannot use: refused unless it is null (or absent)."""
        found = self.plain(key, None)
        if found is not None:
            raise UsageError(f"{key}={found} is not allowed: {why}")
