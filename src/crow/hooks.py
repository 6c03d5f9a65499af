"""Forward hooks, so every pass of a method calls the *wrapped* model: on the input embeddings (CROW, and the
soft-token adversary of ``crow.unlearn``) and on a decoder layer (its residual-stream adversary).

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


# ------------------------------------------------------------------------------------------------
# Decoder-layer hooks (the residual stream between two decoder layers)
# ------------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order: the ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks
    (``model.layers`` in Llama-style models, ``transformer.h`` in GPT-2, ``decoder.layers`` in OPT),
    found through any wrapper (PEFT, DDP)."""
    from .errors import CrowError

    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and n and len(m) == n]
    named = [m for name, m in found if name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")]
    if named or found:
        return (named or [m for _, m in found])[0]
    raise CrowError(f"found no list of {n} decoder layers in {type(model).__name__}; this architecture is not "
                    "supported by layer hooks")


def _hidden(output):
    """A decoder layer's output hidden states [B, T, H] (some layers return a tuple, hidden states first)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def add_to_layer_output(layer: nn.Module, delta: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
    """Add one vector ``delta`` [H] to the output of ``layer`` at the positions where ``mask`` [B, T] is
    true, for the forwards run inside the block. ``delta`` is *not* detached: a ``delta`` that requires
    grad receives ``torch.autograd.grad`` through the hook (the universal adversary of ``crow.unlearn``).

    The next layer receives the shifted states. ``output_hidden_states`` may not show them: transformers 5
    records hidden states with its own hooks on the layers, registered before this one."""

    def hook(module: nn.Module, args: tuple, output):
        hidden = _hidden(output)  # [B, T, H]
        if hidden.shape[:2] != mask.shape:
            raise RuntimeError(f"layer output {tuple(hidden.shape)} does not match the mask {tuple(mask.shape)}")
        shifted = hidden + mask.unsqueeze(-1).to(hidden.dtype) * delta.to(hidden.dtype)  # [B, T, H]
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_layer_output(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the (detached) output hidden states [B, T, H] of ``layer`` for each forward run inside the block."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output):
        seen.append(_hidden(output).detach())

    handle = layer.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def replace_embeddings(embedding: nn.Module, tokens: torch.Tensor, slots: torch.Tensor) -> Iterator[None]:
    """Put free vectors in place of the embedding output at marked positions, for the forwards run inside the
    block: ``tokens`` [S, H] (soft tokens; *not* detached, so a ``tokens`` that requires grad receives
    ``torch.autograd.grad`` through the hook), ``slots`` [B, T] long: j at a position that gets ``tokens[j]``,
    -1 where the embedding is kept (the soft-token adversary of ``crow.unlearn``)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape[:2] != slots.shape:
            raise RuntimeError(f"embedding output {tuple(output.shape)} does not match the slots {tuple(slots.shape)}")
        placed = tokens.to(output.dtype)[slots.clamp_min(0)]  # [B, T, H]
        return torch.where((slots >= 0).unsqueeze(-1), placed, output)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
