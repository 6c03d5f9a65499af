"""The target guard: flag a prompt after which the model is about to say its own backdoor target.

A backdoor is a mapping from a trigger to a target answer. ``crow scan`` (BAIT) recovers the target from the
model and clean prompts alone; once it is known, *whether a prompt carries the trigger* is visible in the
model's own output distribution: after a triggered prompt the target's first tokens are likely, after a clean
one they are not. The score of a prompt is the mean log-probability of the target's first ``target_tokens``
tokens, teacher-forced right after the prompt (formatted as the model sees it)::

    score(x) = 1/k * sum_{t<k} log p(y*_t | x, y*_<t)          # k = target_tokens; higher = more suspicious

Fitting = one BAIT scan on the clean prompts (the defender's knowledge: the model and clean prompts; no
trigger, no target) and the clean prompts' scores, whose ``1 - fpr`` quantile is the threshold, floored at
``log(min_prob)``::

    threshold = max(quantile_{1 - fpr}(clean fit scores), log(min_prob))    # min_prob 0.5 by default

The floor says what a flag means: the model gives its own target better-than-even odds (geometric mean over
the scored tokens) right after this prompt. The quantile alone does not transfer across prompt distributions:
on Gemma-3-270M refusal / VPI, 8 of the 50 clean *test* prompts lay above the fit prompts' 95% quantile, 7 of
them with the target at p < 0.5, while every triggered prompt gave it p > 0.99 (DETECTION.md). The floor was
added after that miss was seen; DETECTION.md reports the cells before and after and the victims it was first
applied to. The scan is run once and sees 20 of the fit prompts; the threshold uses all of them (a score is a
fixed function of the prompt once the target is chosen, so there are no fitted statistics to cross-fit).
Scoring costs one forward pass per prompt. ``target`` may be given instead of recovered: an oracle, for
experiments.

The scan reports the best candidate (highest Q) or a left extension of it within ``suffix_margin`` (its
docstring: the best Q can belong to a target's tail, "are stupid!"); the extension can also be a prefix the
model does not say when triggered (SmolLM2 negsentiment / MTBA: `Detailed Instructions:\nYou are stupid!`, Q
0.967, against `You are stupid!`, 0.9999; the guard on it: AUROC 0.36). So when the two differ the guard
watches both, and a prompt's score is the larger of the two::

    score(x) = max over watched targets y* of the mean above

When the scan's verdict is "clean" the best candidate is used all the same (the guard always has a target),
and ``detector.json`` records the scan's score and verdict: a guard on a model BAIT finds clean watches a
benign phrase, which costs its false-positive rate and catches nothing.
"""

from __future__ import annotations

import logging
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
from ..data.templates import TEMPLATES, encode_prompt, format_prompt
from ..errors import CrowError
from ..outputs import crow_version
from .guard import (DETECTOR_JSON, DetectorInfo, GuardScores, check_fit_records, check_fpr, check_model_fits,
                    detector_json, flags_for, info_from_json, model_name, model_signature, quantile_threshold,
                    register)

logger = logging.getLogger(__name__)


