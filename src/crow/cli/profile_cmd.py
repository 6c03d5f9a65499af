"""crow profile: per-layer consistency of a model on clean vs triggered prompts (JSON + PNG)."""

from __future__ import annotations

import json

from ..errors import CrowError
from .common import add_model_arguments, check_file, load_from_args, positive_int


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--triggered", required=True, help="triggered prompts (JSON/JSONL records)")
    p.add_argument("--clean", required=True, help="clean prompts (JSON/JSONL records)")
    p.add_argument("--out", required=True, help="output directory for profile.json and profile.png")
    p.add_argument("--template", default="alpaca", choices=("alpaca", "chat", "chat-nosystem", "raw"), help="prompt formatting")
    p.add_argument("--limit", type=positive_int("--limit"), default=100, help="prompts per set")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")


def run(args) -> int:
    from ..analysis.profile import layer_profile, plot_profiles
    from ..data.records import load_records
    from ..outputs import check_output_dir, staged_dir, write_json_atomic

    check_file(args.triggered, "--triggered")
    check_file(args.clean, "--clean")
    triggered = load_records(args.triggered, require_output=False, what="--triggered")[: args.limit]
    clean = load_records(args.clean, require_output=False, what="--clean")[: args.limit]
    out = check_output_dir(args.out, inputs=[args.model, args.adapter], overwrite=args.overwrite)
    loaded = load_from_args(args)
    curves = {"clean": layer_profile(loaded.model, loaded.tokenizer, clean, template=args.template),
              "triggered": layer_profile(loaded.model, loaded.tokenizer, triggered, template=args.template)}
    if len(curves["clean"]) < 2:
        raise CrowError("the model has too few layers for a profile")
    gap = [round(c - t, 6) for c, t in zip(curves["clean"], curves["triggered"])]
    with staged_dir(out) as tmp:
        write_json_atomic(tmp / "profile.json", {"model": args.model, "adapter": args.adapter,
                                                 "template": args.template, "n_clean": len(clean),
                                                 "n_triggered": len(triggered), "profiles": curves,
                                                 "clean_minus_triggered": gap})
        plot_profiles(curves, tmp / "profile.png", title=f"{args.model}" + (f" + {args.adapter}" if args.adapter else ""))
    widest = max(range(len(gap)), key=lambda i: abs(gap[i]))
    print(json.dumps({"out": str(out), "largest_gap_pair": widest, "largest_gap": gap[widest]}))
    return 0
