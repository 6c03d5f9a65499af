"""CROW (Min et al., ICML 2025): ``CrowConfig`` and ``CrowTrainer``; ``run`` trains a model with them."""

from __future__ import annotations

from .config import ALPHA_PRESETS, CrowConfig


def run(model, tokenizer, records, config: CrowConfig, run_options=None, **kwargs):
    """CROW on ``records`` (the defender's clean samples): a ``PurifyResult``."""
    from ...training.loop import train
    from .trainer import CrowTrainer

    return train(model, tokenizer, records, config, CrowTrainer, run_options, **kwargs)


__all__ = ["ALPHA_PRESETS", "CrowConfig", "run"]
