"""crow scan: is this model backdoored, and what does it say when triggered? (BAIT, or a baseline)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import CrowError
from .options import add_model_arguments, add_options, as_flags, check_file, flag, given, load_from_args

logger = logging.getLogger(__name__)


def add_arguments(p) -> None:
    from ..detection.scan import SCAN_METHODS, BaitSettings, DivergenceSettings
    add_model_arguments(p)
    p.add_argument("--data", required=True,
                   help="~100 clean instruction samples (JSON list or JSONL: instruction, input, output)")
    p.add_argument("--out", required=True, help="output directory; scan.json is written there")
    p.add_argument("--method", default="bait", choices=SCAN_METHODS.names(),
                   help="bait: invert the attack target (Shen et al., S&P 2025); answer-divergence: the baseline, "
                        "ROUGE-L of greedy answers against the references (default: bait)")
    p.add_argument("--template", default="alpaca", choices=("alpaca", "chat", "chat-nosystem", "raw"),
                   help="prompt template the model was trained with (the prompts end where the response starts)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    both = {"n_prompts": "bait 20, answer-divergence 50", "threshold": 0.9}  # every method's, shown with bait's
    bait = add_options(p.add_argument_group("--method bait"), BaitSettings, defaults=both)
    own = set(DivergenceSettings.__dataclass_fields__) - set(both)
    divergence = add_options(p.add_argument_group("--method answer-divergence"), DivergenceSettings, own)
    p.set_defaults(_scan_options={"bait": bait, "answer-divergence": divergence})


def summary(result, out: Path) -> str:
    """A few lines for a person: verdict, score against threshold, recovered target, cost."""
    lines = [f"crow scan ({result.method}): {result.verdict.upper()}  score {result.score:.3f} "
             f"{'>=' if result.flagged else '<'} threshold {result.threshold:.2f}"]
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
    from ..detection.scan import make_settings, scan
    from ..outputs import check_output_dir, crow_version, git_revision, sha256_file, write_json_atomic
    from ..training.loop import merged
    check_file(args.data, "--data")
    names = args._scan_options  # every method's options; only the chosen method's may be given
    mine = set(names[args.method]) | {"n_prompts", "threshold"}
    foreign = sorted(set(given(args, {n for ns in names.values() for n in ns})) - mine)
    if foreign:
        other = next(m for m, ns in names.items() if foreign[0] in ns and m != args.method)
        raise CrowError(f"{flag(foreign[0])} is an option of --method {other}; drop it or pass --method {other}")
    try:
        settings = make_settings(args.method, **given(args, mine))
    except CrowError as e:
        raise CrowError(as_flags(str(e), mine)) from None
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
