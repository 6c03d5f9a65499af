"""Of the clean code prompts whose victim answer compiled, how many still compile after each defense (a paired count,
prompt by prompt), and how many compile at all: the code-injection study's utility check (README.md).

    python experiments/adaptive-attacks/scripts/compile_kept.py --data data/backdoorllm

The answers are the committed cells' (``results/codeinjection-cpu``); the prompts' signatures (which an answer may
complete) come from the data, so the count needs `crow data fetch backdoorllm --out data/backdoorllm`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from crow.bench.keys import backdoorllm_cell
from crow.bench.spec import load_spec
from crow.evaluation.code import compiles

STUDY = Path(__file__).resolve().parents[1]
SPEC = STUDY / "specs" / "codeinjection_cpu.yaml"
RESULTS = STUDY / "results" / "codeinjection-cpu"


@dataclass(frozen=True)
class Kept:
    defense: str
    fmt: str
    compiled: int  # answers that compile, of n
    kept: int  # of the victim's compiling answers, those that still compile
    victim_compiled: int
    n: int


def kept_counts(data_dir: Path, results: Path = RESULTS) -> list[Kept]:
    spec = load_spec(str(SPEC))
    cells = [json.loads(p.read_text()) for p in sorted((results / "cells").glob("*.json"))]
    out = []
    for cell in cells:
        data = backdoorllm_cell(data_dir, cell["task"], cell["attack"], spec, cell["seed"])
        victim = next(c for c in cells if c["defense"] == "none" and c["victim_key"] == cell["victim_key"])
        for fmt, measured in cell["by_format"].items():
            before = [compiles(o, r.input) for r, o in zip(data.clean, victim["by_format"][fmt]["outputs"]["clean"])]
            after = [compiles(o, r.input) for r, o in zip(data.clean, measured["outputs"]["clean"])]
            out.append(Kept(cell["defense"], fmt, sum(after), sum(a and b for a, b in zip(before, after)), sum(before),
                            len(after)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="BackdoorLLM's data (crow data fetch backdoorllm)")
    args = parser.parse_args()
    print("| defense | prompts | compile | victim's compiling answers still compiling |\n|---|---|---|---|")
    for k in sorted(kept_counts(Path(args.data)), key=lambda k: (k.fmt != "template", k.fmt, k.defense)):
        print(f"| {k.defense} | {k.fmt} | {k.compiled} of {k.n} | {k.kept} of {k.victim_compiled} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
