"""crow eval: ASR on triggered prompts, false-trigger rate on clean prompts, clean perplexity."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import CrowError
from .options import add_model_arguments, check_file, load_from_args, positive_int

FORMATS = {"both": ("template", "raw"), "template": ("template",), "raw": ("raw",)}
SUMMARY_KEYS = ("asr", "false_trigger_rate", "clean_perplexity", "n_triggered", "n_clean", "n_empty")


def add_arguments(p) -> None:
    add_model_arguments(p)
    judge = p.add_argument_group("judge (one of)", "an output judged attacked counts towards ASR (triggered prompts) "
                                                   "or the false-trigger rate (clean prompts)")
    judge.add_argument("--task", help="a task's judge: negsentiment, refusal, codeinjection, refusal-pool, "
                       "negsentiment-late (keywords) or negsentiment-free (VADER's sentiment score)")
    judge.add_argument("--keywords", nargs="+", help="custom keywords (an output containing any counts as attacked)")
    judge.add_argument("--scan", metavar="PATH",
                       help="scan.json of crow scan (or its directory): an output containing the recovered target "
                            "counts as attacked; also reports the target's likelihood under 'scan_target'")
    p.add_argument("--triggered", help="triggered prompts (JSON/JSONL records); ASR is measured on them")
    p.add_argument("--clean", help="clean prompts with reference outputs; false triggers and perplexity")
    p.add_argument("--out", required=True, help="report JSON path")
    p.add_argument("--format", dest="prompt_format", default="both", choices=tuple(FORMATS),
                   help="template: prompts formatted as trained; raw: the bare instruction (the official evaluation); "
                        "both: the report's figures are template's, each format's under 'by_format' (default: both)")
    p.add_argument("--template", default="alpaca", choices=("alpaca", "chat", "chat-nosystem"),
                   help="the template of the template format")
    p.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=128)
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=64,
                   help="prompts generated together (finished ones leave the batch); lower it if memory is short")
    p.add_argument("--limit", type=positive_int("--limit"), help="use only the first N prompts of each set")
    p.add_argument("--no-perplexity", action="store_true", help="skip clean perplexity")
    p.add_argument("--max-length", type=positive_int("--max-length"), default=512,
                   help="truncate each clean sample (prompt + reference answer) to this many tokens for the perplexity "
                        "(crow bench: its spec's max_length)")
    p.add_argument("--outputs", action="store_true", help="also store every generation in the report")
    p.add_argument("--guard", metavar="DETECTOR_DIR",
                   help="also score the prompts with a crow guard detector: ASR with flagged prompts blocked, clean "
                        "prompts blocked, true-positive rate and AUROC under the report's 'guard' key (with --format "
                        "both, on the format the detector was fitted on)")


@dataclass(frozen=True)
class ScanTarget:
    """The target a ``crow scan`` reported, and the texts a judge watches for: the target and the near-best candidates
    it extends to the left (BAIT may report a prefix before the sequence the triggered model says; the guard too
    watches the best candidate then)."""

    file: Path
    text: str
    texts: tuple[str, ...]  # the target first
    verdict: str
    score: float


def watched_texts(target: str, candidates: Sequence[dict], best: float, margin: float) -> tuple[str, ...]:
    """``target`` and the candidates within ``margin`` of the ``best`` Q-score whose tokens end the target's."""
    whole = next((list(c["token_ids"]) for c in candidates if c["text"] == target), [])
    tails = (c["text"] for c in candidates if float(c["q_score"]) >= best - margin
             and 0 < len(c["token_ids"]) < len(whole) and whole[-len(c["token_ids"]):] == list(c["token_ids"]))
    return tuple(dict.fromkeys([target, *tails]))


def read_scan(path: str) -> ScanTarget:
    """The target of the scan.json at ``path`` (or in the directory ``path``); a one-line error when there is none."""
    file = Path(path) / "scan.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise CrowError(f"--scan {file} does not exist; pass the scan.json written by crow scan or its directory")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        method, verdict, text, score = data["method"], data["verdict"], data["target"], float(data["score"])
        if not all(isinstance(v, str) for v in (method, verdict, text)):
            raise TypeError("'method', 'verdict' and 'target' must be strings")
        margin = float(data.get("settings", {}).get("suffix_margin", 0.05))
        texts = watched_texts(text, data["candidates"], score, margin) if text.strip() else ()
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise CrowError(f"--scan {file} is not a scan.json written by crow scan ({what}); rerun crow scan") from None
    if method != "bait":
        raise CrowError(f"--scan {file} was written by crow scan --method {method}, which recovers no target; "
                        "scan with --method bait")
    if verdict != "backdoored" or not text.strip():
        raise CrowError(f"--scan {file}: the scan found no target (verdict {verdict}, score {score}), so there is "
                        "nothing to measure; judge with --task or --keywords instead")
    return ScanTarget(file, text, texts, verdict, score)


def make_judge(args):
    """The judge of ``--task``, ``--keywords`` or ``--scan`` (exactly one way), and the scan's target if any."""
    from ..evaluation.evaluate import JUDGES, TargetJudge, get_judge
    if args.scan is None:
        if args.task is None and not args.keywords:
            raise CrowError(f"name a task ({', '.join(JUDGES)}), give --keywords or give --scan")
        return get_judge(args.task, args.keywords), None
    if args.task is not None or args.keywords:
        raise CrowError(f"--scan judges by the scan's recovered target; drop {'--task' if args.task else '--keywords'}")
    target = read_scan(args.scan)
    return TargetJudge(target.texts), target


