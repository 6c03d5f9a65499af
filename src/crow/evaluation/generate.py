"""Batched, left-padded greedy generation and teacher-forced perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

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
    """Greedy completions of ``records`` under ``template`` (``raw``, ``alpaca`` or ``chat``).

    Prompts are sorted by length and left-padded in batches (far faster than one at a time);
    the result is in the input order and holds only the new text, special tokens removed.
    """
    from transformers import GenerationConfig

    prompts = [encode_prompt(format_prompt(r, template, tokenizer), template, tokenizer) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=progress if isinstance(progress, str) else "generating",
               disable=not progress, leave=False)
    for idx in _batches(order, batch_size):
        longest = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: the prompt ends where generation starts
            ids[row, longest - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, longest - len(prompts[i]) :] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row, longest:], skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return outputs


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
