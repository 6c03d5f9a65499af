"""Detectors: they flag, they do not repair. ``guard`` (run time: is this prompt triggered?) lives in
:mod:`crow.detection.guard`, with the LCF detector (:mod:`.lcf`) and the ONION baseline (:mod:`.onion`)."""
