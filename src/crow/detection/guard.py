"""``crow guard``: per-prompt backdoor-trigger detectors, fitted on the defender's clean prompts.

A detector scores a prompt (higher = more suspicious) and flags it when the score is above a threshold
set for a stated false-positive rate on clean prompts. Three methods, one registry (``DETECTORS``; each
method's module registers itself, and ``crow.detection`` imports them all, so this module imports none):

| name  | what it scores                                                                              |
|-------|---------------------------------------------------------------------------------------------|
| lcf   | Layerwise Convergence Fingerprints (Min, Pham, Sun 2026, arXiv 2604.24542): how far the     |
|       | prompt's inter-layer hidden-state differences at its last token lie from the clean ones     |
| onion | ONION (Qi et al., EMNLP 2021): the largest drop in perplexity when one word is removed      |
| target| the model's own backdoor target (recovered by ``crow scan``, BAIT): how likely its first     |
|       | tokens are right after the prompt (:mod:`.target`)                                          |

Thresholds come from out-of-fold scores on the clean prompts (k-fold cross-fitting), so the clean
prompts that set the threshold are scored by a detector that has not seen them; the deployed detector
is then refitted on all of them. A detector is saved as ``detector.json`` (settings, threshold, the
model it was fitted on) plus, for LCF, ``detector.safetensors`` (its statistics); never pickle.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..data.records import Record
from ..errors import CrowError

logger = logging.getLogger(__name__)

DETECTOR_JSON = "detector.json"
DETECTOR_TENSORS = "detector.safetensors"
FORMAT_VERSION = 1
#: the defender's budget of clean prompts (the LCF paper calibrates on 200)
MAX_FIT_PROMPTS = 200
#: fewer clean prompts than this cannot give a meaningful 1 - fpr quantile
MIN_FIT_PROMPTS = 10
MAX_FPR = 0.5


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
@dataclass
class GuardScores:
    """One score per prompt (higher = more suspicious) and its flag (``score > threshold``)."""

    scores: list[float]
    flags: list[bool]
    threshold: float
    method: str
    seconds: float = 0.0

    @property
    def n_flagged(self) -> int:
        return sum(self.flags)

    @property
    def seconds_per_prompt(self) -> float:
        return self.seconds / len(self.scores) if self.scores else 0.0


@dataclass
class ModelSignature:
    """What a detector must agree on with the model it scores under (None = unknown, not checked)."""

    hidden_size: int | None
    num_layers: int | None
    vocab_size: int | None

    def mismatch(self, other: ModelSignature) -> str | None:
        """The first field that differs (both known), as ``"hidden_size 32 vs 64"``; None when they agree."""
        for name in ("hidden_size", "num_layers", "vocab_size"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and mine != theirs:
                return f"{name} {mine} (detector) vs {theirs} (model)"
        return None


@dataclass
class DetectorInfo:
    """What ``detector.json`` records besides the method's own settings."""

    threshold: float
    n_fit: int
    template: str | None  # how prompts were formatted (None: the method reads the instruction text only)
    model: str | None
    adapter: str | None
    signature: ModelSignature
    crow_version: str
    fit_seconds: float = 0.0
    oof_scores: list[float] = field(default_factory=list)  # the clean out-of-fold scores behind the threshold


