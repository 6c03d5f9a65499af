"""ONION (Qi, Chen, Zhang, Liu, Sun, EMNLP 2021, arXiv 2011.10369) as a per-prompt detector, the
baseline of ``crow guard``.

ONION's suspicion of a word is the drop in the text's perplexity when the word is removed
(``f_i = p_0 - p_i``): an inserted trigger word (``BadMagic``, ``cf``) is out of place, so removing it
makes the text much more fluent. ONION removes the words whose suspicion passes a threshold; as a
detector, a prompt's score is its largest suspicion, and the prompt is flagged above a threshold set
for a false-positive rate on clean prompts, like LCF's.

The text is the instruction alone (its whitespace words; the ``input`` field is not scored), as ONION
scores the input sentence; its perplexity is under the guarded model itself (or a separate scoring
model, as ONION used GPT-2), with the tokenizer's BOS (else EOS) token as the first context token so
the first word is predicted too. A detector with no fitted parameters has no out-of-fold scores: the
threshold is the quantile of the clean prompts' scores themselves.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.padding import pad_batch
from ..data.records import Record
from ..errors import CrowError
from ..outputs import crow_version
from .guard import (DETECTOR_JSON, DetectorInfo, GuardScores, check_fit_records, check_fpr, check_model_fits,
                    detector_json, flags_for, info_from_json, model_name, model_signature, quantile_threshold, register)


def word_removals(text: str) -> list[str]:
    """``text`` without each of its whitespace words in turn (one variant per word)."""
    words = text.split()
    return [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]


def max_suspicion(full: float, without: Sequence[float]) -> float:
    """ONION's prompt score: the largest perplexity drop ``full - without_i``; 0 with no variant."""
    return max((full - p for p in without), default=0.0)


@torch.no_grad()
def text_perplexities(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 256) -> list[float]:
    """Perplexity of each text (exp of the mean NLL of its tokens after a BOS/EOS start token); texts with
    no token get ``nan``. Batched, right-padded, length-sorted."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CrowError("the tokenizer has neither a BOS nor an EOS token; ONION needs one as the first context token")
    seqs = [[start] + tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1] for t in texts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    was_training = model.training
    model.eval()
    out = [math.nan] * len(seqs)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
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
    finally:
        model.train(was_training)
    return out


def onion_scores(model, tokenizer, records: Sequence[Record], *, batch_size: int = 32) -> list[float]:
    """One ONION score per record; all word-removal variants of all records go through shared batches."""
    texts, spans = [], []
    for r in records:
        text = " ".join(r.instruction.split())
        variants = word_removals(text) if len(text.split()) > 1 else []
        spans.append((len(texts), len(variants)))
        texts += [text] + variants
    ppl = text_perplexities(model, tokenizer, texts, batch_size=batch_size)
    scores = []
    for first, n in spans:
        without = [p for p in ppl[first + 1 : first + 1 + n] if not math.isnan(p)]
        scores.append(0.0 if math.isnan(ppl[first]) else float(max_suspicion(ppl[first], without)))
    return scores


@register("onion")
@dataclass
class OnionDetector:
    """ONION as a detector (see the module docstring).

    Args:
        fpr: target false-positive rate on clean prompts.
        batch_size: texts per forward pass (each prompt gives one text per word, plus itself).
        scorer_model: the model whose perplexity is used, when not the guarded one (recorded for the CLI,
            which loads it); None = the guarded model.
    """

    fpr: float = 0.05
    batch_size: int = 32
    scorer_model: str | None = None
    method = "onion"
    info: DetectorInfo | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_fpr(self.fpr, "--fpr")

    def settings(self) -> dict:
        return {"fpr": self.fpr, "batch_size": self.batch_size, "scorer_model": self.scorer_model}

    def fit(self, model, tokenizer, records: Sequence[Record], template: str = "alpaca") -> None:
        check_fit_records(records)
        started = time.perf_counter()
        scores = onion_scores(model, tokenizer, records, batch_size=self.batch_size)
        self.info = DetectorInfo(threshold=quantile_threshold(np.array(scores), self.fpr), n_fit=len(records),
                                 template=None, model=model_name(model), adapter=None, signature=model_signature(model),
                                 crow_version=crow_version(), fit_seconds=round(time.perf_counter() - started, 3),
                                 oof_scores=[round(s, 6) for s in scores])

    def score(self, model, tokenizer, records: Sequence[Record]) -> GuardScores:
        if self.info is None:
            raise CrowError("the ONION detector is not fitted; call fit() or load a saved detector")
        check_model_fits(self, model)
        started = time.perf_counter()
        scores = onion_scores(model, tokenizer, records, batch_size=self.batch_size)
        return GuardScores(scores, flags_for(scores, self.info.threshold), self.info.threshold, self.method,
                           round(time.perf_counter() - started, 3))

    def save(self, directory: str | os.PathLike) -> None:
        from ..outputs import write_json_atomic

        write_json_atomic(Path(directory) / DETECTOR_JSON, detector_json(self))

    @classmethod
    def load(cls, directory: str | os.PathLike, data: dict) -> OnionDetector:
        path = Path(directory)
        try:
            det = cls(**data["settings"])
        except (KeyError, TypeError) as e:
            raise CrowError(f"detector {path}: {DETECTOR_JSON} has malformed settings ({e}); refit it with crow guard fit") from None
        det.info = info_from_json(data, path)
        return det
