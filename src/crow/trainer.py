"""CrowConfig and CrowTrainer: CROW as a ``transformers.Trainer`` whose loss has one extra term.

One optimizer micro-step (``compute_loss``), for a batch of clean samples:

1. forward the wrapped model on the clean inputs with hidden states; the logits of the response
   positions only give the LM loss, the hidden states the clean consistency loss;
2. ``torch.autograd.grad`` of the clean consistency loss with respect to the input embeddings only
   (captured by a hook), no parameter gradients: ``delta = epsilon * sign(grad)``, detached;
3. forward the wrapped model again with ``delta`` added to its embeddings, keeping hidden states
   and no logits: the perturbed consistency loss;
4. return ``LM(clean) + alpha * consistency(perturbed)``; the Trainer does the one backward.

The official code runs three forwards and two full backwards, calls ``zero_grad()`` inside the
loss (which erases the gradients of earlier micro-batches under gradient accumulation) and keeps
three graphs alive. Here: two forwards, one input-only backward, one backward, no ``zero_grad``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .errors import CrowError, TrainingDiverged
from .hooks import capture_embeddings, perturb_embeddings
from .models import default_device
from .losses import (
    causal_lm_loss_sum,
    fgsm_delta,
    layer_consistency_loss,
    logits_needed,
    parse_layer_range,
)

logger = logging.getLogger(__name__)

# The paper's alpha per target task: targeted refusal needs the stronger regularizer (Sec. 5).
ALPHA_PRESETS: dict[str, float] = {"negsentiment": 5.5, "refusal": 11.0, "codeinjection": 5.5}


@dataclass
class RecipeConfig(TrainingArguments):
    """The Trainer defaults of the official CROW recipe (Min et al., ICML 2025, Sec. 5 / the released
    scripts), shared by every crow trainer (``CrowConfig``, ``crow.unlearn.UnlearnConfig``): a method's
    config subclasses it and adds only its own prefixed fields."""

    # --- the official recipe, as Trainer defaults ---
    learning_rate: float = field(default=1e-3, metadata={"help": "Paper: 1e-3 (LoRA)."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Paper: 5 epochs over 100 clean samples."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Paper: 2."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Paper: 4 (effective batch 8)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Paper: warmup ratio 0.1 (a float < 1 is a ratio)."})
    logging_steps: float = field(default=5, metadata={"help": "Log the method's metrics every N optimizer steps."})
    save_strategy: str = field(default="no", metadata={"help": "crow purify saves the final adapter itself."})
    report_to: str | list[str] | None = field(default="none", metadata={"help": "No tracker unless asked."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep crow's tokenized columns."})

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = "crow_output"
        if not self.use_cpu and not _has_accelerator():
            # On a machine with no accelerator, say so: under torchrun / accelerate launch the Trainer
            # then starts gloo DDP over the CPU processes instead of training each process alone.
            self.use_cpu = True
        super().__post_init__()
        self.validate()
        if self.gradient_checkpointing:
            kwargs = dict(self.gradient_checkpointing_kwargs or {})
            user = self.input_grad_user()
            if kwargs.get("use_reentrant", False) and user:
                raise CrowError(
                    f"reentrant gradient checkpointing forbids torch.autograd.grad, which {user}; drop "
                    "use_reentrant=True (crow uses non-reentrant checkpointing by default)"
                )
            kwargs.setdefault("use_reentrant", False)
            self.gradient_checkpointing_kwargs = kwargs

    def validate(self) -> None:
        """The method's own checks (one-line ``CrowError`` messages)."""

    def input_grad_user(self) -> str | None:
        """What needs ``torch.autograd.grad`` under these settings (for the checkpointing error); None: nothing."""
        return None


@dataclass
class CrowConfig(RecipeConfig):
    """Training arguments of CROW. The ``crow_*`` fields are CROW's own; the overridden Trainer
    defaults are the official recipe (Min et al., ICML 2025, Sec. 5 / the released scripts)."""

    crow_alpha: float = field(
        default=5.5,
        metadata={"help": "Weight of the consistency term. Paper: 5.5; 11 for targeted refusal "
                  "(ALPHA_PRESETS). 0 turns CROW into plain finetuning."},
    )
    crow_epsilon: float = field(
        default=0.1,
        metadata={"help": "FGSM step on the input embeddings, e + eps * sign(grad). Paper: 0.1. "
                  "0 regularizes the clean hidden states only (no perturbation, one forward)."},
    )
    crow_layers: str = field(
        default="official",
        metadata={"help": "Layer pairs of the consistency loss: 'official' (hs[1:-2] vs hs[2:-1], as the "
                  "paper's code), 'all' (every consecutive pair) or 'START:STOP' (pairs START..STOP-1)."},
    )
    crow_token_scope: str = field(
        default="all",
        metadata={"help": "Positions averaged: 'all' (official, padding included) or 'masked' (real tokens only)."},
    )

    def validate(self) -> None:
        if not (self.crow_alpha >= 0 and math.isfinite(self.crow_alpha)):
            raise CrowError(f"crow_alpha must be a finite number >= 0, got {self.crow_alpha} (paper: 5.5, 11 for refusal)")
        if not (self.crow_epsilon >= 0 and math.isfinite(self.crow_epsilon)):
            raise CrowError(f"crow_epsilon must be a finite number >= 0, got {self.crow_epsilon} (paper: 0.1)")
        if self.crow_token_scope not in ("all", "masked"):
            raise CrowError(f"crow_token_scope must be 'all' or 'masked', got {self.crow_token_scope!r}")
        if self.crow_layers not in ("official", "all"):
            parse_layer_range(self.crow_layers)
        if self.crow_epsilon > 1.0:
            logger.warning("crow_epsilon=%s is far above the paper's 0.1: the perturbation may swamp the embeddings",
                           self.crow_epsilon)

    def input_grad_user(self) -> str | None:
        return "CROW needs for its perturbation" if self.crow_alpha > 0 and self.crow_epsilon > 0 else None


