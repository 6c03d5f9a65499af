"""crow: remove backdoors from LLMs with CROW (Min, Pham, Li, Sun, ICML 2025, arXiv 2411.12768)."""

from .errors import CrowError, Interrupted, TrainingDiverged
from .losses import consistency_profile, fgsm_delta, layer_consistency_loss, layer_pairs
from .outputs import crow_version

__version__ = crow_version()

__all__ = [
    "ALPHA_PRESETS",
    "CrowConfig",
    "CrowError",
    "CrowTrainer",
    "Interrupted",
    "LoraSettings",
    "TrainingDiverged",
    "consistency_profile",
    "evaluate",
    "fgsm_delta",
    "layer_consistency_loss",
    "layer_pairs",
    "load_model",
    "purify",
]


def __getattr__(name):
    # The Trainer, model loading and evaluation import transformers (seconds): load them on first use
    # so `import crow` and the pure loss functions stay light.
    if name in ("CrowConfig", "CrowTrainer", "ALPHA_PRESETS"):
        from . import trainer
        return getattr(trainer, name)
    if name in ("purify", "LoraSettings"):
        from . import purification as module
        return getattr(module, name)
    if name == "load_model":
        from .models import load_model
        return load_model
    if name == "evaluate":
        from .evaluation.evaluate import evaluate
        return evaluate
    raise AttributeError(f"module 'crow' has no attribute {name!r}")
