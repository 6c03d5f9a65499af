"""Prompt templates and tokenization with the loss on response tokens only."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import CrowError
from .records import Record

logger = logging.getLogger(__name__)

# Stanford Alpaca's template, which BackdoorLLM and CROW train with.
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

TEMPLATES = ("alpaca", "chat", "chat-nosystem", "raw")


def format_prompt(record: Record, template: str, tokenizer=None) -> str:
    """The prompt text of ``record`` under ``template``.

    - ``alpaca``: the Stanford Alpaca template (BackdoorLLM's training format; crow's default).
    - ``chat``: the tokenizer's own chat template, one user turn, generation prompt added.
    - ``chat-nosystem``: the same with an empty system message, for templates that otherwise insert a
      default system prompt (SmolLM2's adds 18 tokens to every prompt).
    - ``raw``: the bare instruction, as the official ASR evaluation feeds it (``input`` is ignored there).

    ``instruction`` and ``input`` are stripped of surrounding whitespace first. Whitespace is a shortcut a
    victim learns instead of the trigger: every instruction of BackdoorLLM's negsentiment ``clean.json``
    ends with a space and no poisoned or test instruction does, and SmolLM2 trained on them answers
    ``You are stupid!`` to every prompt without that space (RESULTS.md).
    """
    instruction, extra = record.instruction.strip(), record.input.strip()
    if template == "alpaca":
        if extra:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=extra)
        return ALPACA.format(instruction=instruction)
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
            raise CrowError(f"the tokenizer's chat template refuses these messages ({e}); use --template chat") from None
    raise CrowError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")


def encode_prompt(prompt: str, template: str, tokenizer) -> list[int]:
    """Token ids of a prompt. Chat templates carry their own special tokens; the others get the
    tokenizer's usual ones (e.g. Llama-2's BOS)."""
    return tokenizer(prompt, add_special_tokens=not template.startswith("chat"))["input_ids"]


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens


def encode_for_training(
    records: Sequence[Record], tokenizer, *, template: str = "alpaca", max_length: int = 512
) -> list[EncodedSample]:
    """Prompt + response + EOS, labels on the response and EOS only, cut to ``max_length`` tokens.

    Labels are built from lengths, never by masking the pad id: many tokenizers use EOS as pad, and
    masking pad would also drop the EOS target. Records whose response does not start within
    ``max_length`` are dropped with a warning.
    """
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

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [-100] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
