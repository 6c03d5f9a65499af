"""Pad token-id lists into one batch: the few lines every forward over prompts of unequal length repeats."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[len(seqs), longest]`` long tensors.

    ``side="right"`` keeps token ``j`` of every row at position ``j`` (scoring, hidden states: the last real token
    of row ``r`` is at ``mask[r].sum() - 1``); ``side="left"`` ends every row at the last column (generation and
    next-token distributions: the prompt ends where the answer starts).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(longest - len(s), longest)
        ids[row, span] = torch.as_tensor(list(s), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
