"""LCF: Layerwise Convergence Fingerprints (Min, Pham, Sun 2026, arXiv 2604.24542), a run-time detector of
triggered prompts that needs no trigger knowledge, no clean reference model and no training.

For one prompt, formatted as the model sees it at generation time, one forward pass gives the hidden
states; at the last prompt token (the position that predicts the first answer token) take the
differences of consecutive layers ``d_l = h_{l+1} - h_l`` ([P, H] for P layer pairs). Then, as the
authors' code (github.com/NayMyatMin/LCF-LLM, ``runtime_control/multilayer.py``) does:

1. per layer pair, a diagonal Mahalanobis distance ``s_l = ||(d_l - mean_l) / std_l||_2`` with per-dimension
   mean and standard deviation from the clean prompts ([P] scores);
2. each ``s_l`` z-scored with its mean and standard deviation over the clean prompts;
3. the P z-scores aggregated by a Mahalanobis distance whose P x P covariance is the Ledoit-Wolf shrinkage
   estimate on the clean prompts (``sklearn.covariance.LedoitWolf``): layers' scores are correlated, and
   with ~200 prompts and ~30 layers the sample covariance is too noisy to invert unshrunk.

The per-dimension statistics are never shrunk: each is a mean over all clean prompts, and only P x P
(not (P*H) x (P*H)) covariances are formed, so fitting costs milliseconds after the forward passes.

Deviations from the authors' code, and why:

- the threshold is the ``1 - fpr`` quantile of *out-of-fold* scores with the whole pipeline (steps 1-3)
  refitted without the held-out fold; the authors leave one out of step 3 only, so steps 1-2 have seen
  the prompt they score, which makes clean scores look smaller than on new prompts (with H > n a
  prompt inside the fit has per-dimension z-scores of mean square 1 exactly);
- the default layer pairs are CROW's ``official`` range (``hidden_states[1:-2]`` vs ``[2:-1]``), not all
  pairs: the embedding pair and the pair ending in the post-final-norm state measure the embedding table
  and the norm rather than the layers' processing (``layers="all"`` gives the authors' choice);
- the default false-positive rate is 5% (the authors calibrate at 10%; ``fpr`` sets it);
- ``normalize=True`` divides each ``d_l`` by ``||h_l||`` (the relative update of the residual stream),
  optional and off by default, as in the paper.
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
from ..losses import layer_pairs
from ..outputs import crow_version
from .guard import (DETECTOR_JSON, DETECTOR_TENSORS, DetectorInfo, GuardScores, check_fit_records, check_fpr,
                    check_model_fits, detector_json, flags_for, fold_indices, info_from_json, model_name,
                    model_signature, quantile_threshold, register)

logger = logging.getLogger(__name__)

#: a per-dimension standard deviation is floored at this share of its layer's mean one, so a dimension
#: that is (nearly) constant on clean prompts cannot dominate a layer's distance by division by ~0
STD_FLOOR = 1e-3
TINY = 1e-12


# ------------------------------------------------------------------------------------------------
# Features: inter-layer differences at the last prompt token
# ------------------------------------------------------------------------------------------------
def last_token_deltas(hidden_states: Sequence[torch.Tensor], last: torch.Tensor, pairs: Sequence[int], *,
                      normalize: bool = False) -> torch.Tensor:
    """``h_{i+1} - h_i`` at each row's ``last`` position for every pair ``i``: [B, P, H] in fp32.

    ``hidden_states``: N tensors [B, T, H]; ``last``: [B] index of each row's last prompt token.
    ``normalize`` divides each difference by ``||h_i||`` (eps-guarded)."""
    rows = torch.arange(last.shape[0], device=last.device)
    out = []
    for i in pairs:
        a = hidden_states[i][rows, last].float()  # [B, H]
        b = hidden_states[i + 1][rows, last].float()  # [B, H]
        d = b - a
        if normalize:
            d = d / a.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        out.append(d)
    return torch.stack(out, dim=1)  # [B, P, H]


@torch.no_grad()
def extract_features(model, tokenizer, records: Sequence[Record], *, template: str, layers: str | tuple[int, int],
                     normalize: bool = False, batch_size: int = 16) -> tuple[np.ndarray, list[int]]:
    """LCF features of ``records`` ([N, P, H] float32) and the layer pairs ``i`` (``hs[i]`` vs ``hs[i+1]``).

    Prompts are right-padded in length-sorted batches, so each row's last real token sits at its
    length - 1 and no padding precedes it (causal attention: the padding cannot change it)."""
    prompts = [encode_prompt(format_prompt(r, template, tokenizer), template, tokenizer) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    feats: list[np.ndarray | None] = [None] * len(prompts)
    pairs: list[int] = []
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_batch([prompts[i] for i in idx], pad)  # [B, T] right-padded
            hs = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                       use_cache=False).hidden_states
            pairs = list(layer_pairs(len(hs), layers))
            last = (mask.sum(dim=1) - 1).to(device)  # [B]
            d = last_token_deltas(hs, last, pairs, normalize=normalize).cpu().numpy()  # [B, P, H]
            for row, i in enumerate(idx):
                feats[i] = d[row]
    finally:
        model.train(was_training)
    return np.stack(feats).astype(np.float32), pairs


# ------------------------------------------------------------------------------------------------
# Statistics and scores (pure numpy)
# ------------------------------------------------------------------------------------------------
@dataclass
class LcfStats:
    """Everything the score needs, fitted on clean features."""

    delta_mean: np.ndarray  # [P, H]
    delta_std: np.ndarray  # [P, H]
    layer_mean: np.ndarray  # [P] mean of the per-layer distances
    layer_std: np.ndarray  # [P]
    agg_mean: np.ndarray  # [P] mean of the z-scored distances
    agg_precision: np.ndarray  # [P, P] inverse of the Ledoit-Wolf covariance
    shrinkage: float = 0.0  # the Ledoit-Wolf intensity (0 = sample covariance, 1 = scaled identity)

    def tensors(self) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(getattr(self, k), dtype=np.float64)
                for k in ("delta_mean", "delta_std", "layer_mean", "layer_std", "agg_mean", "agg_precision")}


def floored_std(x: np.ndarray, axis: int) -> np.ndarray:
    """Standard deviation along ``axis`` (ddof 0), floored at ``STD_FLOOR`` x its mean over the last axis."""
    std = x.std(axis=axis)
    floor = STD_FLOOR * std.mean(axis=-1, keepdims=True) + TINY
    return np.maximum(std, floor)


def diag_mahalanobis(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``||(x - mean) / std||_2`` over the last axis: features [N, P, H], mean/std [P, H] -> [N, P]."""
    z = (features - mean) / std  # [N, P, H]
    return np.sqrt(np.einsum("nph,nph->np", z, z))


def mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """``sqrt((x - mean)^T precision (x - mean))``: x [N, P], mean [P], precision [P, P] -> [N]."""
    d = x - mean  # [N, P]
    return np.sqrt(np.maximum(np.einsum("np,pq,nq->n", d, precision, d), 0.0))


def fit_stats(features: np.ndarray) -> LcfStats:
    """Steps 1-3 of the module docstring on clean features [N, P, H] (float64 inside)."""
    from sklearn.covariance import LedoitWolf

    x = features.astype(np.float64)
    mean, std = x.mean(axis=0), floored_std(x, axis=0)  # [P, H]
    dist = diag_mahalanobis(x, mean, std)  # [N, P]
    layer_mean, layer_std = dist.mean(axis=0), np.maximum(dist.std(axis=0), TINY)  # [P]
    z = (dist - layer_mean) / layer_std  # [N, P]
    lw = LedoitWolf(store_precision=True).fit(z)
    return LcfStats(mean, std, layer_mean, layer_std, lw.location_, lw.precision_, float(lw.shrinkage_))


def lcf_scores(features: np.ndarray, stats: LcfStats) -> np.ndarray:
    """The LCF score of features [N, P, H] -> [N]."""
    dist = diag_mahalanobis(features.astype(np.float64), stats.delta_mean, stats.delta_std)  # [N, P]
    z = (dist - stats.layer_mean) / stats.layer_std  # [N, P]
    return mahalanobis(z, stats.agg_mean, stats.agg_precision)


