"""crow eval: ASR on triggered prompts, false-trigger rate on clean prompts, clean perplexity."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CrowError
from .options import add_model_arguments, check_file, load_from_args, positive_int


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--task", help="keyword judge: negsentiment, refusal or codeinjection")
    p.add_argument("--keywords", nargs="+", help="custom keywords (an output containing any counts as attacked)")
    p.add_argument("--triggered", help="triggered prompts (JSON/JSONL records); ASR is measured on them")
    p.add_argument("--clean", help="clean prompts with reference outputs; false triggers and perplexity")
    p.add_argument("--out", required=True, help="report JSON path")
    p.add_argument("--format", dest="prompt_format", default="raw", choices=("raw", "template"),
                   help="raw: the bare instruction (official evaluation); template: as trained")
    p.add_argument("--template", default="alpaca", choices=("alpaca", "chat", "chat-nosystem"),
                   help="template for --format template")
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
                        "prompts blocked, true-positive rate and AUROC under the report's 'guard' key")


def run(args) -> int:
    from ..data.records import load_records
    from ..detection.guard import check_model_fits, guard_evaluation, load_detector
    from ..evaluation.evaluate import evaluate, get_judge
    from ..outputs import write_json_atomic
    from ..training.loop import merged
    from .guard_cmd import scoring_model, warn_other_model
    judge = get_judge(args.task, args.keywords)
    if args.triggered is None and args.clean is None:
        raise CrowError("give --triggered and/or --clean prompt files to evaluate")
    check_file(args.triggered, "--triggered")
    check_file(args.clean, "--clean")
    out = Path(args.out)
    if out.is_dir():
        raise CrowError(f"--out {out} is a directory; pass a file path such as {out / 'report.json'}")
    if not out.parent.exists():
        raise CrowError(f"the directory of --out ({out.parent}) does not exist; create it first")
    detector = None
    if args.guard:
        detector = load_detector(args.guard, "--guard")
        # a detector that reads hidden states must see prompts formatted as the evaluated model does
        fitted, used = detector.info.template, "raw" if args.prompt_format == "raw" else args.template
        if fitted is not None and fitted != used:
            fix = "--format raw" if fitted == "raw" else f"--format template --template {fitted}"
            raise CrowError(f"--guard {args.guard} was fitted on prompts formatted with {fitted!r} but this "
                            f"evaluation generates from {used!r} prompts; pass {fix} or refit the detector with "
                            f"--template {used}")
        warn_other_model(detector, args)
    triggered = load_records(args.triggered, require_output=False, what="--triggered") if args.triggered else []
    clean = load_records(args.clean, require_output=not args.no_perplexity, what="--clean") if args.clean else []
    triggered, clean = triggered[: args.limit], clean[: args.limit]
    loaded = load_from_args(args)
    report_model = merged(loaded.model)
    if detector is not None and not getattr(detector, "scorer_model", None):
        check_model_fits(detector, report_model, "--guard")  # before minutes of generation
    report = evaluate(report_model, loaded.tokenizer, triggered=triggered, clean=clean, judge=judge,
                      prompt_format=args.prompt_format, template=args.template, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, with_perplexity=not args.no_perplexity,
                      perplexity_max_length=args.max_length, progress=True)
    data = report.to_dict(with_outputs=args.outputs)
    data["settings"].update({"model": args.model, "adapter": args.adapter, "triggered": args.triggered,
                             "clean": args.clean, "limit": args.limit, "max_length": args.max_length})
    if detector is not None:
        scorer = loaded if not getattr(detector, "scorer_model", None) else scoring_model(detector, args)
        model = report_model if scorer is loaded else scorer.model
        guard = guard_evaluation(detector, model, scorer.tokenizer, triggered=triggered, clean=clean,
                                 outputs=report.outputs, judge=judge)
        data["guard"] = {"detector": args.guard, **guard.to_dict(with_scores=args.outputs)}
    write_json_atomic(out, data)
    keys = ("asr", "false_trigger_rate", "clean_perplexity", "n_triggered", "n_clean", "n_empty")
    summary = {k: data[k] for k in keys}
    if detector is not None:
        summary["guard"] = {k: data["guard"][k] for k in ("asr_guarded", "tpr", "clean_blocked", "auroc")}
    print(json.dumps(summary))
    return 0
