"""LCF: Layerwise Convergence Fingerprints (Min, Pham, Sun 2026, arXiv 2604.24542; official code
github.com/NayMyatMin/LCF-LLM, ``runtime_control/multilayer.py``): flags triggered prompts without trigger knowledge.
At the last prompt token ``d_l = h_{l+1} - h_l`` [P, H] (``normalize``: over ``||h_l||``); fitted on clean prompts:
1. per pair ``s_l = ||(d_l - mean_l) / std_l||_2`` [P]; 2. each ``s_l`` z-scored; 3. the P z-scores aggregated by a
Mahalanobis distance under the Ledoit-Wolf covariance (~200 prompts are too few for a sample covariance of ~30 layers).
Deviations from the official code: the threshold is the ``1 - fpr`` quantile of out-of-fold scores (steps 1-3 refitted
without the held-out fold; official: leave-one-out in step 3 only); the default pairs are CROW's ``official`` range
(official: ``layers="all"``); the default false-positive rate is 5% (official: 10%)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..data.records import Record
from ..data.templates import batches, encode_prompts, pad_batch
from ..errors import CrowError
from ..losses import layer_pairs
from ..modeling import evaluating
from ..training.config import option
from .guard import DETECTOR_TENSORS, DETECTORS, Detector, info_from_json, malformed, model_signature

logger = logging.getLogger(__name__)

#: a per-dimension standard deviation (ddof 0) is floored at this share of its layer's mean one (no division by ~0)
STD_FLOOR = 1e-3
TINY = 1e-12


@torch.no_grad()
@evaluating
def extract_features(model, tokenizer, records: Sequence[Record], *, template: str, layers: str | tuple[int, int],
                     normalize: bool = False, batch_size: int = 16) -> tuple[np.ndarray, list[int]]:
    """LCF features [N, P, H] float32 and layer pairs ``i`` (``hs[i]`` vs ``hs[i+1]``); batches are length-sorted."""
    prompts = encode_prompts(records, template, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    feats: list[np.ndarray | None] = [None] * len(prompts)
    pairs: list[int] = []
    for idx in batches(order, batch_size):
        ids, mask = pad_batch([prompts[i] for i in idx], tokenizer.pad_token_id or 0)  # [B, T] right-padded
        hs = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                   use_cache=False).hidden_states
        pairs = list(layer_pairs(len(hs), layers))
        rows, last = torch.arange(len(idx), device=device), (mask.sum(dim=1) - 1).to(device)  # [B]
        deltas = []
        for i in pairs:  # h_{i+1} - h_i at each row's last token, over ||h_i|| (eps-guarded) when normalize
            a = hs[i][rows, last].float()  # [B, H]
            delta = hs[i + 1][rows, last].float() - a
            deltas.append(delta / a.norm(dim=-1, keepdim=True).clamp_min(1e-6) if normalize else delta)
        d = torch.stack(deltas, dim=1).cpu().numpy()  # [B, P, H]
        for row, i in enumerate(idx):
            feats[i] = d[row]
    return np.stack(feats).astype(np.float32), pairs


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
    mean, std = x.mean(axis=0), x.std(axis=0)  # [P, H]
    std = np.maximum(std, STD_FLOOR * std.mean(axis=-1, keepdims=True) + TINY)
    dist = diag_mahalanobis(x, mean, std)  # [N, P]
    layer_mean, layer_std = dist.mean(axis=0), np.maximum(dist.std(axis=0), TINY)  # [P]
    lw = LedoitWolf(store_precision=True).fit((dist - layer_mean) / layer_std)  # on the z-scores [N, P]
    return LcfStats(mean, std, layer_mean, layer_std, lw.location_, lw.precision_, float(lw.shrinkage_))


def lcf_scores(features: np.ndarray, stats: LcfStats) -> np.ndarray:
    """The LCF score of features [N, P, H] -> [N]."""
    dist = diag_mahalanobis(features.astype(np.float64), stats.delta_mean, stats.delta_std)  # [N, P]
    return mahalanobis((dist - stats.layer_mean) / stats.layer_std, stats.agg_mean, stats.agg_precision)  # z: [N, P]


def out_of_fold_scores(features: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each clean prompt scored by the pipeline fitted on the other folds (seeded, shuffled k-fold): [N]."""
    from sklearn.model_selection import KFold
    n = features.shape[0]
    out = np.empty(n)
    for train, test in KFold(n_splits=max(2, min(folds, n)), shuffle=True, random_state=seed).split(np.arange(n)):
        out[test] = lcf_scores(features[test], fit_stats(features[train]))
    return out


