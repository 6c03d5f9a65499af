"""TrainingConfig: the training recipe every crow method shares (defaults: the official CROW recipe), which a method's
config subclasses; its field names are the only spelling of an option (``crow purify``'s flags, bench specs, API)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import CrowError

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


def check(condition: bool, name: str, requirement: str, value, default=None) -> None:
    """Raise the one-line error of a bad setting: ``name`` must be ``requirement``, got ``value`` (default ...)."""
    if not condition:
        hint = f" (default {default})" if default is not None else ""
        raise CrowError(f"{name} must be {requirement}, got {value!r}{hint}")


def finite(value, low: float = 0.0, *, strict: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > low if strict else value >= low))


def whole(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def option(default, help: str, **metadata):
    """A config field: its default and its ``--flag``'s help (``metadata``: e.g. ``choices``)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainingConfig:
    """What a training defense trains and how: the optimizer recipe (CROW's: Min et al., ICML 2025, Sec. 5 and the
    released scripts), what is trainable (the suspect adapter, a new LoRA, or every weight) and the run's logging."""

    learning_rate: float = option(1e-3, "Learning rate (CROW paper: 1e-3 with LoRA).")
    epochs: float = option(5.0, "Epochs over the clean samples (CROW paper: 5 over 100).")
    batch_size: int = option(2, "Samples per device and micro-batch (CROW paper: 2).")
    grad_accum: int = option(4, "Gradient accumulation steps (CROW paper: 4, a batch of 8).")
    warmup: float = option(0.1, "Learning-rate warm-up: a ratio of the steps if < 1, else steps (CROW paper: 0.1).")
    scheduler: str = option("cosine", "Learning-rate schedule (CROW paper: cosine).", choices=SCHEDULERS)
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    seed: int = option(42, "Seed of the sample order and of a new adapter's initialisation (crow bench: the cell's "
                           "seed unless its spec sets one).")
    full_finetune: bool = option(False, "Train every weight instead of a LoRA adapter (needs a model without an "
                                        "adapter).")
    lora_r: int = option(8, "Rank of a new LoRA adapter, when the model has none (CROW paper: 8); a suspect adapter is "
                            "trained as it is.")
    lora_alpha: int = option(16, "Alpha of a new LoRA adapter (CROW paper: 16).")
    lora_dropout: float = option(0.0, "Dropout of a new LoRA adapter (CROW paper: 0).")
    logging_steps: int = option(5, "Log the method's metrics every N optimizer steps.")
    gradient_checkpointing: bool = option(False, "Non-reentrant activation checkpointing (less memory, one more "
                                                 "forward).")
    bf16: bool = option(False, "bf16 mixed precision (a GPU that supports it).")

    def __post_init__(self) -> None:
        check(finite(self.learning_rate, strict=True), "learning_rate", "a number > 0", self.learning_rate)
        check(finite(self.epochs, strict=True), "epochs", "a number > 0", self.epochs)
        check(whole(self.batch_size, 1), "batch_size", "an integer >= 1", self.batch_size)
        check(whole(self.grad_accum, 1), "grad_accum", "an integer >= 1", self.grad_accum)
        check(finite(self.warmup), "warmup", "a number >= 0 (a ratio < 1, else steps)", self.warmup)
        check(self.scheduler in SCHEDULERS, "scheduler", f"one of {', '.join(SCHEDULERS)}", self.scheduler)
        check(isinstance(self.max_steps, int) and self.max_steps >= -1 and self.max_steps != 0, "max_steps",
              "-1 or an integer >= 1", self.max_steps)
        check(whole(self.seed), "seed", "an integer >= 0", self.seed)
        check(whole(self.lora_r, 1), "lora_r", "an integer >= 1", self.lora_r)
        check(whole(self.lora_alpha, 1), "lora_alpha", "an integer >= 1", self.lora_alpha)
        check(finite(self.lora_dropout) and self.lora_dropout < 1, "lora_dropout", "in [0, 1)", self.lora_dropout)
        check(whole(self.logging_steps, 1), "logging_steps", "an integer >= 1", self.logging_steps)
        self.validate()

    def validate(self) -> None:
        """The method's own checks (one-line ``CrowError`` messages naming the field)."""

    def input_grad_user(self) -> str | None:
        """What needs ``torch.autograd.grad`` under these settings (no reentrant checkpointing then); None: nothing."""
        return None

    def settings(self) -> dict:
        """Every field with its value: what a run of this config is."""
        return dataclasses.asdict(self)

    def lora(self):
        """The ``peft.LoraConfig`` of a new adapter (every linear layer, as the official code)."""
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")

    def training_arguments(self, output_dir: str, **run):
        """The recipe's ``transformers.TrainingArguments``; ``run``: how the run is executed, never what it learns."""
        from transformers import TrainingArguments

        from ..models import default_device

        kwargs = dict(output_dir=output_dir, learning_rate=self.learning_rate, num_train_epochs=self.epochs,
                      max_steps=self.max_steps, per_device_train_batch_size=self.batch_size,
                      gradient_accumulation_steps=self.grad_accum, warmup_steps=self.warmup,
                      lr_scheduler_type=self.scheduler, seed=self.seed, logging_steps=self.logging_steps,
                      bf16=self.bf16, save_strategy="no", report_to="none", remove_unused_columns=False,
                      use_cpu=default_device().type == "cpu")  # CPU under torchrun: gloo DDP, not one run per process
        if self.gradient_checkpointing:
            kwargs.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
        kwargs.update(run)
        reentrant = (kwargs.get("gradient_checkpointing_kwargs") or {}).get("use_reentrant", False)
        if kwargs.get("gradient_checkpointing") and reentrant and self.input_grad_user():
            raise CrowError(f"reentrant gradient checkpointing forbids torch.autograd.grad, which "
                            f"{self.input_grad_user()}; drop use_reentrant=True (crow checkpoints non-reentrantly)")
        try:
            return TrainingArguments(**kwargs)
        except ValueError as e:  # TrainingArguments' own checks (bf16 without a GPU, ...)
            raise CrowError(f"invalid training settings: {str(e).strip().splitlines()[0]}") from None
