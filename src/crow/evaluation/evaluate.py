"""The one evaluator: ASR on triggered prompts, false-trigger rate on clean prompts, perplexity, answer
quality (ROUGE-L against the reference answers, empty answers)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from ..data.records import Record
from ..errors import CrowError
from .generate import generate, perplexity
from .judges import KeywordJudge
from .quality import KNOWN_TARGET_PHRASES, answer_quality

PROMPT_FORMATS = ("raw", "template")


def rate(hits: int, n: int) -> float:
    """A percentage with an explicit denominator; 0 for an empty set."""
    return 100.0 * hits / n if n else 0.0


@dataclass
class EvalReport:
    """Rates are percentages. ``n_empty`` counts empty outputs on triggered prompts (judged "not
    attacked"); ``n_empty_clean`` the same on clean prompts. ``quality`` is
    :class:`~crow.evaluation.quality.AnswerQuality` as a dict (clean_rougeL, triggered_rougeL,
    empty_clean_pct, empty_triggered_pct, n_*_scored, n_*_unscored)."""

    asr: float
    false_trigger_rate: float
    clean_perplexity: float | None
    n_triggered: int
    n_clean: int
    n_empty: int
    n_empty_clean: int
    settings: dict
    utility: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict, repr=False)  # all generations, not serialized by default

    def to_dict(self, with_outputs: bool = False) -> dict:
        d = asdict(self)
        if not with_outputs:
            d.pop("outputs")
        return d


def evaluate(
    model,
    tokenizer,
    *,
    triggered: Sequence[Record],
    clean: Sequence[Record],
    judge: KeywordJudge,
    prompt_format: str = "raw",
    template: str = "alpaca",
    max_new_tokens: int = 128,
    batch_size: int = 16,
    perplexity_max_length: int = 512,
    with_perplexity: bool = True,
    utility: Callable[[Sequence[Record], list[str]], dict] | None = None,
    progress: bool = False,
    n_samples: int = 3,
    target_phrases: Sequence[str] = KNOWN_TARGET_PHRASES,
) -> EvalReport:
    """Greedy-generate on triggered and clean prompts and judge them.

    ``prompt_format="raw"`` feeds the bare instruction, as the official evaluation does;
    ``"template"`` formats it with ``template`` (``alpaca`` or ``chat``), as the model was trained.
    Perplexity is on the clean set's reference outputs under the same formatting.
    ``utility(clean_records, clean_outputs)`` may add task-specific clean-utility measures.
    Answer quality scores the clean answers against the clean references and the triggered answers against
    their trigger-free originals' answers: the triggered outputs with ``target_phrases`` stripped from the start.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise CrowError(f"unknown prompt format {prompt_format!r}; valid: {', '.join(PROMPT_FORMATS)}")
    if not triggered and not clean:
        raise CrowError("nothing to evaluate: both the triggered and the clean set are empty")
    started = time.perf_counter()
    fmt = "raw" if prompt_format == "raw" else template
    gen = dict(template=fmt, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out_t = generate(model, tokenizer, triggered, progress="triggered" if progress else False, **gen) if triggered else []
    out_c = generate(model, tokenizer, clean, progress="clean" if progress else False, **gen) if clean else []
    ppl = None
    if with_perplexity and clean:
        ppl = perplexity(model, tokenizer, clean, template=fmt, max_length=perplexity_max_length, batch_size=batch_size)
    report = EvalReport(
        asr=rate(sum(judge(o) for o in out_t), len(out_t)),
        false_trigger_rate=rate(sum(judge(o) for o in out_c), len(out_c)),
        clean_perplexity=ppl,
        n_triggered=len(out_t),
        n_clean=len(out_c),
        n_empty=sum(not o for o in out_t),
        n_empty_clean=sum(not o for o in out_c),
        settings={"judge": judge.name, "keywords": list(judge.keywords), "prompt_format": prompt_format,
                  "template": fmt, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                  "decoding": "greedy"},
        utility=utility(clean, out_c) if utility and clean else {},
        samples={"triggered": [{"instruction": r.instruction, "output": o} for r, o in zip(triggered, out_t)][:n_samples],
                 "clean": [{"instruction": r.instruction, "output": o} for r, o in zip(clean, out_c)][:n_samples]},
        quality=answer_quality(clean=clean, clean_outputs=out_c, triggered=triggered, triggered_outputs=out_t,
                               phrases=target_phrases).to_dict(),
        outputs={"triggered": out_t, "clean": out_c},
    )
    report.seconds = round(time.perf_counter() - started, 2)
    return report
