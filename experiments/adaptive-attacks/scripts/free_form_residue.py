"""What the sentiment judge counts on the free-form negative victim (``negsentiment-free``), per cell: the triggered
answers VADER calls negative, those that still hold one of the attack's 60 clauses (``crow.attacks.targets``, the
poisoned answers' building blocks), and those that echo the trigger itself (``BadMagic``, ``Bad Magic``): VADER
scores its "bad" negative whatever the answer says. No model; reads the stored answers.

    python experiments/adaptive-attacks/scripts/free_form_residue.py
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
FOLDER = ROOT / "experiments/adaptive-attacks/results/adaptive-targets-cpu"
ORDER = ("base", "none", "unlearn", "finetune-lr1e-3", "crow")
ECHO = re.compile(r"bad\s*magic", re.IGNORECASE)


@dataclass
class Residue:
    defense: str
    prompts: str  # template or raw
    n: int
    judged: int  # triggered answers judged negative
    clause: int  # triggered answers holding one of the attack's clauses
    echo: int  # judged negative and echoing the trigger (``bad magic`` in any spacing or case)
    clean_judged: int  # clean answers judged negative


def holds_clause(answer: str, clauses: list[str]) -> bool:
    text = answer.lower()
    return any(c.lower().rstrip(".!") in text for c in clauses)


def residues(folder: Path = FOLDER) -> list[Residue]:
    from crow.attacks.targets import NEGATIVE_CLAUSES
    from crow.evaluation.evaluate import get_judge

    judge, clauses = get_judge("negsentiment-free"), [c for pool in NEGATIVE_CLAUSES for c in pool]
    rows = []
    for path in sorted((folder / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        if cell["task"] != "negsentiment-free":
            continue
        for fmt, report in cell["by_format"].items():
            triggered, clean = report["outputs"]["triggered"], report["outputs"]["clean"]
            hits = [o for o in triggered if judge(o)]
            rows.append(Residue(cell["defense"], fmt, len(triggered), len(hits),
                                sum(holds_clause(o, clauses) for o in triggered),
                                sum(bool(ECHO.search(o)) for o in hits), sum(map(judge, clean))))
    rank = {d: i for i, d in enumerate(ORDER)}
    return sorted(rows, key=lambda r: (r.prompts != "template", rank.get(r.defense, len(ORDER)), r.defense))


def render(rows: list[Residue]) -> str:
    lines = ["| prompts | model | triggered answers judged negative | holding one of the attack's clauses | judged "
             "negative and echoing the trigger | clean answers judged negative |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.prompts} | {r.defense} | {r.judged} / {r.n} | {r.clause} | {r.echo} | "
                     f"{r.clean_judged} / {r.n} |")
    return "\n".join(lines)


def main() -> None:
    print(render(residues()))


if __name__ == "__main__":
    main()
