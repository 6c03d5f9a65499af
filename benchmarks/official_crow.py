"""A re-implementation of the *official* CROW step, kept as the yardstick for crow's lean step.

It follows the structure of the code released with the paper: embed the tokens by hand, forward
with hidden states, a full ``backward(retain_graph=True)`` of the consistency loss to read the
embedding gradient, ``model.zero_grad()`` to clear what that backward left in the parameters, a
second forward on the perturbed embeddings, and a third forward for the LM loss (per-micro-batch
mean, as ``model(**inputs).loss``). It is not used for training: the tests check that crow's
``CrowTrainer`` gives the same loss and gradients, and ``benchmarks/step_cost.py`` times both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def official_consistency(hidden_states) -> torch.Tensor:
    """The released formula, verbatim in spirit: stack, slice, cosine, mean."""
    h = torch.stack(hidden_states[1:-2])  # [L-2, B, T, H]
    h_next = torch.stack(hidden_states[2:-1])  # [L-2, B, T, H]
    return (1 - F.cosine_similarity(h, h_next, dim=-1, eps=1e-8)).mean()


def official_crow_loss(model, batch: dict, *, alpha: float = 5.5, epsilon: float = 0.1) -> torch.Tensor:
    """The official CROW loss of one micro-batch (3 forwards, 1 extra full backward, zero_grad).

    Returns the loss to ``backward()``; parameter gradients left behind by the internal backward are
    cleared with ``model.zero_grad()`` exactly as the official code does (which also wipes
    gradients accumulated from earlier micro-batches).
    """
    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)  # leaf
    # forward 1: clean embeddings, hidden states
    outputs = model(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=True)
    consistency_clean = official_consistency(outputs.hidden_states)
    # backward 1: full backward (parameters too) to read the embedding gradient
    consistency_clean.backward(retain_graph=True)
    delta = epsilon * embeds.grad.detach().sign()
    model.zero_grad()
    # forward 2: perturbed embeddings
    perturbed = model(inputs_embeds=embeds + delta, attention_mask=attention_mask, output_hidden_states=True)
    consistency_perturbed = official_consistency(perturbed.hidden_states)
    # forward 3: the LM loss
    lm = model(input_ids=input_ids, attention_mask=attention_mask, labels=batch["labels"]).loss
    return lm + alpha * consistency_perturbed
