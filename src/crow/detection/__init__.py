"""Detectors: they flag, they do not repair. ``scan`` (model level: is this model backdoored, and what does it
say when triggered?) lives in :mod:`crow.detection.scan`; ``guard`` (run time: is this prompt triggered?) in
:mod:`crow.detection.guard`, with the LCF detector (:mod:`.lcf`), the ONION baseline (:mod:`.onion`) and the
target guard (:mod:`.target`, which watches for the target the scan recovers).

They sit beside the defenses (DESIGN.md): their own small registries, the same evaluation records, no import
back into the trainer or the bench.
"""

from . import lcf, onion, target  # noqa: E402,F401  (each registers its guard method in guard.DETECTORS)
