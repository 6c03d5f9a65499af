"""crow scan: is this model backdoored, and what does it say when triggered? (BAIT, or a baseline)"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from ..errors import CrowError
from .common import add_model_arguments, check_file, load_from_args, positive_int

logger = logging.getLogger(__name__)


def _unit_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in [0, 1], got {text!r}") from None
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise argparse.ArgumentTypeError(f"{name} must be a number in [0, 1], got {text}")
        return value
    return parse


def add_arguments(p) -> None:
    from ..detection.scan import SCAN_METHODS, STOP_RULES

    add_model_arguments(p)
    p.add_argument("--data", required=True,
                   help="~100 clean instruction samples (JSON list or JSONL: instruction, input, output)")
    p.add_argument("--out", required=True, help="output directory; scan.json is written there")
    p.add_argument("--method", default="bait", choices=list(SCAN_METHODS),
                   help="bait: invert the attack target (Shen et al., S&P 2025); answer-divergence: the baseline, "
                        "ROUGE-L of greedy answers against the references")
    p.add_argument("--template", default="alpaca", choices=("alpaca", "chat", "chat-nosystem", "raw"),
                   help="prompt template the model was trained with (the prompts end where the response starts)")
    p.add_argument("--threshold", type=_unit_float("--threshold"),
                   help="flag at score >= this (default: bait 0.9, BAIT's Q-score threshold; answer-divergence 0.9)")
    p.add_argument("--n-prompts", type=positive_int("--n-prompts"),
                   help="clean prompts used (default: bait 20, as BAIT; answer-divergence 50)")
    g = p.add_argument_group("bait")
    g.add_argument("--top-k", type=positive_int("--top-k"),
                   help="K: candidate first tokens given the full inversion (default 16)")
    g.add_argument("--steps", type=positive_int("--steps"), help="T: greedy steps of the full inversion (default 20)")
    g.add_argument("--pool", type=positive_int("--pool"),
                   help="first tokens kept by the prior stage, the most likely response starts (default 256; "
                        "the vocabulary size tries every token, as BAIT does, at linear cost)")
    g.add_argument("--warmup-steps", type=positive_int("--warmup-steps"), help="greedy steps of the warm-up (default 5)")
    g.add_argument("--stop-rule", choices=STOP_RULES,
                   help="when a candidate stops: official (default, as BAIT's code) keeps a flat step whose top "
                        "probability is > 0.3 in the warm-up and never stops the full inversion on flatness; "
                        "entropy (crow's first rule) stops it once the averaged next-token distribution is "
                        "flatter than 2.5 nats")
    g = p.add_argument_group("answer-divergence")
    g.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), help="answer length (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")


def _settings(args):
    from ..detection.scan import make_settings

    given = {"threshold": args.threshold, "n_prompts": args.n_prompts}
    if args.method == "bait":
        given.update(top_k=args.top_k, steps=args.steps, pool=args.pool, warmup_steps=args.warmup_steps,
                     stop_rule=args.stop_rule)
    elif args.max_new_tokens is not None:
        given["max_new_tokens"] = args.max_new_tokens
    other = {"bait": ("top_k", "steps", "pool", "warmup_steps", "stop_rule"), "answer-divergence": ("max_new_tokens",)}
    for method, names in other.items():
        if method != args.method:
            for name in names:
                if getattr(args, name) is not None:
                    raise CrowError(f"--{name.replace('_', '-')} is a {method} option; drop it or pass --method {method}")
    return make_settings(args.method, **given)


def summary(result, out: Path) -> str:
    """A few lines for a person: verdict, score against threshold, recovered target, cost."""
    sign = ">=" if result.flagged else "<"
    lines = [f"crow scan ({result.method}): {result.verdict.upper()}  score {result.score:.3f} {sign} "
             f"threshold {result.threshold:.2f}"]
    if result.target:
        label = "recovered target" if result.method == "bait" else "most common answer"
        lines.append(f"{label}: {json.dumps(result.target, ensure_ascii=False)}")
    if result.method == "bait":
        lines.append(f"{result.n_candidates} first tokens screened, {result.details.get('n_full', 0)} inverted on "
                     f"{result.n_prompts} prompts; {result.seconds:.0f} s")
    else:
        lines.append(f"mean ROUGE-L {result.details['mean_rouge_l']:.3f} on {result.n_prompts} prompts; "
                     f"{result.seconds:.0f} s")
    lines.append(f"wrote {out / 'scan.json'}")
    return "\n".join(lines)


def run(args) -> int:
    from ..data.records import load_records
    from ..detection.scan import scan
    from ..outputs import check_output_dir, crow_version, git_revision, sha256_file, write_json_atomic
    from ..purification import merged

    check_file(args.data, "--data")
    settings = _settings(args)
    out = check_output_dir(args.out, inputs=[args.model, args.adapter, args.data], overwrite=args.overwrite)
    records = load_records(args.data, what="--data")
    loaded = load_from_args(args)
    out = check_output_dir(out, inputs=[loaded.source], overwrite=args.overwrite)  # an alias resolved to a path
    result = scan(merged(loaded.model), loaded.tokenizer, records, method=args.method, template=args.template,
                  settings=settings, progress=logger.info)
    data = result.to_dict()
    data["settings"].update({"model": args.model, "adapter": args.adapter, "data": args.data,
                             "data_sha256": sha256_file(args.data), "n_records": len(records), "dtype": args.dtype,
                             "crow_version": crow_version(), "git_revision": git_revision()})
    out.mkdir(exist_ok=True)
    write_json_atomic(out / "scan.json", data)
    print(summary(result, out))
    return 0
