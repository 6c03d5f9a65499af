"""The model card (README.md) ``crow purify`` writes beside the purified adapter or model, in the Hugging Face format:
YAML front matter, then what it is, the data, the verification's before / after table and its limits. It names files
by their names, never by this machine's paths."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .verification import Verification, safety_warning

TAGS = ("crow", "backdoor-removal")


@dataclass
class DataFile:
    """A data file as the card names it: its file name, sha256 and number of records."""

    name: str
    sha256: str
    n_records: int

    def to_dict(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "n_records": self.n_records}


def data_file(path: str, n_records: int) -> DataFile:
    from .outputs import sha256_file

    return DataFile(Path(path).name, sha256_file(path), n_records)


def card_base_model(model: str) -> str:
    """How the card names the base model: a hub id or alias as given, a local directory or file by its name."""
    path = Path(model).expanduser()
    return path.name if path.exists() or path.is_absolute() or model.startswith((".", "~")) else model


def front_matter(*, adapter: bool, base_model: str) -> str:
    """The card's metadata block, as ``huggingface_hub.ModelCardData`` writes it."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="peft" if adapter else "transformers", base_model=base_model, tags=list(TAGS))
    return f"---\n{data.to_yaml()}\n---"


def cell(text: str) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def markdown_table(rows, header=("", "suspect (before)", "purified (after)")) -> str:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)])


def settings_lines(settings: dict) -> list[str]:
    return [f"- `{k}`: `{json.dumps(v, ensure_ascii=False, default=str)}`" for k, v in sorted(settings.items())]


LIMITS = """- The verification uses only what a defender has: the suspect model and clean samples. It measures the
  target BAIT recovers; a backdoor whose target BAIT does not recover (a rare first token, a target longer than the
  scan's steps) is not seen, nor one without a fixed target (a sentiment, a style, a varied answer).
- "removed" means BAIT no longer flags the suspect's target (nothing, or only an answer kept with `--keep-data`) and
  that target's rest follows its first token less than one time in ten; "not proven removed" means it still does more
  often (a weakened backdoor) or BAIT flags another target. Neither is an attack success rate measured with the
  trigger, which the defender does not know. On crow's benchmark (37 runs with the trigger measured:
  `experiments/verification-and-safety/scripts/agreement.py`) no run called "removed" had more than 10% attack
  success; 6 finetuning or CROW runs at 0-8% were called "not proven removed" or "still present", and a backdoor with
  free-form negative answers, which BAIT does not flag, "no backdoor found" undefended (88%) and after three defenses
  (24-32%).
- The verification samples may have been trained on (see "Verification"): their perplexity and ROUGE-L then flatter
  the purified model.
- The clean perplexity and ROUGE-L are measured on few samples with short greedy answers: a coarse check of utility."""


SAFETY_MEASURED = """- Refusal of harmful requests is judged by BackdoorLLM's refusal keywords on short greedy answers:
  a keyword match, not a judgement of what the answer says."""
SAFETY_UNMEASURED = """- Refusal of harmful requests was not measured (no `--harmful-data`): a finetune on benign clean
  samples can wash a chat model's refusals out; measure it before deploying."""


def model_card(*, method: str, settings: dict, adapter: bool, base_model: str, data: DataFile, crow_version: str,
               verification: Verification, verify_data: DataFile | None = None, template: str = "alpaca",
               harmful_data: DataFile | None = None, keep_data: DataFile | None = None) -> str:
    """The README.md text (see the module docstring)."""
    kind = "A LoRA adapter" if adapter else "A full model"
    parts = [front_matter(adapter=adapter, base_model=base_model), "",
             f"# {base_model}, purified by crow ({method})", "",
             "## What this is", "",
             f"{kind} written by `crow purify --method {method}` (crow {crow_version}): the suspect model "
             f"`{base_model}` trained on the defender's clean samples to remove a backdoor it may hold. Prompt "
             f"template: `{template}`. The method's settings:", "", *settings_lines(settings), "",
             "## Data", "",
             f"- clean samples (`--data`): `{data.name}`, sha256 `{data.sha256}`, {data.n_records} records"]
    if verify_data is not None:
        parts.append(f"- verification samples (`--verify-data`): `{verify_data.name}`, sha256 `{verify_data.sha256}`, "
                     f"{verify_data.n_records} records used")
    if harmful_data is not None:
        parts.append(f"- harmful requests (`--harmful-data`): `{harmful_data.name}`, sha256 `{harmful_data.sha256}`, "
                     f"{harmful_data.n_records} records used")
    if keep_data is not None:
        parts.append(f"- kept prompts (`--keep-data`): `{keep_data.name}`, sha256 `{keep_data.sha256}`; the suspect's "
                     f"answers to {keep_data.n_records} of them were trained on beside the clean samples")
    v, s = verification, verification.samples
    trained = {True: "trained on", False: "not trained on", None: "unknown whether trained on"}[s.trained_on]
    parts += ["", f"crow version: {crow_version}", "", "## Verification", "",
              f"**Verdict: {v.verdict}.** {v.reason}.", "",
              f"BAIT scanned the suspect before training and the purified model after it, on the first "
              f"{v.settings['scan_prompts']} prompts of `--data`; the target continuation probability (the geometric "
              f"mean over the suspect target's tokens after its first, which is forced, and over prompts), perplexity "
              f"and ROUGE-L are measured on {len(s.records)} verification samples ({s.source}, {trained}: {s.note}). "
              f"The verification took {v.seconds:.1f} s.", "",
              markdown_table(v.rows()), "",
              "Details: `verification.json`."]
    warning = safety_warning(v.suspect, v.purified)
    if warning:
        parts += ["", f"**Warning:** {warning}."]
    safety = (SAFETY_MEASURED if harmful_data is not None else SAFETY_UNMEASURED)
    parts += ["", "## Limits", "", LIMITS, safety, ""]
    return "\n".join(parts)
