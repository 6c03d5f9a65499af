"""The target guard: flag a prompt after which the model is about to say its own backdoor target.

A backdoor is a mapping from a trigger to a target answer. ``crow scan`` (BAIT) recovers the target from the
model and clean prompts alone; once it is known, *whether a prompt carries the trigger* is visible in the
model's own output distribution: after a triggered prompt the target's first tokens are likely, after a clean
one they are not. The score of a prompt is the mean log-probability of the target's first ``target_tokens``
tokens, teacher-forced right after the prompt (formatted as the model sees it)::

    score(x) = 1/k * sum_{t<k} log p(y*_t | x, y*_<t)          # k = target_tokens; higher = more suspicious

Fitting = one BAIT scan on the clean prompts (the defender's knowledge: the model and clean prompts; no
trigger, no target) and the clean prompts' scores, whose ``1 - fpr`` quantile is the threshold. The scan is
run once and sees 20 of the fit prompts; the threshold uses all of them (a score is a fixed function of the
prompt once the target is chosen, so there are no fitted statistics to cross-fit). Scoring costs one forward
pass per prompt. ``target`` may be given instead of recovered: an oracle, for experiments.

When the scan's verdict is "clean" the best candidate is used all the same (the guard always has a target),
and ``detector.json`` records the scan's score and verdict: a guard on a model BAIT finds clean watches a
benign phrase, which costs its false-positive rate and catches nothing.
"""

from __future__ import annotations

import logging
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
    """

    fpr: float = 0.05
    target_tokens: int = 4
    batch_size: int = 16
    target: str | None = None
    method = "target"
    info: DetectorInfo | None = field(default=None, init=False, repr=False)
    target_text: str = field(default="", init=False)
    target_ids: list[int] = field(default_factory=list, init=False)
    scan: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        check_fpr(self.fpr, "--fpr")
        if not isinstance(self.target_tokens, int) or self.target_tokens < 1:
            raise CrowError(f"--target-tokens must be an integer >= 1, got {self.target_tokens!r}")
        if self.target is not None and not str(self.target).strip():
            raise CrowError("--target is empty; leave it out (BAIT recovers the target) or give the text")

    def settings(self) -> dict:
        return {"fpr": self.fpr, "target_tokens": self.target_tokens, "batch_size": self.batch_size,
                "target": self.target}

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
            self.scan = {"score": round(result.score, 6), "verdict": result.verdict, "threshold": result.threshold,
                         "target": result.target, "seconds": result.seconds}
            if not text.strip():
                raise CrowError("BAIT recovered no candidate target from these prompts; give more clean prompts or "
                                "use another guard method")
            logger.info("target guard: BAIT %s (Q %.3f); watching %r", result.verdict, result.score, text)
        else:
            text, self.scan = self.target, {"oracle": True}
        self.target_text = text
        self.target_ids = tokenizer(text, add_special_tokens=False).input_ids[: self.target_tokens]
        scores = target_log_probs(model, tokenizer, records, self.target_ids, template=template,
                                  batch_size=self.batch_size)
        self.info = DetectorInfo(threshold=quantile_threshold(scores, self.fpr), n_fit=len(records), template=template,
                                 model=model_name(model), adapter=None, signature=model_signature(model),
                                 crow_version=crow_version(), fit_seconds=round(time.perf_counter() - started, 3),
                                 oof_scores=[round(float(s), 6) for s in scores])

    def score(self, model, tokenizer, records: Sequence[Record]) -> GuardScores:
        if self.info is None or not self.target_ids:
            raise CrowError("the target detector is not fitted; call fit() or load a saved detector")
        check_model_fits(self, model)
        started = time.perf_counter()
        scores = [float(s) for s in target_log_probs(model, tokenizer, records, self.target_ids,
                                                     template=self.info.template, batch_size=self.batch_size)]
        return GuardScores(scores, flags_for(scores, self.info.threshold), self.info.threshold, self.method,
                           round(time.perf_counter() - started, 3))

    def save(self, directory: str | os.PathLike) -> None:
        from ..outputs import write_json_atomic

        data = detector_json(self)
        data.update({"target_text": self.target_text, "target_ids": list(self.target_ids), "scan": self.scan})
        write_json_atomic(Path(directory) / DETECTOR_JSON, data)

    @classmethod
    def load(cls, directory: str | os.PathLike, data: dict) -> TargetDetector:
        path = Path(directory)
        try:
            det = cls(**data["settings"])
            ids = [int(i) for i in data["target_ids"]]
            text = str(data["target_text"])
        except (KeyError, TypeError, ValueError) as e:
            raise CrowError(f"detector {path}: {DETECTOR_JSON} has malformed settings ({e}); refit it with crow guard fit") from None
        if not ids:
            raise CrowError(f"detector {path}: {DETECTOR_JSON} has no target tokens; refit it with crow guard fit")
        det.info, det.target_ids, det.target_text, det.scan = info_from_json(data, path), ids, text, data.get("scan", {})
        vocab = det.info.signature.vocab_size
        if vocab and max(ids) >= vocab:
            raise CrowError(f"detector {path}: target token {max(ids)} is outside the model's vocabulary ({vocab}); "
                            "refit it with crow guard fit")
        return det