def _has_accelerator() -> bool:
    return default_device().type != "cpu"


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class LossTrainer(Trainer):
    """What every crow trainer shares: a ``compute_loss`` that adds terms to the LM loss of the response
    tokens, normalized for gradient accumulation (the LM term over the target tokens of the whole
    accumulated batch, ``num_items_in_batch``; a method's extra terms divided by the accumulation steps
    by the method itself), metrics collected in ``self._metrics`` and averaged into the Trainer's log,
    and a NaN/inf loss stopped with ``TrainingDiverged``."""

    # compute_loss normalizes the LM term by the target tokens of the whole accumulated batch
    # (num_items_in_batch) and divides the extra terms by the accumulation steps itself.
    loss_is_scaled_for_ga = True
    #: the config class the trainer needs (checked at construction)
    config_class: type = RecipeConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, self.config_class):
            raise CrowError(f"{type(self).__name__} needs a {self.config_class.__name__} as args, got "
                            f"{type(self.args).__name__}")
        # Ask the Trainer to count target tokens over the accumulated batch (it only does so for
        # models that "accept loss kwargs"); we never pass them to the model.
        self.model_accepts_loss_kwargs = True
        self._keeps_logits = _accepts_logits_to_keep(self.accelerator.unwrap_model(self.model))
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._last_finite: deque[float] = deque(maxlen=5)

    def _accumulation_steps(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", 1) if self.model.training else 1

    def _normalize_lm(self, lm_sum, n_targets, num_items_in_batch) -> torch.Tensor:
        if num_items_in_batch is None:  # outside the training loop: a per-micro-batch mean
            return lm_sum / n_targets.clamp_min(1) / self._accumulation_steps()
        loss = lm_sum / num_items_in_batch
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return loss

    def _check_finite(self, loss: torch.Tensor) -> None:
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise TrainingDiverged(self.state.global_step + 1, value, list(self._last_finite))
        self._last_finite.append(value * self._accumulation_steps())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for name, values in self._metrics.items():
            if values:
                logs[name] = round(sum(values) / len(values), 6)
        self._metrics.clear()
        super().log(logs, start_time)


class CrowTrainer(LossTrainer):
    """``transformers.Trainer`` with CROW's loss. Logs ``lm_loss``, ``consistency_clean``,
    ``consistency_perturbed`` and ``input_grad_zero_share`` (share of exactly-zero entries of the input
    gradient: ``sign(0) = 0`` means those entries get no perturbation, e.g. under fp16 underflow)."""

    config_class = CrowConfig

    # --------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: CrowConfig = self.args
        labels = inputs["labels"]  # [B, T], -100 on prompt and padding
        attention_mask = inputs.get("attention_mask")
        regularize = args.crow_alpha > 0
        perturb = regularize and args.crow_epsilon > 0
        embedding = self.accelerator.unwrap_model(model).get_input_embeddings()

        forward = {"input_ids": inputs["input_ids"], "attention_mask": attention_mask, "use_cache": False}
        if self._keeps_logits:  # logits of the response positions only
            forward["logits_to_keep"] = logits_needed(labels)

        # Pass 1: clean inputs -> LM loss and clean hidden states.
        with capture_embeddings(embedding, require_grad=perturb) as tap:
            outputs = model(**forward, output_hidden_states=regularize)
        lm_sum, n_targets = causal_lm_loss_sum(outputs.logits, labels)
        loss = self._normalize_lm(lm_sum, n_targets, num_items_in_batch)
        self._metrics["lm_loss"].append((lm_sum / n_targets.clamp_min(1)).item())

        if regularize:
            consistency = self._consistency(outputs.hidden_states, attention_mask)
            self._metrics["consistency_clean"].append(consistency.item())
            if perturb:
                # Input-only backward: gradients w.r.t. the embeddings, none w.r.t. parameters.
                (grad,) = torch.autograd.grad(consistency, tap.embeddings, retain_graph=True)
                self._metrics["input_grad_zero_share"].append((grad == 0).float().mean().item())
                delta = fgsm_delta(grad, args.crow_epsilon)  # [B, T, H]
                # Pass 2: perturbed inputs -> hidden states only (one logit row, not T).
                if self._keeps_logits:
                    forward["logits_to_keep"] = 1
                with perturb_embeddings(embedding, delta):
                    perturbed = model(**forward, output_hidden_states=True)
                consistency = self._consistency(perturbed.hidden_states, attention_mask)
                self._metrics["consistency_perturbed"].append(consistency.item())
            loss = loss + args.crow_alpha * consistency / self._accumulation_steps()

        self._check_finite(loss)
        return (loss, outputs) if return_outputs else loss

    # --------------------------------------------------------------------------------------------
    def _consistency(self, hidden_states, attention_mask) -> torch.Tensor:
        return layer_consistency_loss(
            hidden_states, attention_mask, layers=self.args.crow_layers, token_scope=self.args.crow_token_scope
        )
