"""Defenses behind one registry (unlearn, CROW and the baselines of its comparison): ``get_defense(name, **settings)``
builds one; ``training`` and ``weights`` register theirs (``registry``: ``none``); ``base`` is the interface."""

from . import training, weights  # noqa: F401  (they register the defenses, in this order: unlearn, crow, the baselines)
from .base import Defense, DefenseContext
from .registry import DEFENSES, get_defense

__all__ = ["DEFENSES", "Defense", "DefenseContext", "get_defense"]