def model_signature(model) -> ModelSignature:
    """Hidden size, layer count and vocabulary size from the model's (text) config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names):
        for n in names:
            value = getattr(config, n, None)
            if isinstance(value, int):
                return value
        return None

    return ModelSignature(hidden_size=first("hidden_size", "n_embd", "d_model"),
                          num_layers=first("num_hidden_layers", "n_layer", "num_layers"),
                          vocab_size=first("vocab_size"))


def model_name(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


# ------------------------------------------------------------------------------------------------
# The detector interface and registry
# ------------------------------------------------------------------------------------------------
class Detector(Protocol):
    """A per-prompt detector. ``fit`` sets the statistics and the threshold from clean prompts;
    ``score`` scores and flags prompts; ``save`` writes a directory that ``load`` reads back."""

    method: str
    fpr: float
    batch_size: int
    info: DetectorInfo | None

    def fit(self, model, tokenizer, records: Sequence[Record], template: str = "alpaca") -> None: ...

    def score(self, model, tokenizer, records: Sequence[Record]) -> GuardScores: ...

    def settings(self) -> dict: ...

    def save(self, directory: str | os.PathLike) -> None: ...

    @classmethod
    def load(cls, directory: str | os.PathLike, data: dict) -> Detector: ...


DETECTORS: dict[str, type] = {}


def register(name: str):
    def wrap(cls):
        DETECTORS[name] = cls
        return cls
    return wrap


def get_detector(method: str, **settings) -> Detector:
    """A new (unfitted) detector by name; unknown names and settings list the valid ones."""
    import dataclasses

    if method not in DETECTORS:
        raise CrowError(f"unknown guard method {method!r}; valid: {', '.join(DETECTORS)}")
    cls = DETECTORS[method]
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise CrowError(f"guard method {method!r} has no setting {unknown[0]!r}; valid: {', '.join(sorted(valid))}")
    return cls(**settings)


# ------------------------------------------------------------------------------------------------
# Validation and thresholds (pure)
# ------------------------------------------------------------------------------------------------
def check_fpr(fpr: float, option: str = "fpr") -> float:
    if not isinstance(fpr, (int, float)) or not math.isfinite(fpr) or not 0.0 < fpr <= MAX_FPR:
        raise CrowError(f"{option} must be in (0, {MAX_FPR}] (a false-positive rate such as 0.05), got {fpr}")
    return float(fpr)


def check_fit_records(records: Sequence[Record], what: str = "clean prompts") -> None:
    n = len(records)
    if n == 0:
        raise CrowError(f"no {what} to fit the detector on; pass a file of clean instruction records")
    if n > MAX_FIT_PROMPTS:
        raise CrowError(f"{n} {what} given, more than the {MAX_FIT_PROMPTS} a guard is fitted on; "
                        f"pass --limit {MAX_FIT_PROMPTS} (the first {MAX_FIT_PROMPTS}) or a smaller file")
    if n < MIN_FIT_PROMPTS:
        raise CrowError(f"only {n} {what}; a guard needs at least {MIN_FIT_PROMPTS} to set its threshold "
                        f"(about 200 are recommended)")


def quantile_threshold(scores: np.ndarray, fpr: float) -> float:
    """The ``ceil((1 - fpr) * n)``-th smallest of ``scores`` [n]: at most ``fpr * n`` scores lie strictly
    above it, so flagging ``score > threshold`` flags at most the share ``fpr`` of these scores."""
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise CrowError("cannot set a threshold: the clean scores are empty or not finite")
    k = math.ceil((1.0 - fpr) * scores.size - 1e-9)  # 1-based rank; the epsilon absorbs float error in (1-fpr)*n
    return float(scores[min(max(k, 1), scores.size) - 1])


def fold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint test-index sets covering ``range(n)`` in a seeded random order."""
    from sklearn.model_selection import KFold

    k = max(2, min(folds, n))
    return [test for _, test in KFold(n_splits=k, shuffle=True, random_state=seed).split(np.arange(n))]


def flags_for(scores: Sequence[float], threshold: float) -> list[bool]:
    return [bool(s > threshold) for s in scores]


# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------
def detector_json(detector: Detector) -> dict:
    info = detector.info
    if info is None:
        raise CrowError("the detector is not fitted; call fit() before save()")
    d = {"format_version": FORMAT_VERSION, "method": detector.method, "settings": detector.settings()}
    d.update(asdict(info))
    return d


def info_from_json(data: dict, path: Path) -> DetectorInfo:
    try:
        sig = ModelSignature(**data["signature"])
        return DetectorInfo(threshold=float(data["threshold"]), n_fit=int(data["n_fit"]), template=data["template"],
                            model=data["model"], adapter=data["adapter"], signature=sig,
                            crow_version=str(data["crow_version"]), fit_seconds=float(data.get("fit_seconds", 0.0)),
                            oof_scores=[float(x) for x in data.get("oof_scores", [])])
    except (KeyError, TypeError, ValueError) as e:
        raise CrowError(f"detector {path}: {DETECTOR_JSON} is incomplete or malformed ({type(e).__name__}: {e}); "
                        "refit it with crow guard fit") from None


