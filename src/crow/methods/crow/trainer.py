"""CrowTrainer: CROW as a ``transformers.Trainer`` whose loss has one extra term. Unlike the official code: no
``zero_grad()`` inside the loss (it erases accumulated gradients), and two forwards instead of three."""

from __future__ import annotations

import torch

from ...losses import fgsm_delta, layer_consistency_loss, logits_needed
from ...modeling import capture_embeddings, perturb_embeddings
from ...training.loop import LossTrainer
from .config import CrowConfig


class CrowTrainer(LossTrainer):
    """``transformers.Trainer`` with CROW's loss. Logs ``lm_loss``, ``consistency_clean``, ``consistency_perturbed`` and
    ``input_grad_zero_share`` (share of exactly-zero entries of the input gradient: ``sign(0) = 0`` gives those entries
    no perturbation, e.g. under fp16 underflow)."""

    config_class = CrowConfig

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        crow: CrowConfig = self.method
        labels = inputs["labels"]  # [B, T], -100 on prompt and padding
        attention_mask = inputs.get("attention_mask")
        regularize = crow.alpha > 0
        perturb = regularize and crow.epsilon > 0
        embedding = self.accelerator.unwrap_model(model).get_input_embeddings()

        forward = {"input_ids": inputs["input_ids"], "attention_mask": attention_mask, "use_cache": False}
        if self._keeps_logits:  # logits of the response positions only
            forward["logits_to_keep"] = logits_needed(labels)

        # Pass 1: clean inputs -> LM loss and clean hidden states.
        with capture_embeddings(embedding, require_grad=perturb) as tap:
            outputs = model(**forward, output_hidden_states=regularize)
        loss = self._lm(outputs.logits, labels, num_items_in_batch)

        if regularize:
            consistency = self._consistency(outputs.hidden_states, attention_mask)
            self._metrics["consistency_clean"].append(consistency.item())
            if perturb:
                # Input-only backward: gradients w.r.t. the embeddings, none w.r.t. parameters.
                (grad,) = torch.autograd.grad(consistency, tap.embeddings, retain_graph=True)
                self._metrics["input_grad_zero_share"].append((grad == 0).float().mean().item())
                delta = fgsm_delta(grad, crow.epsilon)  # [B, T, H]
                # Pass 2: perturbed inputs -> hidden states only (one logit row, not T).
                if self._keeps_logits:
                    forward["logits_to_keep"] = 1
                with perturb_embeddings(embedding, delta):
                    perturbed = model(**forward, output_hidden_states=True)
                consistency = self._consistency(perturbed.hidden_states, attention_mask)
                self._metrics["consistency_perturbed"].append(consistency.item())
            loss = loss + crow.alpha * consistency / self._accumulation_steps()
        return self._finish(loss, outputs, return_outputs)

    def _consistency(self, hidden_states, attention_mask) -> torch.Tensor:
        return layer_consistency_loss(hidden_states, attention_mask, layers=self.method.layers,
                                      token_scope=self.method.token_scope)