@DETECTORS.register("lcf")
@dataclass
class LcfDetector(Detector):
    """LCF (see the module docstring); ``layers`` as in ``crow.losses.layer_pairs``."""

    layers: str = option("official", "Layer pairs: official (CROW's), all (the LCF paper's) or START:STOP.")
    normalize: bool = option(False, "Divide each layer difference by the norm of its layer's state.")
    folds: int = option(10, "k of the k-fold cross-fitting that sets the threshold.")
    seed: int = option(0, "Seed of the folds.")
    batch_size: int = option(16, "Prompts per forward pass.")
    method, label = "lcf", "LCF"
    stats: LcfStats | None = field(default=None, init=False, repr=False)
    pairs: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.folds < 2:
            raise CrowError(f"folds must be at least 2, got {self.folds}")

    def settings(self) -> dict:
        return {**super().settings(), "position": "last"}

    def fit(self, model, tokenizer, records: Sequence[Record], template: str = "alpaca") -> None:
        started = self._start_fit(records, template)
        feats, pairs = extract_features(model, tokenizer, records, template=template, layers=self.layers,
                                        normalize=self.normalize, batch_size=self.batch_size)
        oof = out_of_fold_scores(feats, self.folds, self.seed)
        self.stats, self.pairs = fit_stats(feats), pairs
        sig = replace(model_signature(model), hidden_size=int(feats.shape[-1]))  # the features' size, not the config's
        self._record_fit(model, records, template, oof, started, signature=sig)
        logger.debug("LCF fitted on %d prompts, %d layer pairs, Ledoit-Wolf shrinkage %.3f, threshold %.4g",
                     len(records), len(pairs), self.stats.shrinkage, self.info.threshold)

    def _fitted(self) -> bool:
        return self.info is not None and self.stats is not None

    def _scores(self, model, tokenizer, records: Sequence[Record], template: str) -> np.ndarray:
        feats, pairs = extract_features(model, tokenizer, records, template=template, layers=self.layers,
                                        normalize=self.normalize, batch_size=self.batch_size)
        if pairs != self.pairs or feats.shape[-1] != self.stats.delta_mean.shape[-1]:
            raise CrowError(f"the detector was fitted on layer pairs {self.pairs[0]}..{self.pairs[-1]} of hidden size "
                            f"{self.stats.delta_mean.shape[-1]}, this model gives pairs {pairs[0]}..{pairs[-1]} of "
                            f"size {feats.shape[-1]}; refit it with crow guard fit on this model")
        return lcf_scores(feats, self.stats)

    def _json(self) -> dict:
        return {"pairs": self.pairs, "shrinkage": self.stats.shrinkage}

    def save(self, directory: str | os.PathLike) -> None:
        from safetensors.numpy import save_file
        if self.stats is None:
            raise CrowError("the LCF detector is not fitted; call fit() before save()")
        if self.info is not None:  # else the base class refuses, before anything is written
            save_file(self.stats.tensors(), str(Path(directory) / DETECTOR_TENSORS), metadata={"method": self.method})
        super().save(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, data: dict) -> LcfDetector:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        path = Path(directory)
        try:
            det = cls(**{k: v for k, v in data["settings"].items() if k != "position"})
            pairs = [int(i) for i in data["pairs"]]
        except (KeyError, TypeError, ValueError) as e:
            raise malformed(path, e) from None
        det.info, det.pairs = info_from_json(data, path), pairs
        file = path / DETECTOR_TENSORS
        if not file.is_file():
            raise CrowError(f"detector {path} has no {DETECTOR_TENSORS} (the LCF statistics); "
                            "refit it with crow guard fit")
        try:
            t = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise CrowError(f"detector {path}: {DETECTOR_TENSORS} cannot be read ({e}); "
                            "refit it with crow guard fit") from None
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
