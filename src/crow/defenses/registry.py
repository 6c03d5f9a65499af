"""The defenses' registry: ``get_defense(name, **settings)`` builds one; each defense module registers its own."""

from __future__ import annotations

from ..errors import CrowError
from ..registry import Registry
from .base import Defense

DEFENSES: Registry[Defense] = Registry("defense")


def get_defense(name: str, **settings) -> Defense:
    """A defense by name with optional settings; unknown names and settings are errors that list the valid ones."""
    return DEFENSES.build(name, **settings)


def is_reference(name: str, settings: dict) -> bool:
    """Whether a defense with these settings is a reference (it knows more than a defender: reinit-adapter, an oracle
    target), also for settings the current code no longer runs (a report of recorded cells)."""
    try:
        return get_defense(name, **settings).reference
    except CrowError:
        return bool(getattr(DEFENSES.get(name), "reference", False) or settings.get("target") is not None)


@DEFENSES.register("none")
class NoDefense(Defense):
    """Nothing: the victim itself, the row every defense is compared with."""

    name = "none"
    changes = "nothing"

    def repair(self, model, tokenizer, ctx):
        return model
