"""ONION (Qi, Chen, Zhang, Liu, Sun, EMNLP 2021, arXiv 2011.10369), ``crow guard``'s baseline: a word's suspicion is
the drop in the text's perplexity without it (``f_i = p_0 - p_i``), a prompt's score its largest suspicion over the
instruction's whitespace words, under the guarded model (or another; ONION used GPT-2) after the tokenizer's BOS (else
EOS) token, thresholded at the clean prompts' own quantile."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.records import Record
from ..data.templates import batches, pad_batch
from ..errors import CrowError
from ..modeling import evaluating
from ..training.config import option
from .guard import DETECTORS, Detector


def word_removals(text: str) -> list[str]:
    """``text`` without each of its whitespace words in turn (one variant per word)."""
    words = text.split()
    return [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]


def max_suspicion(full: float, without: Sequence[float]) -> float:
    """ONION's prompt score: the largest perplexity drop ``full - without_i``; 0 with no variant."""
    return max((full - p for p in without), default=0.0)


@torch.no_grad()
@evaluating
def text_perplexities(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                      max_length: int = 256) -> list[float]:
    """Perplexity of each text after a BOS/EOS start token (``nan`` with no token), in right-padded, sorted batches."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CrowError("the tokenizer has neither a BOS nor an EOS token; ONION needs one as the first context token")
    seqs = [[start] + tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1] for t in texts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    out = [math.nan] * len(seqs)
    for idx in batches(order, batch_size):
        ids, mask = pad_batch([seqs[i] for i in idx], pad)  # [B, T] right-padded
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
        target = ids[:, 1:].to(device)  # [B, T-1]
        nll = -logp.gather(-1, target[..., None]).squeeze(-1)  # [B, T-1]
        real = mask[:, 1:].to(device).float()  # [B, T-1]
        counts = real.sum(dim=1)
        mean = (nll * real).sum(dim=1) / counts.clamp_min(1)
        for row, i in enumerate(idx):
            if counts[row] > 0:
                out[i] = math.exp(float(mean[row]))
    return out


@DETECTORS.register("onion")
@dataclass
class OnionDetector(Detector):
    """ONION as a detector (see the module docstring); ``scorer_model`` is recorded for the CLI, which loads it."""

    batch_size: int = option(32, "Texts per forward pass.")
    scorer_model: str | None = option(None, "Score perplexity with this model instead of the guarded one.")
    method, label = "onion", "ONION"

    def fit(self, model, tokenizer, records: Sequence[Record], template: str = "alpaca") -> None:
        started = self._start_fit(records, None)
        self._record_fit(model, records, None, self._scores(model, tokenizer, records, None), started)

    def _scores(self, model, tokenizer, records: Sequence[Record], template: str | None) -> list[float]:
        """One ONION score per record; all word-removal variants of all records go through shared batches."""
        texts, spans = [], []
        for r in records:
            text = " ".join(r.instruction.split())
            variants = word_removals(text) if len(text.split()) > 1 else []
            spans.append((len(texts), len(variants)))
            texts += [text] + variants
        ppl = text_perplexities(model, tokenizer, texts, batch_size=self.batch_size)
        scores = []
        for first, n in spans:
            without = [p for p in ppl[first + 1 : first + 1 + n] if not math.isnan(p)]
            scores.append(0.0 if math.isnan(ppl[first]) else float(max_suspicion(ppl[first], without)))
        return scores
