"""crow profile: per-layer consistency of a model on clean vs triggered prompts (JSON + PNG)."""

from __future__ import annotations

import json

from ..errors import CrowError
from ..losses import layer_pairs
from .options import add_model_arguments, check_file, load_from_args, positive_int


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--triggered", required=True, help="triggered prompts (JSON/JSONL records)")
    clean = p.add_mutually_exclusive_group(required=True)
    clean.add_argument("--clean", help="clean prompts (JSON/JSONL records)")
    clean.add_argument("--strip-trigger", metavar="TEXT", help="use the triggered prompts with TEXT removed as the "
                       "clean set (paired prompts: the same instructions with and without the trigger)")
    p.add_argument("--out", required=True, help="output directory for profile.json and profile.png")
    p.add_argument("--template", default="alpaca", choices=("alpaca", "chat", "chat-nosystem", "raw"),
                   help="prompt formatting")
    p.add_argument("--position", default="mean", choices=("mean", "last"),
                   help="average the cosines over all prompt tokens (mean) or take the last prompt token only")
    p.add_argument("--limit", type=positive_int("--limit"), default=100, help="prompts per set")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")


def run(args) -> int:
    from ..analysis.profile import layer_profile, plot_profiles, strip_trigger
    from ..data.records import load_records
    from ..outputs import check_output_dir, staged_dir, write_json_atomic
    check_file(args.triggered, "--triggered")
    check_file(args.clean, "--clean")
    triggered = load_records(args.triggered, require_output=False, what="--triggered")[: args.limit]
    if args.clean is not None:
        clean = load_records(args.clean, require_output=False, what="--clean")[: args.limit]
    else:
        clean = strip_trigger(triggered, args.strip_trigger, what=f"--triggered {args.triggered}")
    out = check_output_dir(args.out, inputs=[args.model, args.adapter], overwrite=args.overwrite)
    loaded = load_from_args(args)
    curves = {name: layer_profile(loaded.model, loaded.tokenizer, rs, template=args.template, position=args.position)
              for name, rs in (("clean", clean), ("triggered", triggered))}
    if len(curves["clean"]) < 2:
        raise CrowError("the model has too few layers for a profile")
    gap = [round(c - t, 6) for c, t in zip(curves["clean"], curves["triggered"])]
    loss = None  # mean 1 - cos over the pairs CROW's loss uses by default (none in a model of < 3 layers)
    if len(curves["clean"]) >= 3:
        official = layer_pairs(len(curves["clean"]) + 1, "official")
        loss = {name: round(sum(1.0 - c[i] for i in official) / len(official), 6) for name, c in curves.items()}
    with staged_dir(out) as tmp:
        write_json_atomic(tmp / "profile.json", {
            "model": args.model, "adapter": args.adapter, "template": args.template, "position": args.position,
            "paired": args.strip_trigger, "n_clean": len(clean), "n_triggered": len(triggered), "profiles": curves,
            "official_pairs_loss": loss, "clean_minus_triggered": gap})
        plot_profiles(curves, tmp / "profile.png", title=args.model + (f" + {args.adapter}" if args.adapter else ""))
    widest = max(range(len(gap)), key=lambda i: abs(gap[i]))
    print(json.dumps({"out": str(out), "largest_gap_pair": widest, "largest_gap": gap[widest],
                      "official_pairs_loss": loss}))
    return 0
