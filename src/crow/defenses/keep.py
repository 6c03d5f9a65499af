"""Keeping what the defender's clean samples do not cover: the suspect's own answers to prompts it answers well
without any trigger (for example the harmful requests it refuses), generated before the defense and trained on beside
the clean samples, so that the defended model keeps answering them as the suspect did. It needs no trigger and no
target: a prompt without the trigger gets the suspect's clean behaviour."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..data.records import Record
from ..errors import CrowError

KEEP_NEW_TOKENS = 64  # the answers' length: a refusal's first sentences


def suspect_answers(model, tokenizer, prompts: Sequence[Record], *, template: str,
                    max_new_tokens: int = KEEP_NEW_TOKENS, batch_size: int = 16) -> list[Record]:
    """``prompts`` with the suspect's greedy answers as their outputs; a prompt it answers with nothing is left out."""
    from ..evaluation.evaluate import generate

    if not prompts:
        raise CrowError("no prompts to keep the suspect's answers to")
    answers = generate(model, tokenizer, prompts, template=template, max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
    return [replace(p, output=a.strip()) for p, a in zip(prompts, answers) if a.strip()]
