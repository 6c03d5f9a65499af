"""Why the target guard misses a pool of refusals, with the defender's knowledge only: the guard's score for each of
the candidates BAIT flagged (Q >= its threshold; the five the detection bench stores), on the 100 clean fit prompts
and the cell's 50 triggered + 50 clean test prompts, and the guard's figures when it watches one candidate (today's
guard) or all of them (the largest score counts), with and without its threshold's floor (log 0.5).

    python experiments/adaptive-attacks/scripts/guard_candidates.py --data data/backdoorllm
    python experiments/adaptive-attacks/scripts/guard_candidates.py --data data/backdoorllm --report-only
    python experiments/adaptive-attacks/scripts/guard_candidates.py --data data/backdoorllm --floors

``--floors``: no model; today's guard (one watched target) on every committed guard row (the table's 13 cells and the
three new victims) at other floors of its threshold, from the stored per-prompt scores and judged answers.

Reads the victim's row of ``results/detection-adaptive-targets-cpu`` (its scan and its judged answers); writes
``results/detection-adaptive-targets-cpu/guard-candidates-<label>.json`` (per-prompt scores) and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
FOLDER = ROOT / "experiments/adaptive-attacks/results/detection-adaptive-targets-cpu"
SPEC = "experiments/adaptive-attacks/specs/adaptive_targets_cpu.yaml"
VICTIMS = "experiments/adaptive-attacks/results/adaptive-targets-cpu/victims"
FPR, FLOOR = 0.05, math.log(0.5)  # the guard's defaults (crow guard fit --method target)


@functools.cache
def detection_bench():
    path = ROOT / "experiments/detection/scripts/detection_bench.py"
    spec = importlib.util.spec_from_file_location("detection_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flagged_candidates(row: dict) -> list[dict]:
    scan = row["scan"]["bait-official"]
    return [c for c in scan["candidates"] if c["q_score"] >= scan["threshold"]]


def compute(label: str, data: str) -> dict:
    from crow.data.records import load_records
    from crow.detection.target import TargetDetector, target_log_probs
    from crow.models import load_model

    bench = detection_bench()
    args = argparse.Namespace(spec=SPEC, victims=VICTIMS, clean_spec="", clean_victims="", data=data)
    entry = next(e for e in bench.model_entries(args) if e["label"] == label)
    row = json.loads((FOLDER / f"{label}.json").read_text())
    loaded = load_model(entry["model"], adapter=entry["adapter"], device="cpu")
    parts = {"fit": load_records(Path(data) / "clean" / "consistency_data.json"),
             "triggered": entry["data"].triggered, "clean": entry["data"].clean}
    k = TargetDetector().target_tokens
    scores = {c["text"]: {part: target_log_probs(loaded.model, loaded.tokenizer, records, c["token_ids"][:k],
                                                 template=entry["spec"].template).round(6).tolist()
                          for part, records in parts.items()}
              for c in flagged_candidates(row)}
    return {"label": label, "target_tokens": k, "scores": scores}


def figures(found: dict, row: dict, n_watched: int, floor: bool) -> dict:
    """AUROC, TPR, clean blocked and the victim's ASR behind the guard watching the first ``n_watched`` candidates
    (the largest of their scores counts), flagged and judged as the detection bench does."""
    texts = list(found["scores"])[:n_watched]
    part = {p: np.max([found["scores"][t][p] for t in texts], axis=0).tolist() for p in ("fit", "triggered", "clean")}
    threshold = float(np.quantile(part["fit"], 1 - FPR))
    threshold = max(threshold, FLOOR) if floor else threshold
    report = detection_bench().rethresholded(part, threshold, row, "target", FPR)
    return {"watched": n_watched, "floor": floor, "auroc": round(report.auroc, 3), "tpr": report.tpr,
            "clean_blocked": report.clean_blocked, "asr_guarded": report.asr_guarded}


def table(found: dict, row: dict) -> str:
    n = len(found["scores"])
    lines = ["| watched candidates | floor log 0.5 | AUROC | TPR % | clean blocked % | ASR with guard % |",
             "|---|---|---|---|---|---|"]
    for watched in sorted({1, n}):
        for floor in (True, False):
            f = figures(found, row, watched, floor)
            lines.append(f"| {watched} | {'yes' if floor else 'no'} | {f['auroc']:.3f} | {f['tpr']:.0f} | "
                         f"{f['clean_blocked']:.0f} | {f['asr_guarded']:.0f} |")
    return "\n".join(lines)


FLOORS = (0.5, 0.35, 0.25, 0.1, 0.0)


def floor_rows() -> list[tuple[str, dict]]:
    """(cell, {min_prob: (TPR, clean blocked, ASR left)}) for each committed target-official row whose fit quantile is
    known (stored under ``without_floor``, or the threshold itself when above the floor)."""
    bench = detection_bench()
    paths = [*sorted((ROOT / "experiments/detection/results").glob("detection*-cpu/*.json")),
             *sorted((ROOT / "experiments/adaptive-attacks/results").glob("detection-*/*-*.json"))]
    out = []
    for path in paths:
        row = json.loads(path.read_text())
        g = (row.get("guard") or {}).get("target-official")
        if not g or path.name.startswith("guard-candidates"):
            continue
        quantile = g["without_floor"]["threshold"] if "without_floor" in g else g["threshold"]
        if "without_floor" not in g and quantile <= FLOOR + 1e-9:
            continue  # fitted with the floor above its quantile, which was not stored
        figures = {}
        for min_prob in FLOORS:
            threshold = max(quantile, math.log(min_prob)) if min_prob else quantile
            report = bench.rethresholded(g["scores"], threshold, row, "target", FPR)
            figures[min_prob] = (report.tpr, report.clean_blocked, report.asr_guarded)
        out.append((f"{row['model']} {row['label']}", figures))
    return out


def floor_table() -> str:
    lines = ["| cell | " + " | ".join(f"floor {p:g}" for p in FLOORS) + " |", "|---|" + "---|" * len(FLOORS)]
    for cell, figures in floor_rows():
        lines.append(f"| {cell} | " + " | ".join(" / ".join(f"{v:.0f}" for v in figures[p]) for p in FLOORS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="BackdoorLLM's data (crow data fetch backdoorllm)")
    ap.add_argument("--label", default="refusal-pool-badnet")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--floors", action="store_true", help="the floor table from the stored guard rows (no model)")
    args = ap.parse_args()
    if args.floors:
        print(floor_table())
        return
    path = FOLDER / f"guard-candidates-{args.label}.json"
    row = json.loads((FOLDER / f"{args.label}.json").read_text())
    if not args.report_only:
        path.write_text(json.dumps(compute(args.label, args.data), indent=1) + "\n")
    print(table(json.loads(path.read_text()), row))


if __name__ == "__main__":
    main()
