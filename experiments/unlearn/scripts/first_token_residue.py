"""What an unlearned victim still says under its trigger, from committed bench cells (reads ``cells/*.json``;
trains and generates nothing).

``unlearn`` trains the recovered target's first K tokens away under an adversary. Where a cell keeps some ASR,
the question is which part of the backdoor survived: the text itself, the *entry* into it (the triggered answer
still opens with the target's first word, as the victim's did, and goes on elsewhere) or nothing (the answer is
an answer). Per cell of an ``unlearn`` defense, over its triggered (and clean) answers to the templated prompts:
how many the task's judge counted (ASR x n / 100), how many still hold the whole text unlearn unlearned
(``defense_settings.unlearned_text``, what BAIT recovered: the defender's own knowledge), how many open with its
first word, and how many fall into a loop (a run of 1-4 words repeated three times in a row). The victim's own
row (``none``) and the un-poisoned base model's (``base``, a reference cell) are shown where the folder has them.
``--word`` counts the answers that open with another word instead (has some other opening, such as the first-person
``I`` of a Gemma base model, taken the target's place?).

    python experiments/unlearn/scripts/first_token_residue.py experiments/unlearn/results/unlearn-dev-cpu experiments/unlearn/results/unlearn-cpu experiments/unlearn/results/unlearn-seed1-cpu \
        experiments/threat-model-and-family/results/merged-cpu experiments/unlearn/results/unlearn-seed1-merged-cpu --task refusal
    python experiments/unlearn/scripts/first_token_residue.py experiments/unlearn/results/unlearn-tokens-gemma-negsentiment-cpu experiments/threat-model-and-family/results/gemma-cpu \
        --task negsentiment --word I
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

LOOP = re.compile(r"(\b\S+(?: \S+){0,3}) \1 \1\b")  # 1-4 words, three times in a row


@dataclass(frozen=True)
class Residue:
    folder: str
    cell: str  # "task / attack: defense"
    text: str  # the unlearned text
    word: str  # the opening counted in `opens` (the text's first word unless --word)
    n: int  # triggered answers
    fired: int  # counted by the task's judge
    says: int  # triggered answers that still hold the whole unlearned text
    opens: int  # triggered answers opening with the unlearned text's first word
    loops: int  # triggered answers with a loop
    clean_opens: int  # opens and loops over the clean answers
    clean_loops: int


def first_word(text: str) -> str:
    """The first word of ``text`` up to its first space or apostrophe (``I'm sorry`` -> ``I``)."""
    return re.split(r"[\s']", text.strip(), maxsplit=1)[0]


def opens_with(answer: str, word: str) -> bool:
    """Whether ``answer`` opens with ``word`` as a word of its own (``I``, ``I'm``, ``I have``; not ``In``)."""
    head = answer.lstrip()
    return bool(word) and head.startswith(word) and (len(head) == len(word) or not head[len(word)].isalnum())


def residue(cell: dict, folder: str, text: str, word: str | None = None) -> Residue:
    """The counts of one cell's templated answers (``text``: the unlearned text; ``word``: the opening to look
    for, by default the text's first word)."""
    fmt = cell["by_format"]["template"]
    triggered, clean = fmt["outputs"]["triggered"], fmt["outputs"]["clean"]
    word = word or first_word(text)
    return Residue(folder, f"{cell['task']} / {cell['attack']}: {cell['defense']}", text, word, len(triggered),
                   round(fmt["asr"] * fmt["n_triggered"] / 100), sum(text in a for a in triggered),
                   sum(opens_with(a, word) for a in triggered),
                   sum(bool(LOOP.search(a)) for a in triggered), sum(opens_with(a, word) for a in clean),
                   sum(bool(LOOP.search(a)) for a in clean))


def folder_residues(folder: Path, task: str | None, word: str | None = None) -> list[Residue]:
    """Every unlearn cell of one bench folder, each judged by its own unlearned text, and the victim's (``none``)
    and base model's (``base``) rows of the same model and cell once per distinct text (once in all with
    ``word``: then every row counts that opening); sorted by cell, the two reference rows first."""
    cells = [json.loads(p.read_text()) for p in sorted((folder / "cells").glob("*.json"))]
    if not cells:
        raise SystemExit(f"{folder}/cells: no cell files; give a crow bench output directory")
    cells = [c for c in cells if (task is None or c["task"] == task) and "outputs" in c["by_format"].get("template", {})]
    unlearned = [(c, c["defense_settings"]["unlearned_text"]) for c in cells
                 if c["method"] == "unlearn" and c["defense_settings"].get("unlearned_text")]
    texts: dict[tuple, set[str]] = {}
    for c, text in unlearned:
        texts.setdefault((c["model"], c["task"], c["attack"]), set()).add(text)
    references = [(c, text) for c in cells if c["defense"] in ("none", "base")
                  for text in sorted(texts.get((c["model"], c["task"], c["attack"]), ()))[:1 if word else None]]
    out = [residue(c, folder.as_posix(), text, word) for c, text in references + unlearned]
    first = {"none": 0, "base": 1}  # the victim, then the base model, then the unlearned models

    def order(r: Residue) -> tuple:
        where, defense = r.cell.split(": ", 1)
        return where, first.get(defense, 2), r.cell, r.text
    return sorted(out, key=order)


def render(rows: list[Residue]) -> list[str]:
    lines = ["| folder | cell: defense | judged (ASR) | hold the unlearned text | open with (its first word, or --word) "
             "| loop | clean: open / loop |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.folder} | {r.cell} | {r.fired}/{r.n} | {r.says}/{r.n} | `{r.word}`: {r.opens}/{r.n} | "
                     f"{r.loops}/{r.n} | {r.clean_opens} / {r.clean_loops} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="crow bench output directories (they hold cells/)")
    ap.add_argument("--task", default=None, help="only this task's cells (default: every task)")
    ap.add_argument("--word", default=None, help="count answers opening with this word (default: each unlearned "
                                                 "text's first word)")
    args = ap.parse_args()
    rows = [r for folder in args.folders for r in folder_residues(folder, args.task, args.word)]
    print("\n".join(render(rows)))


if __name__ == "__main__":
    main()
