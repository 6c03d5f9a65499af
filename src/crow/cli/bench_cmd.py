"""crow bench: models x tasks x attacks x defenses x seeds, resumable, with a paper-style table."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..errors import CrowError

# --quick: one refusal / VPI cell with the committed table's victim (--victims experiments/backdoorllm-table/...:
# no victim to train). Numbers as the YAML spec spells them: the key hashes their JSON, where 2 and 2.0 differ.
QUICK = {"name": "quick", "cells": {"refusal": ["vpi"]}, "max_length": 128, "n_defense": 100,
         "defenses": ["none", "crow", "finetune-lr1e-3"], "profile_prompts": 0,
         "victim": {"lora_r": 8, "learning_rate": 1e-3, "epochs": 2, "batch_size": 2, "grad_accum": 4, "n_poison": 250,
                    "n_clean": 500},
         "eval": {"n_triggered": 20, "n_clean": 20, "max_new_tokens": 32, "formats": ["template"], "batch_size": 20}}
# --suite tiny: from-scratch tiny Llamas on the embedded corpus (CI-sized).
TINY = {"name": "tiny", "suite": "tiny", "models": ["tiny-llama"], "cells": {"negsentiment": ["badnet"]},
        "defenses": ["none", "crow", "finetune-lr1e-3"], "max_length": 128, "n_defense": 100, "profile_prompts": 20,
        "victim": {"n_poison": 150, "n_clean": 450, "epochs": 4.0, "learning_rate": 3e-3, "batch_size": 8,
                   "grad_accum": 1},
        "eval": {"n_triggered": 40, "n_clean": 40, "max_new_tokens": 8, "formats": ["template"]}}


def add_arguments(p) -> None:
    p.add_argument("--suite", default="backdoorllm", choices=("backdoorllm", "tiny"))
    p.add_argument("--data", help="--suite backdoorllm's data directory (layout of shared/data/backdoorllm)")
    p.add_argument("--spec", help="YAML spec (keys of crow.bench.spec.BenchSpec); defaults: the paper's settings")
    p.add_argument("--out", help="results directory (default: bench-results/<spec name>); rerun to resume")
    p.add_argument("--quick", action="store_true", help="refusal/vpi, CROW and finetune-lr1e-3, 20 + 20 prompts (~12 "
                   "min on 2 CPU cores with the committed victim passed as --victims, ~30 min training it)")
    p.add_argument("--model", action="append", help="model(s) to bench (default: smollm2-135m-gguf)")
    p.add_argument("--cells", action="append", metavar="TASK/ATTACK", help="run only these cells of the spec "
                   "(repeatable), e.g. --cells negsentiment/badnet; the report still covers every finished cell")
    p.add_argument("--victims", help="victims directory to share between specs (default: OUT/victims)")
    p.add_argument("--report-only", action="store_true", help="rebuild results.md and plots from finished cells")


def run(args) -> int:
    from ..bench.keys import plan
    from ..bench.report import write_report
    from ..bench.runner import BenchRunner
    from ..bench.spec import load_spec
    preset = dict(TINY) if args.suite == "tiny" else {}
    if args.quick:
        preset.update(QUICK if args.suite == "backdoorllm" else {"name": "tiny-quick"})
    spec = load_spec(args.spec, base=preset, models=args.model)
    only = set()  # --cells: the (task, attack) pairs to run, None for all
    for item in args.cells or []:
        task, _, attack = item.partition("/")
        if attack not in spec.cells.get(task, []):
            valid = ", ".join(f"{t}/{a}" for t, attacks in spec.cells.items() for a in attacks)
            raise CrowError(f"--cells {item!r} is not in the spec; valid: {valid}")
        only.add((task, attack))
    data_dir = None
    if spec.suite == "backdoorllm":
        if not args.data:
            raise CrowError("--suite backdoorllm needs --data DIR (the BackdoorLLM files); get them with "
                            "`crow data fetch backdoorllm --out DIR`")
        data_dir = Path(args.data)
        if not (data_dir / "train").is_dir() or not (data_dir / "test").is_dir():
            raise CrowError(f"--data {data_dir} does not have the BackdoorLLM layout (train/, test/, clean/); get it "
                            "with `crow data fetch backdoorllm --out DIR`")
    if not args.report_only:
        plan(spec)  # validates every defense name and setting before anything is written
    out = Path(args.out or Path("bench-results") / spec.name)
    if out.exists() and not out.is_dir():
        raise CrowError(f"--out {out} is a file; pass a directory")
    runner = BenchRunner(spec, out, data_dir, progress=sys.stderr.isatty(), victims=args.victims)
    # the report covers every finished cell; a report alone also finds the cells of settings the code no longer runs
    rows = runner.collect(legacy=True) if args.report_only else runner.run(only=only or None)
    write_report(rows, spec, out, command="crow bench " + " ".join(shlex.quote(a) for a in _bench_args(args)))
    print(json.dumps({"out": str(out), "cells": len(rows), "results": str(out / "results.md")}))
    return 0


def _bench_args(args) -> list[str]:
    """The command that completes and rebuilds the whole table (so without ``--cells``)."""
    given = [("--suite", args.suite), ("--data", args.data), ("--spec", args.spec), ("--quick", args.quick),
             *(("--model", m) for m in args.model or []), ("--out", args.out), ("--victims", args.victims)]
    return [part for option, value in given if value for part in ((option,) if value is True else (option, value))]
