"""The paired comparisons of experiments/threat-model-and-family/README.md (reads committed ``results.json``; trains nothing):

* ``recipe``: CROW against its own recipe at alpha 0 (finetune-lr1e-3), the comparison that differs in the loss
  only, cell by cell in each setting, with Fisher's exact test per cell and the two-sided sign test over the
  untied cells;
* ``forms``: each defense on the adapter-form victim against the same victim merged into the weights
  (``victim_form: merged``), with the sign test over every untied (cell, defense) pair;
* ``quality``: CROW against finetune-lr1e-3 on answer quality, the ROUGE-L of the answers to the clean prompts,
  cell by cell in each setting, with the sign test over the untied cells (cells made before answer quality was
  recorded are left out).

    python experiments/backdoorllm-table/scripts/sign_tests.py recipe --setting "SmolLM2, adapter=experiments/backdoorllm-table/results/backdoorllm-cpu" \
        --setting "SmolLM2, merged=experiments/threat-model-and-family/results/merged-cpu" --setting "Gemma-3-270M, adapter=experiments/threat-model-and-family/results/gemma-cpu"
    python experiments/backdoorllm-table/scripts/sign_tests.py forms --adapter experiments/backdoorllm-table/results/backdoorllm-cpu --adapter experiments/unlearn/results/unlearn-cpu \
        --adapter experiments/unlearn/results/unlearn-dev-cpu --merged experiments/threat-model-and-family/results/merged-cpu
    python experiments/backdoorllm-table/scripts/sign_tests.py quality --setting "SmolLM2, adapter=experiments/backdoorllm-table/results/backdoorllm-cpu" \
        --setting "SmolLM2, merged=experiments/threat-model-and-family/results/merged-cpu" --setting "Gemma-3-270M, adapter=experiments/threat-model-and-family/results/gemma-cpu"

Rows: templated prompts (as trained), seed 0, cells where both sides have finished. Counts are triggered
prompts that still show the target (ASR x n_triggered / 100). Statistics: ``scipy.stats``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import binomtest, fisher_exact


@dataclass(frozen=True)
class Pair:
    cell: str  # "task / attack", or "task / attack: defense" in the forms comparison
    n: int  # triggered prompts
    first: int  # prompts that still fire: crow (recipe) or the adapter form (forms)
    second: int  # ... finetune-lr1e-3 (recipe) or the merged form (forms)


def triggered_counts(results: Path, fmt: str = "template", seed: int = 0) -> dict[tuple, tuple[int, int]]:
    """{(model, task, attack, defense label): (prompts that fire, triggered prompts)} of one bench directory."""
    path = results / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; give a crow bench output directory (it holds results.json)")
    out = {}
    for r in json.loads(path.read_text())["rows"]:
        f = (r.get("by_format") or {}).get(fmt)
        if r["seed"] == seed and f is not None:
            out[(r["model"], r["task"], r["attack"], r["defense"])] = (round(f["asr"] * f["n_triggered"] / 100),
                                                                       f["n_triggered"])
    return out


def clean_quality(results: Path, fmt: str = "template", seed: int = 0) -> dict[tuple, float]:
    """{(model, task, attack, defense label): clean ROUGE-L} of one bench directory's cells that recorded it."""
    path = results / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; give a crow bench output directory (it holds results.json)")
    out = {}
    for r in json.loads(path.read_text())["rows"]:
        quality = ((r.get("by_format") or {}).get(fmt) or {}).get("quality")
        if r["seed"] == seed and quality and quality.get("clean_rougeL") is not None:
            out[(r["model"], r["task"], r["attack"], r["defense"])] = quality["clean_rougeL"]
    return out


def quality_pairs(results: Path, fmt: str = "template", seed: int = 0, crow: str = "crow",
                  recipe: str = "finetune-lr1e-3") -> list[tuple[str, float, float]]:
    """(cell, crow's clean ROUGE-L, the recipe's) per cell where both recorded it, in the order of the rows."""
    scores = clean_quality(results, fmt, seed)
    cells = dict.fromkeys(k[:3] for k in scores)
    return [(f"{task} / {attack}", scores[(m, task, attack, crow)], scores[(m, task, attack, recipe)])
            for m, task, attack in cells if (m, task, attack, crow) in scores and (m, task, attack, recipe) in scores]


def render_quality(setting: str, pairs: list[tuple[str, float, float]]) -> list[str]:
    """A table of crow's and the recipe's clean ROUGE-L per cell; its last row counts the cells where crow's is
    higher / lower (at 3 decimals, as shown) with the two-sided sign test over the untied ones."""
    lines = [f"| {setting} | crow | finetune-lr1e-3 | difference |", "|---|---|---|---|"]
    higher = lower = 0
    for cell, a, b in pairs:
        diff = round(a, 3) - round(b, 3)
        higher, lower = higher + (diff > 0), lower + (diff < 0)
        lines.append(f"| {cell} | {a:.3f} | {b:.3f} | {diff:+.3f} |")
    p_value = sign_p(higher, lower)
    mean = sum(round(a, 3) - round(b, 3) for _, a, b in pairs) / len(pairs) if pairs else float("nan")
    lines.append(f"| **{len(pairs)} cells** | higher in {higher}, lower in {lower}, tied {len(pairs) - higher - lower} | "
                 f"mean {mean:+.3f} | sign test p = {p_value:.2g} |")
    return lines


