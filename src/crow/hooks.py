"""A forward hook on the input-embedding module, so both CROW passes call the *wrapped* model.

The official CROW code embeds the tokens itself and calls ``model(inputs_embeds=...)``. Under DDP,
FSDP or DeepSpeed that skips the wrapper's own embedding call (no gradient sync for a trained
embedding, empty ZeRO-3 shards). Here the model is always called with ``input_ids``; the hook
either *captures* the embedding output (pass 1, made differentiable so its gradient can be read)
or *adds* a fixed perturbation to it (pass 2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EmbeddingTap:
    """What the hook saw: ``embeddings`` [B, T, H] of the last captured forward."""

    def __init__(self) -> None:
        self.embeddings: torch.Tensor | None = None


@contextlib.contextmanager
def capture_embeddings(embedding: nn.Module, require_grad: bool = True) -> Iterator[EmbeddingTap]:
    """Record the embedding output of forwards run inside the block.

    With ``require_grad`` the output is made part of the autograd graph even when the embedding
    weights are frozen (LoRA), so ``torch.autograd.grad(loss, tap.embeddings)`` works. When the
    weights are trained (full finetuning) the output already requires grad and is kept as is, so the
    embedding still receives its gradient.
    """
    tap = EmbeddingTap()

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if require_grad and not output.requires_grad:
            output = output.detach().requires_grad_(True)
        tap.embeddings = output
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield tap
    finally:
        handle.remove()


@contextlib.contextmanager
def perturb_embeddings(embedding: nn.Module, delta: torch.Tensor) -> Iterator[None]:
    """Add ``delta`` [B, T, H] (detached) to the embedding output of forwards run inside the block."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape != delta.shape:
            raise RuntimeError(f"embedding output {tuple(output.shape)} does not match the delta {tuple(delta.shape)}")
        return output + delta.to(output.dtype)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
