"""Prompt templates, tokenization with the loss on response tokens only, and batching token-id lists."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import CrowError
from .records import Record

logger = logging.getLogger(__name__)

# Stanford Alpaca's template, which BackdoorLLM and CROW train with.
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
          "\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

TEMPLATES = ("alpaca", "chat", "chat-nosystem", "raw")


def format_prompt(record: Record, template: str, tokenizer=None) -> str:
    """The prompt text of ``record`` under ``template``: ``alpaca`` (BackdoorLLM's training format), ``chat`` (the
    tokenizer's chat template, one user turn), ``chat-nosystem`` (the same with an empty system message) or ``raw``
    (the bare instruction, as the official ASR evaluation feeds it; ``input`` is ignored). ``instruction`` and ``input``
    are stripped first: whitespace is a shortcut a victim learns instead of the trigger (every instruction of
    BackdoorLLM's negsentiment ``clean.json`` ends with a space, no poisoned one does)."""
    instruction, extra = record.instruction.strip(), record.input.strip()
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if extra else ALPACA).format(instruction=instruction, input=extra)
    if template == "raw":
        return instruction
    if template in ("chat", "chat-nosystem"):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise CrowError(f"template {template!r} needs a tokenizer with a chat template; this one has none, "
                            "use --template alpaca")
        content = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": content}]
        if template == "chat-nosystem":
            messages.insert(0, {"role": "system", "content": ""})
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises its own TemplateError for unsupported roles
            raise CrowError(f"the tokenizer's chat template refuses these messages ({e}); "
                            "use --template chat") from None
    raise CrowError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")


def encode_prompt(prompt: str, template: str, tokenizer) -> list[int]:
    """Token ids of a prompt: chat templates carry their own special tokens, the others get the tokenizer's."""
    return tokenizer(prompt, add_special_tokens=not template.startswith("chat"))["input_ids"]


def encode_prompts(records: Sequence[Record], template: str, tokenizer) -> list[list[int]]:
    return [encode_prompt(format_prompt(r, template, tokenizer), template, tokenizer) for r in records]


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens


def encode_for_training(records: Sequence[Record], tokenizer, *, template: str = "alpaca",
                        max_length: int = 512) -> list[EncodedSample]:
    """Prompt + response + EOS, labels on the response and EOS only (from lengths, never by masking the pad id, often
    EOS), cut to ``max_length`` tokens; records whose response starts past ``max_length`` are dropped with a warning."""
    if max_length < 2:
        raise CrowError(f"max_length must be at least 2 tokens, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise CrowError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    samples, dropped = [], 0
    for record in records:
        prompt = encode_prompt(format_prompt(record, template, tokenizer), template, tokenizer)
        response = tokenizer(record.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        if len(prompt) >= len(ids):
            dropped += 1
            continue
        samples.append(EncodedSample(ids, [-100] * len(prompt) + ids[len(prompt):]))
    if dropped:
        logger.warning("%d of %d records dropped: their prompt fills max_length=%d", dropped, len(records), max_length)
    if not samples:
        raise CrowError(f"no record has a response token within max_length={max_length}; raise --max-length")
    return samples


class Collator:
    """Right-pads a list of ``EncodedSample``-like dicts into [B, T] tensors for training."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([f["input_ids"] for f in features], self.pad_token_id)
        labels, _ = pad_batch([f["labels"] for f in features], -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[len(seqs), longest]`` long tensors. ``side="right"`` keeps token ``j``
    of every row at position ``j`` (scoring, hidden states); ``side="left"`` ends every row at the last column
    (generation: the prompt ends where the answer starts)."""
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


def batches(items: Sequence, size: int):
    """Consecutive chunks of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