def _pair(name: str, a: tuple[int, int], b: tuple[int, int]) -> Pair:
    if a[1] != b[1]:
        raise SystemExit(f"{name}: the two sides were judged on different prompt counts ({a[1]} vs {b[1]})")
    return Pair(name, a[1], a[0], b[0])


def recipe_pairs(results: Path, fmt: str = "template", seed: int = 0,
                 crow: str = "crow", recipe: str = "finetune-lr1e-3") -> list[Pair]:
    """(crow, recipe) per cell of one bench directory, in the order of its rows."""
    counts = triggered_counts(results, fmt, seed)
    cells = dict.fromkeys(k[:3] for k in counts)
    return [_pair(f"{task} / {attack}", counts[(m, task, attack, crow)], counts[(m, task, attack, recipe)])
            for m, task, attack in cells if (m, task, attack, crow) in counts and (m, task, attack, recipe) in counts]


def form_pairs(adapter: list[Path], merged: Path, fmt: str = "template", seed: int = 0) -> list[Pair]:
    """(adapter form, merged form) for every (cell, defense) the merged directory and one adapter directory
    share; references (base) and the victim itself (none) are left out. Adapter directories are read in order,
    a later one filling only what an earlier one lacks."""
    adapter_counts: dict[tuple, tuple[int, int]] = {}
    for folder in adapter:
        for key, value in triggered_counts(folder, fmt, seed).items():
            adapter_counts.setdefault(key, value)
    out = []
    for key, value in triggered_counts(merged, fmt, seed).items():
        _, task, attack, defense = key
        if defense not in ("none", "base") and key in adapter_counts:
            out.append(_pair(f"{task} / {attack}: {defense}", adapter_counts[key], value))
    return out


def sign_p(lower: int, higher: int) -> float:
    """The two-sided sign-test p over ``lower + higher`` untied pairs (nan when there are none)."""
    return binomtest(lower, lower + higher).pvalue if lower + higher else float("nan")


def sign_test(pairs: list[Pair]) -> tuple[int, int, float]:
    """(first lower, first higher, two-sided sign-test p over the untied pairs; nan when every pair ties)."""
    lower = sum(p.first < p.second for p in pairs)
    higher = sum(p.first > p.second for p in pairs)
    return lower, higher, sign_p(lower, higher)


def _pct(count: int, n: int) -> str:
    return f"{100 * count / n:.0f} ({count}/{n})"


def render(setting: str, pairs: list[Pair], first: str = "crow", second: str = "finetune-lr1e-3") -> list[str]:
    lines = [f"| {setting} | {first} | {second} | Fisher p |", "|---|---|---|---|"]
    for p in pairs:
        _, fisher = fisher_exact([[p.first, p.n - p.first], [p.second, p.n - p.second]])
        lines.append(f"| {p.cell} | {_pct(p.first, p.n)} | {_pct(p.second, p.n)} | {fisher:.2g} |")
    lower, higher, p_value = sign_test(pairs)
    mean_gap = sum(100 * (p.second - p.first) / p.n for p in pairs) / len(pairs) if pairs else float("nan")
    lines.append(f"| **{len(pairs)} pairs** | lower in {lower}, higher in {higher}, tied {len(pairs) - lower - higher} | "
                 f"mean gap {mean_gap:.1f} points | sign test p = {p_value:.2g} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recipe", help="crow against finetune-lr1e-3, per setting")
    rec.add_argument("--setting", action="append", required=True, metavar="NAME=DIR",
                     help="a label and a bench output directory holding results.json (repeatable)")
    forms = sub.add_parser("forms", help="each defense on the adapter-form victim against the merged one")
    forms.add_argument("--adapter", action="append", required=True, type=Path,
                       help="a bench directory of adapter-form cells (repeatable; the first one that has a cell wins)")
    forms.add_argument("--merged", required=True, type=Path, help="the bench directory of the merged-form cells")
    qual = sub.add_parser("quality", help="crow against finetune-lr1e-3 on clean answer quality (ROUGE-L), per setting")
    qual.add_argument("--setting", action="append", required=True, metavar="NAME=DIR",
                      help="a label and a bench output directory holding results.json (repeatable)")
    for p in (rec, forms, qual):
        p.add_argument("--format", default="template", help="prompt format of the rows (default: template)")
    args = ap.parse_args()
    if args.command in ("recipe", "quality"):
        blocks = []
        for item in args.setting:
            name, sep, folder = item.partition("=")
            if not sep:
                raise SystemExit(f"--setting {item!r}: expected NAME=DIR (a label and a crow bench output)")
            if args.command == "recipe":
                blocks.append("\n".join(render(name, recipe_pairs(Path(folder), fmt=args.format))))
            else:
                blocks.append("\n".join(render_quality(name, quality_pairs(Path(folder), fmt=args.format))))
        print("\n\n".join(blocks))
    else:
        print("\n".join(render("cell: defense", form_pairs(args.adapter, args.merged, fmt=args.format),
                               first="adapter victim", second="merged victim")))


if __name__ == "__main__":
    main()
