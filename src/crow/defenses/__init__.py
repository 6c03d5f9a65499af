"""Defenses: CROW and the baselines it is compared with. ``get_defense(name, **settings)`` builds one.

``base`` is the interface (``Defense``, ``DefenseContext``); ``registry`` holds the defenses and their
names and imports ``base``, never the other way round.
"""

from .base import Defense, DefenseContext
from .registry import DEFENSES, get_defense, register

__all__ = ["DEFENSES", "Defense", "DefenseContext", "get_defense", "register"]
