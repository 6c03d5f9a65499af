"""crow guard: fit a per-prompt trigger detector on clean prompts, then score incoming prompts."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..errors import CrowError
from .options import add_model_arguments, add_options, as_flags, check_file, flag, given, load_from_args, positive_int

logger = logging.getLogger(__name__)
COMMON = ("fpr", "batch_size")  # every guard method's


def add_arguments(p) -> None:
    from ..detection.guard import DETECTORS
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True
    fit = sub.add_parser("fit", help="fit a detector on clean prompts (at most 200)",
                         description="Fit a per-prompt trigger detector on the defender's clean prompts and write "
                                     "DETECTOR_DIR (detector.json + detector.safetensors).")
    score = sub.add_parser("score", help="score and flag prompts with a fitted detector", description="Score "
                           "prompts with a detector from crow guard fit; flags those above its threshold.")
    for q in (fit, score):
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks and debug logs")
        add_model_arguments(q)
    fit.add_argument("--data", required=True, help="clean prompts (JSON/JSONL instruction records; outputs not needed)")
    fit.add_argument("--out", required=True, help="detector directory to write")
    fit.add_argument("--method", default="target", choices=DETECTORS.names(),
                     help="target: likelihood of the model's own backdoor target, recovered by crow scan (BAIT); the "
                          "baselines lcf: layer-difference fingerprints (Min et al. 2026) and onion: perplexity drop "
                          "per removed word (default: target)")
    fit.add_argument("--template", default="alpaca", choices=("alpaca", "chat", "chat-nosystem", "raw"),
                     help="prompt formatting, as the model sees prompts at generation time")
    fit.add_argument("--limit", type=positive_int("--limit"),
                     help="use the first N prompts (a guard fits on at most 200)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    add_options(fit.add_argument_group("every method"), DETECTORS.get(DETECTORS.names()[0]), COMMON,
                defaults={"batch_size": "lcf 16, onion 32, target 16"})
    own, seen = {}, set(COMMON)
    for method in DETECTORS.names():
        fields = set(DETECTORS.get(method).__dataclass_fields__) - seen
        own[method] = add_options(fit.add_argument_group(f"--method {method}"), DETECTORS.get(method), fields)
        seen.update(own[method])
    fit.set_defaults(_guard_options=own)
    score.add_argument("--batch-size", type=positive_int("--batch-size"), help="prompts per forward pass "
                       "(default: the detector's)")
    score.add_argument("--detector", required=True, help="directory written by crow guard fit")
    score.add_argument("--data", required=True, help="prompts to score (JSON/JSONL instruction records)")
    score.add_argument("--limit", type=positive_int("--limit"), help="score only the first N prompts")
    score.add_argument("--out", help="scores JSON path (one entry per prompt)")


def run(args) -> int:
    return fit(args) if args.action == "fit" else score(args)


def scoring_model(detector, args):
    """The model a detector scores with: the guarded one, or ONION's separate scorer."""
    scorer = getattr(detector, "scorer_model", None)
    if scorer:
        from ..models import load_model
        return load_model(scorer, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                          dtype=args.dtype, device="auto")
    from ..training.loop import merged
    loaded = load_from_args(args)
    loaded.model = merged(loaded.model)
    return loaded


def warn_other_model(detector, args) -> None:
    """Same shape, other name (a moved file, or a purified adapter): allowed, but said."""
    info = detector.info
    if not getattr(detector, "scorer_model", None) and (info.model, info.adapter) != (args.model, args.adapter):
        logger.warning("the detector was fitted on %s%s; scoring with %s%s (a detector describes one model: refit it "
                       "if this is another)", info.model, f" + {info.adapter}" if info.adapter else "", args.model,
                       f" + {args.adapter}" if args.adapter else "")


def fit(args) -> int:
    from ..data.records import load_records
    from ..detection.guard import MAX_FIT_PROMPTS, get_detector
    from ..outputs import check_output_dir, staged_dir
    check_file(args.data, "--data")
    if args.limit is not None and args.limit > MAX_FIT_PROMPTS:
        raise CrowError(f"--limit {args.limit} is more than the {MAX_FIT_PROMPTS} clean prompts a guard fits on; "
                        f"pass --limit {MAX_FIT_PROMPTS} or less")
    records = load_records(args.data, require_output=False, what="--data")
    if args.limit is None and len(records) > MAX_FIT_PROMPTS:
        raise CrowError(f"--data {args.data} holds {len(records)} prompts, more than the {MAX_FIT_PROMPTS} a guard "
                        f"fits on; pass --limit {MAX_FIT_PROMPTS} to use the first {MAX_FIT_PROMPTS}")
    records = records[: args.limit]
    own = args._guard_options
    mine = set(own[args.method]) | set(COMMON)
    foreign = sorted(set(given(args, {n for ns in own.values() for n in ns})) - mine)
    if foreign:
        other = next(m for m, ns in own.items() if foreign[0] in ns)
        raise CrowError(f"{flag(foreign[0])} is an option of --method {other}; drop it for --method {args.method}")
    settings = given(args, mine)
    try:
        detector = get_detector(args.method, **settings)
    except CrowError as e:
        raise CrowError(as_flags(str(e), mine)) from None
    out = check_output_dir(args.out, inputs=[args.model, args.adapter, args.data], overwrite=args.overwrite)
    loaded = scoring_model(detector, args)
    detector.fit(loaded.model, loaded.tokenizer, records, template=args.template)
    scorer = getattr(detector, "scorer_model", None)
    detector.info.model = scorer or args.model
    detector.info.adapter = None if scorer else args.adapter
    with staged_dir(out) as tmp:
        detector.save(tmp)
    info = detector.info
    summary = {"out": str(out), "method": detector.method, "n_fit": info.n_fit, "fpr": detector.fpr,
               "threshold": round(info.threshold, 6), "fit_seconds": info.fit_seconds}
    if detector.method == "target":  # what the guard watches, and what the scan said of the model
        summary.update(watching=[detector.target_text, *detector.extra_texts], scan=detector.scan)
    print(json.dumps(summary))
    return 0


def score(args) -> int:
    from ..data.records import load_records
    from ..detection.guard import check_model_fits, load_detector
    from ..outputs import write_json_atomic
    detector = load_detector(args.detector)
    check_file(args.data, "--data")
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or not out.parent.exists()):
        raise CrowError(f"--out {out} must be a file path in an existing directory")
    records = load_records(args.data, require_output=False, what="--data")[: args.limit]
    if args.batch_size:
        detector.batch_size = args.batch_size
    warn_other_model(detector, args)
    loaded = scoring_model(detector, args)
    check_model_fits(detector, loaded.model)
    result = detector.score(loaded.model, loaded.tokenizer, records)
    summary = {"n": len(records), "flagged": result.n_flagged,
               "share_flagged": round(result.n_flagged / len(records), 4), "threshold": round(result.threshold, 6),
               "method": result.method, "seconds_per_prompt": round(result.seconds_per_prompt, 5)}
    if out is not None:
        write_json_atomic(out, {**summary, "detector": args.detector, "data": args.data, "model": args.model,
                                "adapter": args.adapter,
                                "prompts": [{"instruction": r.instruction, "score": round(s, 6), "flagged": f}
                                            for r, s, f in zip(records, result.scores, result.flags)]})
    print(json.dumps(summary))
    return 0