def load_detector(directory: str | os.PathLike, option: str = "--detector") -> Detector:
    """Read a detector directory written by ``crow guard fit`` (validated; one-line errors)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise CrowError(f"{option} {path} does not exist or is not a directory; pass a directory written by "
                        "crow guard fit")
    file = path / DETECTOR_JSON
    if not file.is_file():
        raise CrowError(f"{option} {path} has no {DETECTOR_JSON}; pass a directory written by crow guard fit")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CrowError(f"{option} {path}: {DETECTOR_JSON} is not valid JSON ({e}); refit it with crow guard fit") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise CrowError(f"{option} {path}: {DETECTOR_JSON} is not a crow guard detector of format version "
                        f"{FORMAT_VERSION}; refit it with crow guard fit")
    method = data.get("method")
    if method not in DETECTORS:
        raise CrowError(f"{option} {path}: unknown method {method!r} in {DETECTOR_JSON}; valid: {', '.join(DETECTORS)}")
    return DETECTORS[method].load(path, data)


def check_model_fits(detector: Detector, model, what: str = "--detector") -> None:
    """Refuse a model whose shape differs from the one the detector was fitted on; warn on another name."""
    info = detector.info
    if info is None:
        raise CrowError("the detector is not fitted; call fit() or load a saved detector")
    problem = info.signature.mismatch(model_signature(model))
    if problem:
        raise CrowError(f"{what} was fitted on another model ({info.model}: {problem}); "
                        "refit it with crow guard fit on this model")


# ------------------------------------------------------------------------------------------------
# Guarded evaluation
# ------------------------------------------------------------------------------------------------
@dataclass
class GuardReport:
    """The guard in front of an evaluated model. Rates are percentages (None: empty set).

    ``asr_guarded``: triggered prompts that are attacked *and* not flagged (a blocked prompt gets no
    answer, so it counts as not attacked); ``clean_blocked``: clean prompts flagged (the guard's cost);
    ``tpr``: triggered prompts flagged; ``auroc``: triggered (positive) vs clean scores, threshold-free.
    """

    method: str
    threshold: float
    fpr_target: float
    n_triggered: int
    n_clean: int
    tpr: float | None
    clean_blocked: float | None
    asr: float | None
    asr_guarded: float | None
    false_trigger_rate_guarded: float | None
    auroc: float | None
    seconds: float = 0.0
    seconds_per_prompt: float = 0.0
    scores: dict = field(default_factory=dict, repr=False)

    def to_dict(self, with_scores: bool = False) -> dict:
        d = asdict(self)
        if not with_scores:
            d.pop("scores")
        return d


def _pct(hits: int, n: int) -> float | None:
    return round(100.0 * hits / n, 4) if n else None


def guard_metrics(triggered: GuardScores, clean: GuardScores, triggered_attacked: Sequence[bool],
                  clean_attacked: Sequence[bool], *, fpr_target: float) -> GuardReport:
    """Blocked ASR, clean blocked share, TPR and AUROC from scores and judged outputs (pure)."""
    from sklearn.metrics import roc_auc_score

    if len(triggered_attacked) != len(triggered.flags) or len(clean_attacked) != len(clean.flags):
        raise ValueError("one judged output per scored prompt is needed")
    nt, nc = len(triggered.flags), len(clean.flags)
    auroc = None
    if nt and nc:
        labels = [1] * nt + [0] * nc
        auroc = round(float(roc_auc_score(labels, list(triggered.scores) + list(clean.scores))), 6)
    seconds = triggered.seconds + clean.seconds
    return GuardReport(
        method=triggered.method or clean.method, threshold=triggered.threshold if nt else clean.threshold,
        fpr_target=fpr_target, n_triggered=nt, n_clean=nc,
        tpr=_pct(triggered.n_flagged, nt), clean_blocked=_pct(clean.n_flagged, nc),
        asr=_pct(sum(map(bool, triggered_attacked)), nt),
        asr_guarded=_pct(sum(a and not f for a, f in zip(triggered_attacked, triggered.flags)), nt),
        false_trigger_rate_guarded=_pct(sum(a and not f for a, f in zip(clean_attacked, clean.flags)), nc),
        auroc=auroc, seconds=round(seconds, 3), seconds_per_prompt=round(seconds / max(nt + nc, 1), 5),
        scores={"triggered": [round(s, 6) for s in triggered.scores], "clean": [round(s, 6) for s in clean.scores]},
    )


def guard_evaluation(detector: Detector, model, tokenizer, *, triggered: Sequence[Record], clean: Sequence[Record],
                     outputs: dict[str, list[str]], judge) -> GuardReport:
    """Score the evaluated prompts with ``detector`` and combine with the judged generations
    (``outputs`` = an :class:`~crow.evaluation.evaluate.EvalReport`'s ``outputs``)."""
    check_model_fits(detector, model)
    empty = GuardScores([], [], detector.info.threshold, detector.method)
    t = detector.score(model, tokenizer, triggered) if triggered else empty
    c = detector.score(model, tokenizer, clean) if clean else empty
    return guard_metrics(t, c, [judge(o) for o in outputs.get("triggered", [])],
                         [judge(o) for o in outputs.get("clean", [])], fpr_target=detector.fpr)
