"""Detectors flag, they do not repair: :mod:`.scan` (is this model backdoored, and what does it say when triggered?)
and :mod:`.guard` (is this prompt triggered?: :mod:`.lcf`, :mod:`.onion`, :mod:`.target`)."""

from . import lcf, onion, target  # noqa: E402,F401  (each registers its guard methods in guard.DETECTORS)