def out_of_fold_scores(features: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each clean prompt scored by the pipeline fitted on the other folds: [N]."""
    out = np.empty(features.shape[0])
    for test in fold_indices(features.shape[0], folds, seed):
        train = np.setdiff1d(np.arange(features.shape[0]), test)
        out[test] = lcf_scores(features[test], fit_stats(features[train]))
    return out


# ------------------------------------------------------------------------------------------------
# The detector
# ------------------------------------------------------------------------------------------------
@register("lcf")
@dataclass
class LcfDetector:
    """LCF (see the module docstring).

    Args:
        fpr: target false-positive rate on clean prompts (the threshold's quantile is 1 - fpr).
        layers: layer pairs (``crow.losses.layer_pairs``): ``official`` (CROW's), ``all`` (the paper's) or ``A:B``.
        normalize: divide each difference by the norm of the lower layer's state.
        folds: k of the k-fold cross-fitting behind the threshold.
        seed: the folds' shuffle.
        batch_size: prompts per forward pass.
    """

    fpr: float = 0.05
    layers: str = "official"
    normalize: bool = False
    folds: int = 10
    seed: int = 0
    batch_size: int = 16
    method = "lcf"
    info: DetectorInfo | None = field(default=None, init=False, repr=False)
    stats: LcfStats | None = field(default=None, init=False, repr=False)
    pairs: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        check_fpr(self.fpr, "--fpr")
        if self.folds < 2:
            raise CrowError(f"folds must be at least 2, got {self.folds}")

    def settings(self) -> dict:
        return {"fpr": self.fpr, "layers": self.layers, "normalize": self.normalize, "folds": self.folds,
                "seed": self.seed, "batch_size": self.batch_size, "position": "last"}

    def fit(self, model, tokenizer, records: Sequence[Record], template: str = "alpaca") -> None:
        if template not in TEMPLATES:
            raise CrowError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
        check_fit_records(records)
        started = time.perf_counter()
        feats, pairs = extract_features(model, tokenizer, records, template=template, layers=self.layers,
                                        normalize=self.normalize, batch_size=self.batch_size)
        oof = out_of_fold_scores(feats, self.folds, self.seed)
        self.stats, self.pairs = fit_stats(feats), pairs
        sig = model_signature(model)
        sig.hidden_size = int(feats.shape[-1])  # what the features had, whatever the config calls it
        self.info = DetectorInfo(threshold=quantile_threshold(oof, self.fpr), n_fit=len(records), template=template,
                                 model=model_name(model), adapter=None, signature=sig, crow_version=crow_version(),
                                 fit_seconds=round(time.perf_counter() - started, 3),
                                 oof_scores=[round(float(s), 6) for s in oof])
        logger.debug("LCF fitted on %d prompts, %d layer pairs, Ledoit-Wolf shrinkage %.3f, threshold %.4g",
                     len(records), len(pairs), self.stats.shrinkage, self.info.threshold)

    def score(self, model, tokenizer, records: Sequence[Record]) -> GuardScores:
        if self.info is None or self.stats is None:
            raise CrowError("the LCF detector is not fitted; call fit() or load a saved detector")
        check_model_fits(self, model)
        started = time.perf_counter()
        feats, pairs = extract_features(model, tokenizer, records, template=self.info.template, layers=self.layers,
                                        normalize=self.normalize, batch_size=self.batch_size)
        if pairs != self.pairs or feats.shape[-1] != self.stats.delta_mean.shape[-1]:
            raise CrowError(f"the detector was fitted on layer pairs {self.pairs[0]}..{self.pairs[-1]} of hidden size "
                            f"{self.stats.delta_mean.shape[-1]}, this model gives pairs {pairs[0]}..{pairs[-1]} of "
                            f"size {feats.shape[-1]}; refit it with crow guard fit on this model")
        scores = [float(s) for s in lcf_scores(feats, self.stats)]
        return GuardScores(scores, flags_for(scores, self.info.threshold), self.info.threshold, self.method,
                           round(time.perf_counter() - started, 3))

    def save(self, directory: str | os.PathLike) -> None:
        from safetensors.numpy import save_file

        from ..outputs import write_json_atomic

        if self.stats is None:
            raise CrowError("the LCF detector is not fitted; call fit() before save()")
        path = Path(directory)
        data = detector_json(self)
        data.update({"pairs": self.pairs, "shrinkage": self.stats.shrinkage})
        save_file(self.stats.tensors(), str(path / DETECTOR_TENSORS), metadata={"method": self.method})
        write_json_atomic(path / DETECTOR_JSON, data)

    @classmethod
    def load(cls, directory: str | os.PathLike, data: dict) -> LcfDetector:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(directory)
        try:
            det = cls(**{k: v for k, v in data["settings"].items() if k != "position"})
            pairs = [int(i) for i in data["pairs"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CrowError(f"detector {path}: {DETECTOR_JSON} has malformed settings ({e}); refit it with crow guard fit") from None
        det.info, det.pairs = info_from_json(data, path), pairs
        file = path / DETECTOR_TENSORS
        if not file.is_file():
            raise CrowError(f"detector {path} has no {DETECTOR_TENSORS} (the LCF statistics); refit it with crow guard fit")
        try:
            t = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise CrowError(f"detector {path}: {DETECTOR_TENSORS} cannot be read ({e}); refit it with crow guard fit") from None
        p, h = len(pairs), det.info.signature.hidden_size
        shapes = {"delta_mean": (p, h), "delta_std": (p, h), "layer_mean": (p,), "layer_std": (p,),
                  "agg_mean": (p,), "agg_precision": (p, p)}
        for key, shape in shapes.items():
            if key not in t or tuple(t[key].shape) != shape or not np.all(np.isfinite(t[key])):
                got = tuple(t[key].shape) if key in t else "missing"
                raise CrowError(f"detector {path}: {DETECTOR_TENSORS} '{key}' is {got}, expected a finite {shape} "
                                f"for {p} layer pairs of size {h}; refit it with crow guard fit")
        det.stats = LcfStats(**t, shrinkage=float(data.get("shrinkage", 0.0)))
        return det