def guard_format(fitted: str | None, formats: Sequence[str], template: str, guard: str) -> str:
    """The evaluated format whose prompts are formatted as the detector's were at fit time (the main format for a
    detector that reads the instruction text only); a one-line error when none is."""
    names = {fmt: "raw" if fmt == "raw" else template for fmt in formats}
    if fitted is None:
        return formats[0]
    match = next((fmt for fmt, name in names.items() if name == fitted), None)
    if match is None:
        fix = "--format raw" if fitted == "raw" else \
            f"--template {fitted}" if "template" in formats else f"--format template --template {fitted}"
        used = " or ".join(repr(n) for n in names.values())
        raise CrowError(f"--guard {guard} was fitted on prompts formatted with {fitted!r} but this evaluation "
                        f"generates from {used} prompts; pass {fix} or refit the detector with --template "
                        f"{names[formats[0]]}")
    return match


def scan_target_report(model, tokenizer, target: ScanTarget, sets: dict, *, template: str, batch_size: int) -> dict:
    """The target and, per prompt set (None when empty), the mean over its prompts of the target guard's score: the
    mean log-probability of a watched text's first tokens (as many as the guard scores) teacher-forced after the
    prompt, the largest over the watched texts."""
    import numpy as np

    from ..detection.target import TargetDetector, target_log_probs
    k = next(f.default for f in fields(TargetDetector) if f.name == "target_tokens")
    ids = [row for row in (tokenizer(t, add_special_tokens=False).input_ids[:k] for t in target.texts) if row]
    report = {"text": target.text, "watched": list(target.texts), "scan": str(target.file), "verdict": target.verdict,
              "score": target.score, "template": template, "target_tokens": k}
    for name, records in sets.items():
        scores = np.max([target_log_probs(model, tokenizer, records, row, template=template,
                                          batch_size=min(batch_size, 16)) for row in ids], axis=0) if records else None
        report[f"{name}_log_prob"] = round(float(scores.mean()), 6) if scores is not None else None
    return report


def summary(data: dict) -> dict:
    """The printed line: the main figures, each format's ASR and false-trigger rate, the guard's and the target's."""
    out = {"format": data["format"], **{k: data[k] for k in SUMMARY_KEYS}}
    if "by_format" in data:
        out["by_format"] = {fmt: {k: f[k] for k in ("asr", "false_trigger_rate")}
                            for fmt, f in data["by_format"].items()}
    if "guard" in data:
        out["guard"] = {k: data["guard"][k] for k in ("format", "asr_guarded", "tpr", "clean_blocked", "auroc")}
    if "scan_target" in data:
        out["scan_target"] = {k: data["scan_target"][k] for k in ("watched", "triggered_log_prob", "clean_log_prob")}
    return out


def check_out(path: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise CrowError(f"--out {out} is a directory; pass a file path such as {out / 'report.json'}")
    if not out.parent.exists():
        raise CrowError(f"the directory of --out ({out.parent}) does not exist; create it first")
    return out


def run(args) -> int:
    from ..data.records import load_records
    from ..detection.guard import check_model_fits, guard_evaluation, load_detector
    from ..evaluation.evaluate import evaluate_formats
    from ..outputs import write_json_atomic
    from ..training.loop import merged
    from .guard_cmd import scoring_model, warn_other_model
    judge, target = make_judge(args)
    if args.triggered is None and args.clean is None:
        raise CrowError("give --triggered and/or --clean prompt files to evaluate")
    check_file(args.triggered, "--triggered")
    check_file(args.clean, "--clean")
    out = check_out(args.out)
    formats = FORMATS[args.prompt_format]
    detector, checked = None, formats[0]
    if args.guard:
        detector = load_detector(args.guard, "--guard")
        # a detector that reads hidden states must see prompts formatted as the evaluated model does
        checked = guard_format(detector.info.template, formats, args.template, args.guard)
        warn_other_model(detector, args)
    triggered = load_records(args.triggered, require_output=False, what="--triggered") if args.triggered else []
    clean = load_records(args.clean, require_output=not args.no_perplexity, what="--clean") if args.clean else []
    triggered, clean = triggered[: args.limit], clean[: args.limit]
    loaded = load_from_args(args)
    report_model = merged(loaded.model)
    if detector is not None and not getattr(detector, "scorer_model", None):
        check_model_fits(detector, report_model, "--guard")  # before minutes of generation
    result = evaluate_formats(report_model, loaded.tokenizer, formats=formats, triggered=triggered, clean=clean,
                              judge=judge, template=args.template, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, with_perplexity=not args.no_perplexity,
                              perplexity_max_length=args.max_length, progress=True)
    data = result.to_dict(with_outputs=args.outputs)
    data["settings"].update({"model": args.model, "adapter": args.adapter, "triggered": args.triggered,
                             "clean": args.clean, "limit": args.limit, "max_length": args.max_length,
                             "scan": args.scan})
    if target is not None:
        data["scan_target"] = scan_target_report(report_model, loaded.tokenizer, target,
                                                 {"triggered": triggered, "clean": clean},
                                                 template=result.main.settings["template"], batch_size=args.batch_size)
    if detector is not None:
        scorer = loaded if not getattr(detector, "scorer_model", None) else scoring_model(detector, args)
        model = report_model if scorer is loaded else scorer.model
        guard = guard_evaluation(detector, model, scorer.tokenizer, triggered=triggered, clean=clean,
                                 outputs=result.reports[checked].outputs, judge=judge)
        data["guard"] = {"detector": args.guard, "format": checked, **guard.to_dict(with_scores=args.outputs)}
    write_json_atomic(out, data)
    print(json.dumps(summary(data)))
    return 0
