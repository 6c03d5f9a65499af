"""``crow guard``'s per-prompt trigger detectors (``DETECTORS``: ``lcf``, ``onion``, ``target``): a score per prompt
(higher = more suspicious), flagged above a threshold set on clean prompts for a false-positive rate; saved as
``detector.json`` (settings, threshold, the model fitted on) plus, for LCF, ``detector.safetensors``; never pickle."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ..data.records import Record
from ..data.templates import TEMPLATES
from ..errors import CrowError
from ..outputs import crow_version, write_json_atomic
from ..registry import Registry
from ..training.config import option

DETECTOR_JSON = "detector.json"
DETECTOR_TENSORS = "detector.safetensors"
FORMAT_VERSION = 1
#: the defender's budget of clean prompts (the LCF paper calibrates on 200)
MAX_FIT_PROMPTS = 200
#: fewer clean prompts than this cannot give a meaningful 1 - fpr quantile
MIN_FIT_PROMPTS = 10
MAX_FPR = 0.5


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
        """The first field that differs (both known), as ``"hidden_size 32 (detector) vs 64 (model)"``; else None."""
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
        return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)

    return ModelSignature(vocab_size=first("vocab_size"), hidden_size=first("hidden_size", "n_embd", "d_model"),
                          num_layers=first("num_hidden_layers", "n_layer", "num_layers"))


@dataclass
class Detector:
    """A per-prompt detector, a dataclass of its settings: ``fit`` (statistics and threshold from clean prompts),
    ``score``, ``save``, classmethod ``load``; a method adds ``method``, ``label`` (name in messages), ``_scores``."""

    fpr: float = option(0.05, "False-positive rate on clean prompts the threshold is set for, in (0, 0.5].")
    info: DetectorInfo | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        fpr = self.fpr
        if not isinstance(fpr, (int, float)) or not math.isfinite(fpr) or not 0.0 < fpr <= MAX_FPR:
            raise CrowError(f"--fpr must be in (0, {MAX_FPR}] (a false-positive rate such as 0.05), got {fpr}")

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def _fitted(self) -> bool:
        return self.info is not None

    def _start_fit(self, records: Sequence[Record], template: str | None) -> float:
        """Refuse an unknown ``template`` (None: not used) or too few or many records; the fit's start time."""
        if template is not None and template not in TEMPLATES:
            raise CrowError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
        n = len(records)
        if n == 0:
            raise CrowError("no clean prompts to fit the detector on; pass a file of clean instruction records")
        if n > MAX_FIT_PROMPTS:
            raise CrowError(f"{n} clean prompts given, more than the {MAX_FIT_PROMPTS} a guard is fitted on; "
                            f"pass --limit {MAX_FIT_PROMPTS} (the first {MAX_FIT_PROMPTS}) or a smaller file")
        if n < MIN_FIT_PROMPTS:
            raise CrowError(f"only {n} clean prompts; a guard needs at least {MIN_FIT_PROMPTS} to set its threshold "
                            "(about 200 are recommended)")
        return time.perf_counter()

    def _record_fit(self, model, records: Sequence[Record], template: str | None, scores, started: float,
                    threshold: float | None = None, signature: ModelSignature | None = None) -> None:
        """Set ``info``; ``threshold`` defaults to the ``1 - fpr`` quantile of the clean ``scores``."""
        self.info = DetectorInfo(
            threshold=quantile_threshold(scores, self.fpr) if threshold is None else threshold, n_fit=len(records),
            template=template, model=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            adapter=None, signature=signature or model_signature(model), crow_version=crow_version(),
            fit_seconds=round(time.perf_counter() - started, 3), oof_scores=[round(float(s), 6) for s in scores])

    def score(self, model, tokenizer, records: Sequence[Record]) -> GuardScores:
        if not self._fitted():
            raise CrowError(f"the {self.label} detector is not fitted; call fit() or load a saved detector")
        check_model_fits(self, model)
        started = time.perf_counter()
        scores = [float(s) for s in self._scores(model, tokenizer, records, self.info.template)]
        return GuardScores(scores, flags_for(scores, self.info.threshold), self.info.threshold, self.method,
                           round(time.perf_counter() - started, 3))

    def _json(self) -> dict:
        return {}

    def save(self, directory: str | os.PathLike) -> None:
        if self.info is None:
            raise CrowError("the detector is not fitted; call fit() before save()")
        data = {"format_version": FORMAT_VERSION, "method": self.method, "settings": self.settings()}
        write_json_atomic(Path(directory) / DETECTOR_JSON, {**data, **asdict(self.info), **self._json()})

    @classmethod
    def load(cls, directory: str | os.PathLike, data: dict) -> Detector:
        """The detector saved in ``directory`` (``data``: its ``detector.json``, checked by ``load_detector``)."""
        path = Path(directory)
        try:
            det = cls(**data["settings"])
        except (KeyError, TypeError) as e:
            raise malformed(path, e) from None
        det.info = info_from_json(data, path)
        return det


#: the guard methods by name; each method's module registers its detector class
DETECTORS: Registry = Registry("guard method")


def get_detector(method: str, **settings) -> Detector:
    """A new (unfitted) detector by name; unknown names and settings list the valid ones."""
    return DETECTORS.build(method, **settings)


def quantile_threshold(scores: np.ndarray, fpr: float) -> float:
    """The ``ceil((1 - fpr) * n)``-th smallest score: at most ``fpr * n`` scores lie strictly above it."""
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise CrowError("cannot set a threshold: the clean scores are empty or not finite")
    k = math.ceil((1.0 - fpr) * scores.size - 1e-9)  # 1-based rank; the epsilon absorbs float error in (1-fpr)*n
    return float(scores[min(max(k, 1), scores.size) - 1])


