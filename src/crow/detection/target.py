"""The target guard: it flags a prompt after which the model is about to say its own backdoor target (recovered by
BAIT, ``crow scan``, from the model and clean prompts alone): score ``1/k sum_{t<k} log p(y*_t | x, y*_<t)`` over the
target's first k = ``target_tokens`` tokens teacher-forced after the formatted prompt, threshold
``max(quantile_{1-fpr}(clean scores), log(min_prob))`` (a flag means at least ``min_prob`` geometric-mean odds of the
target; the quantile alone does not transfer across prompt distributions), nothing cross-fitted. When the scan reports a
left extension of its best candidate (:func:`~crow.detection.bait.recovered_target`), which the triggered model may not
say, both are watched and the larger score counts. ``target`` may be given instead (an oracle)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.records import Record
from ..data.templates import batches, encode_prompts, pad_batch
from ..errors import CrowError
from ..modeling import evaluating, keeps_logits
from ..training.config import check, finite, option
from .guard import DETECTOR_JSON, DETECTORS, Detector, info_from_json, malformed, quantile_threshold
from .scan import scan

logger = logging.getLogger(__name__)


@torch.no_grad()
@evaluating
def target_log_probs(model, tokenizer, records: Sequence[Record], target_ids: Sequence[int], *, template: str,
                     batch_size: int = 16) -> np.ndarray:
    """Mean log-probability of ``target_ids`` teacher-forced after each (right-padded) prompt: [N] float64. Prompts
    are batched by length and only the positions that predict a target token are given logits (``logits_to_keep``
    where the model takes it), so memory stays near one batch's target logits, not [B, T, vocab] (262k on Gemma)."""
    if not target_ids:
        raise CrowError("the target has no tokens; give a non-empty target")
    k = len(target_ids)
    prompts = encode_prompts(records, template, tokenizer)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    target = torch.tensor(list(target_ids), dtype=torch.long, device=device)[:, None]  # [k, 1]
    trailing = keeps_logits(model)
    out = np.zeros(len(prompts), dtype=np.float64)
    for idx in batches(sorted(range(len(prompts)), key=lambda i: len(prompts[i])), batch_size):
        ids, mask = pad_batch([list(prompts[i]) + list(target_ids) for i in idx], pad)  # [B, T] prompt + target
        # the logits at position j predict token j + 1: prompt i's target tokens sit at len(prompts[i]) + 0..k-1
        first = min(len(prompts[i]) for i in idx) - 1  # the first position whose logits are needed
        keep = {"logits_to_keep": ids.shape[1] - first} if trailing else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **keep).logits
        offset = first if trailing else 0  # logits[:, j] is position j + offset
        for row, i in enumerate(idx):
            start = len(prompts[i]) - 1 - offset
            logp = torch.log_softmax(logits[row, start : start + k].float(), dim=-1)  # [k, V]
            out[i] = logp.gather(1, target).mean().item()
    return out


def threshold_floor(min_prob: float) -> float:
    """``log(min_prob)``, the lowest threshold the target guard uses (-inf for 0: no floor)."""
    return math.log(min_prob) if min_prob > 0.0 else -math.inf


def floored_threshold(scores: np.ndarray, fpr: float, min_prob: float) -> float:
    """The clean scores' ``1 - fpr`` quantile (``quantile_threshold``), raised to ``log(min_prob)`` when below it."""
    return max(quantile_threshold(scores, fpr), threshold_floor(min_prob))


@DETECTORS.register("target")
@dataclass
class TargetDetector(Detector):
    """The target guard (see the module docstring). ``target`` None (default) recovers the target with BAIT at fit
    time; ``min_prob`` 0 is the clean quantile alone, as detectors saved without this setting keep."""

    target_tokens: int = option(4, "How many of the target's first tokens are scored.")
    batch_size: int = option(16, "Prompts per forward pass.")
    target: str | None = option(None, "Watch this text instead of the one the scan recovers (an oracle, for "
                                      "experiments).")
    min_prob: float = option(0.5, "Flag only prompts after which the model gives its target at least this "
                                  "geometric-mean probability (the threshold's floor; 0: the clean quantile alone).")
    method, label = "target", "target"
    target_text: str = field(default="", init=False)
    target_ids: list[int] = field(default_factory=list, init=False)
    # the scan's best candidate when the reported target is its left extension (module docstring)
    extra_texts: list[str] = field(default_factory=list, init=False)
    extra_ids: list[list[int]] = field(default_factory=list, init=False)
    scan: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.target_tokens, int) or self.target_tokens < 1:
            raise CrowError(f"--target-tokens must be an integer >= 1, got {self.target_tokens!r}")
        if self.target is not None and not str(self.target).strip():
            raise CrowError("--target is empty; leave it out (BAIT recovers the target) or give the text")
        check(finite(self.min_prob) and self.min_prob < 1.0, "--min-prob",
              "a probability in [0, 1) (0.5 by default; 0 for no floor)", self.min_prob)

    @classmethod
    def from_scan(cls, result, **settings) -> TargetDetector:
        """A detector watching the (recovered, not oracle) target of a BAIT ``ScanResult`` of this model: no rescan."""
        det = cls(**settings)
        if det.target is not None:
            raise CrowError("from_scan takes the scan's target; do not also give target")
        det._preset = result
        return det

    def fit(self, model, tokenizer, records: Sequence[Record], template: str = "alpaca") -> None:
        started = self._start_fit(records, template)
        if self.target is None:
            result = getattr(self, "_preset", None) or scan(model, tokenizer, records, method="bait", template=template)
            best = result.candidates[0].text if result.candidates else ""
            text = result.target or best
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
        self._record_fit(model, records, template, scores, started, floored_threshold(scores, self.fpr, self.min_prob))

    def _fitted(self) -> bool:
        return self.info is not None and bool(self.target_ids)

    def _scores(self, model, tokenizer, records: Sequence[Record], template: str) -> np.ndarray:
        """The largest mean log-probability over the watched targets, per record ([N])."""
        return np.max([target_log_probs(model, tokenizer, records, ids, template=template, batch_size=self.batch_size)
                       for ids in [self.target_ids, *self.extra_ids]], axis=0)

    def _json(self) -> dict:
        return {"target_text": self.target_text, "target_ids": list(self.target_ids), "scan": self.scan,
                "extra_texts": list(self.extra_texts), "extra_ids": [list(ids) for ids in self.extra_ids]}

    @classmethod
    def load(cls, directory: str | os.PathLike, data: dict) -> TargetDetector:
        path = Path(directory)
        try:
            det = cls(**{"min_prob": 0.0, **data["settings"]})  # saved before the floor existed: no floor
            ids = [int(i) for i in data["target_ids"]]
            text = str(data["target_text"])
            extra_ids = [[int(i) for i in row] for row in data.get("extra_ids", [])]  # absent in older detectors
            extra_texts = [str(t) for t in data.get("extra_texts", [])]
        except (KeyError, TypeError, ValueError) as e:
            raise malformed(path, e) from None
        if not ids:
            raise CrowError(f"detector {path}: {DETECTOR_JSON} has no target tokens; refit it with crow guard fit")
        det.info, det.target_ids, det.target_text = info_from_json(data, path), ids, text
        det.scan = data.get("scan", {})
        det.extra_ids, det.extra_texts = [row for row in extra_ids if row], extra_texts
        vocab, largest = det.info.signature.vocab_size, max(max(row) for row in [ids, *det.extra_ids])
        if vocab and largest >= vocab:
            raise CrowError(f"detector {path}: target token {largest} is outside the model's vocabulary ({vocab}); "
                            "refit it with crow guard fit")
        return det
