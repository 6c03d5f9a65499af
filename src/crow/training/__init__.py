"""What every training method shares: the config (``TrainingConfig``), the trainer base (``LossTrainer``), the loop."""

from .config import TrainingConfig
from .loop import LossTrainer, PurifyResult, RunOptions, is_peft_model, make_trainable, merged, save_model, train

__all__ = ["LossTrainer", "PurifyResult", "RunOptions", "TrainingConfig", "is_peft_model", "make_trainable",
           "merged", "save_model", "train"]
