"""Batched, left-padded greedy generation and teacher-forced perplexity."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.padding import pad_batch
from ..data.records import Record
from ..data.templates import encode_for_training, encode_prompt, format_prompt


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    records: Sequence[Record],
    *,
    template: str = "raw",
    max_new_tokens: int = 128,
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[str]:
    """Greedy completions of ``records`` under ``template`` (``raw``, ``alpaca``, ``chat``, ...).

    Prompts are sorted by length and left-padded in batches; inside a batch, rows that reach an
    end-of-sequence token leave the batch (with their KV cache), so a few long answers do not keep
    every finished one decoding. The result is in the input order and holds only the new text,
    special tokens removed. Greedy, so each output equals one-prompt-at-a-time generation.
    """
    prompts = [encode_prompt(format_prompt(r, template, tokenizer), template, tokenizer) for r in records]
    tokens = generate_ids(model, prompts, pad_token_id=tokenizer.pad_token_id,
                          stop_ids=stop_token_ids(model, tokenizer), max_new_tokens=max_new_tokens,
                          batch_size=batch_size, progress=progress)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


@torch.no_grad()
def generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    stop_ids: list[int],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[list[int]]:
    """Greedy new-token ids after each of the token-id ``prompts`` (already templated), in the input order.

    The batching of :func:`generate`: prompts sorted by length, left-padded so that each ends where
    generation starts, decoded by :func:`greedy_decode`; the model comes back in the mode it came in.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=progress if isinstance(progress, str) else "generating",
               disable=not progress, leave=False)
    try:
        for idx in _batches(order, batch_size):
            ids, mask = pad_batch([prompts[i] for i in idx], pad_token_id, side="left")  # [B, T]
            tokens = greedy_decode(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                                   stop_ids=stop_ids, pad_token_id=pad_token_id)
            for row, i in enumerate(idx):
                outputs[i] = tokens[row]
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return outputs


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any end-of-turn ids of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def greedy_decode(model, input_ids, attention_mask, *, max_new_tokens: int, stop_ids: list[int],
                  pad_token_id: int) -> list[list[int]]:
    """Greedy decoding of a left-padded batch; finished rows are dropped from the batch and the cache.

    Falls back to ``model.generate`` when the model's cache cannot drop rows.
    """
    batch = input_ids.shape[0]
    forward_args = inspect.signature((model.get_base_model() if hasattr(model, "get_base_model") else model).forward).parameters
    positions = "position_ids" in forward_args
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_args else {}
    kwargs = {"position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0)} if positions else {}
    cache_arg = "cache" if "cache" in forward_args else "past_key_values"  # renamed in transformers 5.x
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs, **extra)
    cache = getattr(out, cache_arg, None)
    if not hasattr(cache, "batch_select_indices"):
        return _hf_generate(model, input_ids, attention_mask, max_new_tokens, stop_ids, pad_token_id)
    stop = torch.tensor(stop_ids, device=input_ids.device)
    rows = torch.arange(batch, device=input_ids.device)
    results: list[list[int]] = [[] for _ in range(batch)]
    next_token = out.logits[:, -1].argmax(-1)  # [rows]
    for step in range(max_new_tokens):
        for r, t in zip(rows.tolist(), next_token.tolist()):
            results[r].append(t)
        done = torch.isin(next_token, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):  # finished rows leave the batch
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, next_token, attention_mask = rows[keep], next_token[keep], attention_mask[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        kwargs = {"position_ids": attention_mask.sum(-1, keepdim=True) - 1} if positions else {}
        kwargs[cache_arg] = cache
        out = model(input_ids=next_token[:, None], attention_mask=attention_mask, use_cache=True, **kwargs, **extra)
        next_token = out.logits[:, -1].argmax(-1)
    return results


def _hf_generate(model, input_ids, attention_mask, max_new_tokens, stop_ids, pad_token_id) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_token_id,
                              eos_token_id=stop_ids)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return [row.tolist() for row in out[:, input_ids.shape[1]:]]


@torch.no_grad()
def perplexity(
    model, tokenizer, records: Sequence[Record], *, template: str = "alpaca", max_length: int = 512,
    batch_size: int = 8,
) -> float:
    """exp(mean NLL) of the reference outputs (+ EOS) given their prompts: token-level, over all records."""
    samples = encode_for_training(records, tokenizer, template=template, max_length=max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    for idx in _batches(order, batch_size):
        longest = max(len(samples[i].input_ids) for i in idx)
        ids = torch.full((len(idx), longest), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(idx), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(samples[i].input_ids)
            ids[row, :n] = torch.tensor(samples[i].input_ids)
            labels[row, :n] = torch.tensor(samples[i].labels)
            mask[row, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        targets = labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((targets != -100).sum())
    model.train(was_training)
    return math.exp(total / max(count, 1))
