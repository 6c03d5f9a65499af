"""Training a victim: a LoRA backdoor learned from a poisoned mix with BackdoorLLM's recipe."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..data.records import Record
from ..purification import LoraSettings, PurifyResult, purify
from ..trainer import CrowConfig


@dataclass
class VictimRecipe:
    """BackdoorLLM's LoRA recipe: r 8, lr 2e-4, 5 epochs, batch 2 x accumulation 4, cosine, warmup 0.1."""

    lora_r: int = 8
    lora_alpha: int = 16
    learning_rate: float = 2e-4
    epochs: float = 5.0
    batch_size: int = 2
    grad_accum: int = 4
    warmup: float = 0.1
    scheduler: str = "cosine"
    max_length: int = 256
    template: str = "alpaca"
    seed: int = 42

    def to_dict(self) -> dict:
        return asdict(self)


def train_victim(model, tokenizer, mix: Sequence[Record], recipe: VictimRecipe | None = None, *,
                 output_dir: str, disable_tqdm: bool = False) -> PurifyResult:
    """Plain supervised finetuning of a new LoRA adapter on ``mix`` (CROW's trainer with alpha 0)."""
    recipe = recipe or VictimRecipe()
    config = CrowConfig(
        output_dir=output_dir, crow_alpha=0.0, learning_rate=recipe.learning_rate, num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.batch_size, gradient_accumulation_steps=recipe.grad_accum,
        warmup_steps=recipe.warmup, lr_scheduler_type=recipe.scheduler, seed=recipe.seed, save_strategy="no",
        disable_tqdm=disable_tqdm, logging_steps=10,
    )
    lora = LoraSettings(r=recipe.lora_r, alpha=recipe.lora_alpha)
    return purify(model, tokenizer, mix, config, template=recipe.template, max_length=recipe.max_length, lora=lora)
