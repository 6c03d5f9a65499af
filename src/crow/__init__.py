"""crow: tell whether an LLM is backdoored, remove the backdoor, and show that it is gone. ``purify`` runs a method's
config on the defender's clean samples (``UnlearnConfig``: the recommended recipe; ``CrowConfig``: CROW, Min et al.,
ICML 2025, arXiv 2411.12768); ``load_model`` loads a suspect model and adapter safely; ``evaluate`` measures attack
success, false triggers, perplexity and answer quality."""

import importlib

from .errors import CrowError, Interrupted, TrainingDiverged
from .losses import consistency_profile, fgsm_delta, layer_consistency_loss, layer_pairs
from .outputs import crow_version

__version__ = crow_version()

__all__ = ["ALPHA_PRESETS", "CrowConfig", "CrowError", "CrowTrainer", "Interrupted", "TrainingConfig",
           "TrainingDiverged", "UnlearnConfig", "consistency_profile", "evaluate", "fgsm_delta",
           "layer_consistency_loss", "layer_pairs", "load_model", "purify"]

_LAZY = {  # name -> module: the trainers, model loading and evaluation import transformers (seconds)
    "ALPHA_PRESETS": "crow.methods.crow.config", "CrowConfig": "crow.methods.crow.config", "purify": "crow.methods",
    "CrowTrainer": "crow.methods.crow.trainer", "UnlearnConfig": "crow.methods.unlearn.config",
    "TrainingConfig": "crow.training.config", "load_model": "crow.models", "evaluate": "crow.evaluation.evaluate"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crow' has no attribute {name!r}")