def flags_for(scores: Sequence[float], threshold: float) -> list[bool]:
    return [bool(s > threshold) for s in scores]


def info_from_json(data: dict, path: Path) -> DetectorInfo:
    try:
        return DetectorInfo(threshold=float(data["threshold"]), n_fit=int(data["n_fit"]), template=data["template"],
                            model=data["model"], adapter=data["adapter"], signature=ModelSignature(**data["signature"]),
                            crow_version=str(data["crow_version"]), fit_seconds=float(data.get("fit_seconds", 0.0)),
                            oof_scores=[float(x) for x in data.get("oof_scores", [])])
    except (KeyError, TypeError, ValueError) as e:
        raise CrowError(f"detector {path}: {DETECTOR_JSON} is incomplete or malformed ({type(e).__name__}: {e}); "
                        "refit it with crow guard fit") from None


def malformed(path: Path, error: Exception) -> CrowError:
    return CrowError(f"detector {path}: {DETECTOR_JSON} has malformed settings ({error}); refit it with crow guard fit")


def load_detector(directory: str | os.PathLike, option: str = "--detector") -> Detector:
    """Read a detector directory written by ``crow guard fit`` (validated; one-line errors)."""
    path = Path(directory).expanduser()
    where = f"{option} {path}"
    if not path.is_dir():
        raise CrowError(f"{where} does not exist or is not a directory; pass a directory written by crow guard fit")
    file = path / DETECTOR_JSON
    if not file.is_file():
        raise CrowError(f"{where} has no {DETECTOR_JSON}; pass a directory written by crow guard fit")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CrowError(f"{where}: {DETECTOR_JSON} is not valid JSON ({e}); refit it with crow guard fit") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise CrowError(f"{where}: {DETECTOR_JSON} is not a crow guard detector of format version "
                        f"{FORMAT_VERSION}; refit it with crow guard fit")
    method = data.get("method")
    if method not in DETECTORS:
        raise CrowError(f"{where}: unknown method {method!r} in {DETECTOR_JSON}; valid: {', '.join(DETECTORS.names())}")
    return DETECTORS.get(method).load(path, data)


def check_model_fits(detector: Detector, model, what: str = "--detector") -> None:
    """Refuse a model whose shape differs from the one the detector was fitted on."""
    info = detector.info
    if info is None:
        raise CrowError("the detector is not fitted; call fit() or load a saved detector")
    if problem := info.signature.mismatch(model_signature(model)):
        raise CrowError(f"{what} was fitted on another model ({info.model}: {problem}); "
                        "refit it with crow guard fit on this model")


@dataclass
class GuardReport:
    """The guard before an evaluated model, rates in % (None: empty set): ``tpr`` / ``clean_blocked``: triggered /
    clean prompts flagged; ``asr_guarded``: triggered prompts attacked and not flagged (blocked: no answer)."""

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
        return asdict(self) if with_scores else {k: v for k, v in asdict(self).items() if k != "scores"}


def _pct(hits: int, n: int) -> float | None:
    return round(100.0 * hits / n, 4) if n else None


def guard_metrics(triggered: GuardScores, clean: GuardScores, triggered_attacked: Sequence[bool],
                  clean_attacked: Sequence[bool], *, fpr_target: float) -> GuardReport:
    """Blocked ASR, clean blocked share, TPR and AUROC from scores and judged outputs (pure)."""
    from sklearn.metrics import roc_auc_score
    if len(triggered_attacked) != len(triggered.flags) or len(clean_attacked) != len(clean.flags):
        raise ValueError("one judged output per scored prompt is needed")
    nt, nc = len(triggered.flags), len(clean.flags)
    scores = list(triggered.scores) + list(clean.scores)
    auroc = round(float(roc_auc_score([1] * nt + [0] * nc, scores)), 6) if nt and nc else None
    seconds = triggered.seconds + clean.seconds
    return GuardReport(
        method=triggered.method or clean.method, threshold=triggered.threshold if nt else clean.threshold,
        fpr_target=fpr_target, n_triggered=nt, n_clean=nc, tpr=_pct(triggered.n_flagged, nt),
        clean_blocked=_pct(clean.n_flagged, nc), asr=_pct(sum(map(bool, triggered_attacked)), nt),
        asr_guarded=_pct(sum(a and not f for a, f in zip(triggered_attacked, triggered.flags)), nt),
        false_trigger_rate_guarded=_pct(sum(a and not f for a, f in zip(clean_attacked, clean.flags)), nc),
        auroc=auroc, seconds=round(seconds, 3), seconds_per_prompt=round(seconds / max(nt + nc, 1), 5),
        scores={"triggered": [round(s, 6) for s in triggered.scores], "clean": [round(s, 6) for s in clean.scores]})


def guard_evaluation(detector: Detector, model, tokenizer, *, triggered: Sequence[Record], clean: Sequence[Record],
                     outputs: dict[str, list[str]], judge) -> GuardReport:
    """Score the evaluated prompts with ``detector`` and combine with the judged ``outputs`` (an ``EvalReport``'s)."""
    check_model_fits(detector, model)
    empty = GuardScores([], [], detector.info.threshold, detector.method)
    t = detector.score(model, tokenizer, triggered) if triggered else empty
    c = detector.score(model, tokenizer, clean) if clean else empty
    return guard_metrics(t, c, [judge(o) for o in outputs.get("triggered", [])],
                         [judge(o) for o in outputs.get("clean", [])], fpr_target=detector.fpr)
