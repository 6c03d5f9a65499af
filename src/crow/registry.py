"""One registry for every family of named, configurable parts (defenses, guard methods, scan methods): a name maps to
a factory, and every mistake is one ``CrowError`` line that names what was given and lists the valid choices."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import CrowError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named factories of one ``kind`` ("defense", "guard method", ...), in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T] | None = None):
        """``@registry.register("name")`` on a class, or ``registry.register("name", factory)``."""
        def add(entry):
            if name in self._entries:
                raise CrowError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry
        return add(factory) if factory is not None else add

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise CrowError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}")
        return self._entries[name]

    def build(self, name: str, **settings) -> T:
        """The ``name`` entry built with ``settings``, checked against the settings its factory takes: its
        ``setting_names()``, else a dataclass's init fields (a factory with neither takes none)."""
        factory = self.get(name)
        valid = None
        if hasattr(factory, "setting_names"):
            valid = set(factory.setting_names())
        elif dataclasses.is_dataclass(factory):
            valid = {f.name for f in dataclasses.fields(factory) if f.init}
        if valid is not None:
            unknown = sorted(set(settings) - valid)
            if unknown:
                raise CrowError(f"{self.kind} {name!r} has no setting {unknown[0]!r}; valid: "
                                f"{', '.join(sorted(valid)) or 'none'}")
        elif settings:
            raise CrowError(f"{self.kind} {name!r} takes no settings, got {sorted(settings)}")
        return factory(**settings)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
