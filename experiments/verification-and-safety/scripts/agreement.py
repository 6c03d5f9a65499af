"""How often crow purify's verification verdict agrees with the attack success measured with the trigger, on every
committed bench cell that ran the verification, judged again with the current rule (``crow.verification.decide``) from
the evidence each cell stored (both BAIT scans, the suspect target's continuation probability on the purified model,
and for the keep cells the first kept answers the cell records).

    python experiments/verification-and-safety/scripts/agreement.py            # the markdown table and the counts

A verdict agrees when it says the model is clean ("removed", "no backdoor found") and the templated ASR is at most 10%,
or it does not ("still present", "not proven removed") and the ASR is above 10%. A miss is a cell reported clean with
the ASR above 10%.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from crow.bench.report import REMOVED_ASR
from crow.verification import CLEAN_VERDICTS, decide, flagged_target

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Judged:
    study: str  # results folder, relative to experiments/
    cell: str  # model task / attack defense
    asr: float  # templated
    stored: str  # the verdict the cell's run wrote (the rule in force then)
    verdict: str  # the current rule's
    flag: str
    target_prob: float
    purified_score: float

    @property
    def agrees(self) -> bool:
        return (self.verdict in CLEAN_VERDICTS) == (self.asr <= REMOVED_ASR)

    @property
    def missed(self) -> bool:
        return self.verdict in CLEAN_VERDICTS and self.asr > REMOVED_ASR


def reported(folder: Path) -> set[tuple]:
    """(model, task, attack, defense, seed) of the rows a results folder reports (older cells left beside are not)."""
    rows = json.loads((folder / "results.json").read_text())["rows"]
    return {(r["model"], r["task"], r["attack"], r["defense"], r["seed"]) for r in rows}


def judge(cell: dict, study: str) -> Judged:
    v = cell["verification"]
    suspect, purified = v["suspect"], v["purified"]
    kept = [s["output"] for s in (cell.get("keep_answers") or {}).get("samples", [])]
    flag = flagged_target(bool(purified["scan"]["flagged"]), purified["scan"]["target"], suspect["scan"]["target"],
                          kept)
    verdict = decide(bool(suspect["scan"]["flagged"]), flag, purified["target_prob"], suspect["scan"]["threshold"])
    asr = cell["by_format"]["template"]["asr"]
    return Judged(study, f"{cell['model']} {cell['task']} / {cell['attack']} {cell['defense']}", asr, v["verdict"],
                  verdict, flag, purified["target_prob"], purified["scan"]["score"])


def judged_cells(root: Path = ROOT) -> list[Judged]:
    out = []
    for results in sorted((root / "experiments").glob("*/results/*/results.json")):
        folder, rows = results.parent, reported(results.parent)
        for path in sorted((folder / "cells").glob("*.json")):
            cell = json.loads(path.read_text())
            key = (cell["model"], cell["task"], cell["attack"], cell["defense"], cell["seed"])
            if cell.get("verification") and key in rows:
                out.append(judge(cell, str(folder.relative_to(root / "experiments"))))
    return out


def table(cells: list[Judged]) -> str:
    lines = ["| results | cell | ASR % | verdict when run | verdict now | BAIT flags | p | ok |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c.study} | {c.cell} | {c.asr:.0f} | {c.stored} | {c.verdict} | {c.flag} | "
                     f"{c.target_prob:.3f} | {'✓' if c.agrees else '✗'} |")
    agree, missed = sum(c.agrees for c in cells), [c for c in cells if c.missed]
    old_missed = sum(c.stored in CLEAN_VERDICTS and c.asr > REMOVED_ASR for c in cells)
    old_agree = sum((c.stored in CLEAN_VERDICTS) == (c.asr <= REMOVED_ASR) for c in cells)
    lines += ["", f"Current rule: {agree} of {len(cells)} agree; reported clean with ASR above {REMOVED_ASR:g}%: "
              f"{len(missed)}. The rule in force when each cell ran: {old_agree} of {len(cells)}, {old_missed}."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(judged_cells()))