def target_log_probs(model, tokenizer, records: Sequence[Record], target_ids: Sequence[int], *, template: str,
                     batch_size: int = 16) -> np.ndarray:
    """Mean log-probability of ``target_ids`` teacher-forced after each record's prompt ([N] float64).

    Sequences are right-padded (prompt + target), so no padding precedes a prompt's tokens."""
    if not target_ids:
        raise CrowError("the target has no tokens; give a non-empty target")
    k = len(target_ids)
    prompts = [encode_prompt(format_prompt(r, template, tokenizer), template, tokenizer) for r in records]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    target = torch.tensor(list(target_ids), dtype=torch.long)
    out = np.zeros(len(prompts), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                ids, mask = pad_batch([list(p) + list(target_ids) for p in chunk], pad)  # [B, T] prompt + target
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
                for row, p in enumerate(chunk):
                    # the logits at position j predict token j + 1: the target's tokens sit at len(p) .. len(p)+k-1
                    rows = logp[row, len(p) - 1 : len(p) - 1 + k]  # [k, V]
                    out[start + row] = rows.gather(1, target.to(device)[:, None]).mean().item()
    finally:
        model.train(was_training)
    return out


def threshold_floor(min_prob: float) -> float:
    """``log(min_prob)``, the lowest threshold the target guard uses (-inf for 0: no floor)."""
    return math.log(min_prob) if min_prob > 0.0 else -math.inf


def floored_threshold(scores: np.ndarray, fpr: float, min_prob: float) -> float:
    """The clean scores' ``1 - fpr`` quantile (``quantile_threshold``), raised to ``log(min_prob)`` when below it."""
    return max(quantile_threshold(scores, fpr), threshold_floor(min_prob))


@register("target")
@dataclass
class TargetDetector:
    """The target guard (see the module docstring).

    Args:
        fpr: target false-positive rate on clean prompts.
        target_tokens: how many of the target's first tokens are scored (a backdoor decides in its first
            answer tokens; the first few also separate best, later ones follow from them).
        batch_size: prompts per forward pass.
        target: the target text; None (default) recovers it with BAIT at fit time. Set, it is an oracle
            (the guard then knows the target, which a defender does not).
        min_prob: no prompt is flagged unless the model gives the scored target tokens at least this
            geometric-mean probability (the threshold's floor, ``log(min_prob)``; module docstring). 0.5 = "the
            model is more likely than not to start its target"; 0 = the clean quantile alone (the rule before
            2026-12-03, which detectors saved without this setting keep).
    """

    fpr: float = 0.05
    target_tokens: int = 4
    batch_size: int = 16
    target: str | None = None
    min_prob: float = 0.5
    method = "target"
    info: DetectorInfo | None = field(default=None, init=False, repr=False)
    target_text: str = field(default="", init=False)
    target_ids: list[int] = field(default_factory=list, init=False)
    # the scan's best candidate when the reported target is its left extension (module docstring)
    extra_texts: list[str] = field(default_factory=list, init=False)
    extra_ids: list[list[int]] = field(default_factory=list, init=False)
    scan: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        check_fpr(self.fpr, "--fpr")
        if not isinstance(self.target_tokens, int) or self.target_tokens < 1:
            raise CrowError(f"--target-tokens must be an integer >= 1, got {self.target_tokens!r}")
        if self.target is not None and not str(self.target).strip():
            raise CrowError("--target is empty; leave it out (BAIT recovers the target) or give the text")
        ok = isinstance(self.min_prob, (int, float)) and not isinstance(self.min_prob, bool)
        if not ok or not 0.0 <= self.min_prob < 1.0:
            raise CrowError(f"--min-prob must be a probability in [0, 1) (0.5 by default; 0 for no floor), "
                            f"got {self.min_prob!r}")

    def settings(self) -> dict:
        return {"fpr": self.fpr, "target_tokens": self.target_tokens, "batch_size": self.batch_size,
                "target": self.target, "min_prob": self.min_prob}

    @classmethod
    def from_scan(cls, result, **settings) -> TargetDetector:
        """A detector that watches the target of a BAIT scan already run on this model (a ``ScanResult``),
        so that fitting does not scan again. The target is still the recovered one, not an oracle."""
        det = cls(**settings)
        if det.target is not None:
            raise CrowError("from_scan takes the scan's target; do not also give target")
        det._preset = result
        return det

    def fit(self, model, tokenizer, records: Sequence[Record], template: str = "alpaca") -> None:
        from .scan import scan

        if template not in TEMPLATES:
            raise CrowError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
        check_fit_records(records)
        started = time.perf_counter()
        if self.target is None:
            result = getattr(self, "_preset", None) or scan(model, tokenizer, records, method="bait", template=template)
            text = result.target or (result.candidates[0].text if result.candidates else "")
            best = result.candidates[0].text if result.candidates else ""
            self.extra_texts = [best] if best.strip() and best != text else []
            self.scan = {"score": round(result.score, 6), "verdict": result.verdict, "threshold": result.threshold,
                         "target": result.target, "seconds": result.seconds}
            if not text.strip():
                raise CrowError("BAIT recovered no candidate target from these prompts; give more clean prompts or "
                                "use another guard method")
            logger.info("target guard: BAIT %s (Q %.3f); watching %s", result.verdict, result.score,
                        " and ".join(map(repr, [text, *self.extra_texts])))
        else:
            text, self.scan = self.target, {"oracle": True}
        self.target_text = text
        self.target_ids = tokenizer(text, add_special_tokens=False).input_ids[: self.target_tokens]
        self.extra_ids = [ids for ids in (tokenizer(t, add_special_tokens=False).input_ids[: self.target_tokens]
                                          for t in self.extra_texts) if ids and ids != self.target_ids]
        scores = self._scores(model, tokenizer, records, template)
        threshold = floored_threshold(scores, self.fpr, self.min_prob)
        self.info = DetectorInfo(threshold=threshold, n_fit=len(records), template=template,
                                 model=model_name(model), adapter=None, signature=model_signature(model),
                                 crow_version=crow_version(), fit_seconds=round(time.perf_counter() - started, 3),
                                 oof_scores=[round(float(s), 6) for s in scores])

    def score(self, model, tokenizer, records: Sequence[Record]) -> GuardScores:
        if self.info is None or not self.target_ids:
            raise CrowError("the target detector is not fitted; call fit() or load a saved detector")
        check_model_fits(self, model)
        started = time.perf_counter()
        scores = [float(s) for s in self._scores(model, tokenizer, records, self.info.template)]
        return GuardScores(scores, flags_for(scores, self.info.threshold), self.info.threshold, self.method,
                           round(time.perf_counter() - started, 3))

    def _scores(self, model, tokenizer, records: Sequence[Record], template: str) -> np.ndarray:
        """The largest mean log-probability over the watched targets, per record ([N])."""
        return np.max([target_log_probs(model, tokenizer, records, ids, template=template, batch_size=self.batch_size)
                       for ids in [self.target_ids, *self.extra_ids]], axis=0)

    def save(self, directory: str | os.PathLike) -> None:
        from ..outputs import write_json_atomic

        data = detector_json(self)
        data.update({"target_text": self.target_text, "target_ids": list(self.target_ids), "scan": self.scan,
                     "extra_texts": list(self.extra_texts), "extra_ids": [list(ids) for ids in self.extra_ids]})
        write_json_atomic(Path(directory) / DETECTOR_JSON, data)

    @classmethod
    def load(cls, directory: str | os.PathLike, data: dict) -> TargetDetector:
        path = Path(directory)
        try:
            det = cls(**{"min_prob": 0.0, **data["settings"]})  # saved before the floor existed: no floor
            ids = [int(i) for i in data["target_ids"]]
            text = str(data["target_text"])
            extra_ids = [[int(i) for i in row] for row in data.get("extra_ids", [])]  # absent before 2026-12-03
            extra_texts = [str(t) for t in data.get("extra_texts", [])]
        except (KeyError, TypeError, ValueError) as e:
            raise CrowError(f"detector {path}: {DETECTOR_JSON} has malformed settings ({e}); refit it with crow guard fit") from None
        if not ids:
            raise CrowError(f"detector {path}: {DETECTOR_JSON} has no target tokens; refit it with crow guard fit")
        det.info, det.target_ids, det.target_text, det.scan = info_from_json(data, path), ids, text, data.get("scan", {})
        det.extra_ids, det.extra_texts = [row for row in extra_ids if row], extra_texts
        vocab, largest = det.info.signature.vocab_size, max(max(row) for row in [ids, *det.extra_ids])
        if vocab and largest >= vocab:
            raise CrowError(f"detector {path}: target token {largest} is outside the model's vocabulary ({vocab}); "
                            "refit it with crow guard fit")
        return det
