"""Detectors: model-level backdoor scanning (``scan``) and, beside it, per-prompt detection.

They sit beside the defenses (DESIGN.md): their own small registries, the same evaluation records,
no import back into the trainer or the bench.
"""
