"""crow guard: fit a per-prompt trigger detector on clean prompts, then score incoming prompts."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import logging

from ..errors import CrowError
from .common import add_model_arguments, check_file, load_from_args, positive_int


logger = logging.getLogger(__name__)


def fpr_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fpr must be a number in (0, 0.5], got {text!r}") from None
    if not math.isfinite(value) or not 0.0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"--fpr must be in (0, 0.5] (a false-positive rate such as 0.05), got {text}")
    return value


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True
    fit = sub.add_parser("fit", help="fit a detector on clean prompts (at most 200)",
                         description="Fit a per-prompt trigger detector on the defender's clean prompts and write "
                                     "DETECTOR_DIR (detector.json + detector.safetensors).")
    score = sub.add_parser("score", help="score and flag prompts with a fitted detector",
                           description="Score prompts with a detector from crow guard fit; flags those above its threshold.")
    for q in (fit, score):
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
        add_model_arguments(q)
        q.add_argument("--batch-size", type=positive_int("--batch-size"), help="prompts per forward pass "
                       "(default: the method's, 16 for lcf, 32 texts for onion)")
    fit.add_argument("--data", required=True, help="clean prompts (JSON/JSONL instruction records; outputs not needed)")
    fit.add_argument("--out", required=True, help="detector directory to write")
    fit.add_argument("--method", default="lcf", choices=("lcf", "onion", "target"),
                     help="lcf: layer-difference fingerprints (Min et al. 2026); onion: perplexity drop per removed word; "
                          "target: likelihood of the model's own backdoor target, recovered by crow scan (BAIT)")
    fit.add_argument("--fpr", type=fpr_value, default=0.05, help="target false-positive rate on clean prompts (0, 0.5]")
    fit.add_argument("--template", default="alpaca", choices=("alpaca", "chat", "chat-nosystem", "raw"),
                     help="prompt formatting, as the model sees prompts at generation time (lcf)")
    fit.add_argument("--limit", type=positive_int("--limit"), help="use the first N prompts (a guard fits on at most 200)")
    fit.add_argument("--layers", default="official",
                     help="lcf layer pairs: official (CROW's, default), all (the LCF paper's) or START:STOP")
    fit.add_argument("--normalize", action="store_true", help="lcf: divide each layer difference by ||h_l||")
    fit.add_argument("--folds", type=positive_int("--folds"), default=10, help="lcf: k of the k-fold threshold cross-fitting")
    fit.add_argument("--onion-model", help="onion: score perplexity with this model instead of the guarded one")
    fit.add_argument("--target-tokens", type=positive_int("--target-tokens"), default=4,
                     help="target: how many of the target's first tokens are scored")
    fit.add_argument("--target", help="target: watch this text instead of the recovered one (an oracle, for experiments)")
    fit.add_argument("--min-prob", type=float, default=0.5,
                     help="target: flag only prompts after which the model gives its target at least this "
                          "geometric-mean probability (the threshold's floor; 0 = the clean quantile alone)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
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
    from ..purification import merged

    loaded = load_from_args(args)
    loaded.model = merged(loaded.model)
    return loaded


def warn_other_model(detector, args) -> None:
    """Same shape, other name (a moved file, or a purified adapter): allowed, but said."""
    info = detector.info
    if getattr(detector, "scorer_model", None):
        return
    if (info.model, info.adapter) != (args.model, args.adapter):
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
    records = records[: args.limit] if args.limit else records
    lcf_only = args.normalize or args.layers != "official" or args.folds != 10
    target_only = args.target is not None or args.target_tokens != 4 or args.min_prob != 0.5
    if args.onion_model and args.method != "onion":
        raise CrowError("--onion-model is a setting of --method onion; drop it or pass --method onion")
    if lcf_only and args.method != "lcf":
        raise CrowError(f"--layers, --normalize and --folds are settings of --method lcf; drop them for --method {args.method}")
    if target_only and args.method != "target":
        raise CrowError("--target, --target-tokens and --min-prob are settings of --method target; drop them for "
                        f"--method {args.method}")
    if args.method == "lcf":
        settings = {"fpr": args.fpr, "layers": args.layers, "normalize": args.normalize, "folds": args.folds}
    elif args.method == "onion":
        settings = {"fpr": args.fpr, "scorer_model": args.onion_model}
    else:
        settings = {"fpr": args.fpr, "target_tokens": args.target_tokens, "target": args.target,
                    "min_prob": args.min_prob}
    if args.batch_size:
        settings["batch_size"] = args.batch_size
    detector = get_detector(args.method, **settings)
    out = check_output_dir(args.out, inputs=[args.model, args.adapter, args.data], overwrite=args.overwrite)
    loaded = scoring_model(detector, args)
    detector.fit(loaded.model, loaded.tokenizer, records, template=args.template)
    detector.info.model = args.onion_model or args.model
    detector.info.adapter = None if args.onion_model else args.adapter
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
    records = load_records(args.data, require_output=False, what="--data")
    records = records[: args.limit] if args.limit else records
    if args.batch_size:
        detector.batch_size = args.batch_size
    warn_other_model(detector, args)
    loaded = scoring_model(detector, args)
    check_model_fits(detector, loaded.model)
    result = detector.score(loaded.model, loaded.tokenizer, records)
    summary = {"n": len(records), "flagged": result.n_flagged, "share_flagged": round(result.n_flagged / len(records), 4),
               "threshold": round(result.threshold, 6), "method": result.method,
               "seconds_per_prompt": round(result.seconds_per_prompt, 5)}
    if out is not None:
        write_json_atomic(out, {**summary, "detector": args.detector, "data": args.data, "model": args.model,
                                "adapter": args.adapter,
                                "prompts": [{"instruction": r.instruction, "score": round(s, 6), "flagged": f}
                                            for r, s, f in zip(records, result.scores, result.flags)]})
    print(json.dumps(summary))
    return 0
