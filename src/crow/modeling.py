"""Small helpers every part that runs a model shares: its mode switched and restored, what its forward accepts, and
forward hooks on its input embeddings, so that every pass of a method calls the *wrapped* model with ``input_ids`` (the
official CROW code's ``model(inputs_embeds=...)`` skips the wrapper's own embedding call under DDP, FSDP, DeepSpeed)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from contextlib import AbstractContextManager
from types import SimpleNamespace

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout) inside the block, back in the mode it came in after, also on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def forward_parameters(model: nn.Module) -> set[str]:
    """The names the ``forward`` of the model under a DDP (``.module``) or PEFT (``get_base_model()``) wrapper takes
    (``logits_to_keep``; ``cache`` or ``past_key_values``)."""
    model = getattr(model, "module", model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(model.forward).parameters)


def keeps_logits(model: nn.Module) -> bool:
    """Whether the model can return the logits of its last positions only (``logits_to_keep``)."""
    return "logits_to_keep" in forward_parameters(model)


def evaluating(fn):
    """Decorator for ``fn(model, ...)``: it runs with the model in eval mode, given back in the mode it came in."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with eval_mode(model):
            return fn(model, *args, **kwargs)
    return wrapper


@contextlib.contextmanager
def _hooked(module: nn.Module, hook, value=None) -> Iterator:
    """``hook`` on ``module``'s forward inside the block, which gets ``value``."""
    handle = module.register_forward_hook(hook)
    try:
        yield value
    finally:
        handle.remove()


def capture_embeddings(embedding: nn.Module, require_grad: bool = True) -> AbstractContextManager:
    """Record the embedding output of forwards run inside the block as ``tap.embeddings`` [B, T, H]. With
    ``require_grad`` an output that does not require grad (frozen embedding, LoRA) is made a leaf that does, for
    ``torch.autograd.grad(loss, tap.embeddings)``; a trained embedding's output is kept (it still gets its gradient)."""
    tap = SimpleNamespace(embeddings=None)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if require_grad and not output.requires_grad:
            output = output.detach().requires_grad_(True)
        tap.embeddings = output
        return output

    return _hooked(embedding, hook, tap)


def perturb_embeddings(embedding: nn.Module, delta: torch.Tensor) -> AbstractContextManager:
    """Add ``delta`` [B, T, H] (detached) to the embedding output of forwards run inside the block."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape != delta.shape:
            raise RuntimeError(f"embedding output {tuple(output.shape)} does not match the delta {tuple(delta.shape)}")
        return output + delta.to(output.dtype)

    return _hooked(embedding, hook)


def replace_embeddings(embedding: nn.Module, tokens: torch.Tensor, slots: torch.Tensor) -> AbstractContextManager:
    """Put ``tokens`` [S, H] (soft tokens; *not* detached, so a ``tokens`` that requires grad receives
    ``torch.autograd.grad`` through the hook) in place of the embedding output of forwards run inside the block where
    ``slots`` [B, T] (long) is j >= 0: ``tokens[j]``; -1 keeps the embedding."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape[:2] != slots.shape:
            raise RuntimeError(f"embedding output {tuple(output.shape)} does not match the slots {tuple(slots.shape)}")
        placed = tokens.to(output.dtype)[slots.clamp_min(0)]  # [B, T, H]
        return torch.where((slots >= 0).unsqueeze(-1), placed, output)

    return _hooked(embedding, hook)
