"""The defense interface: what a defense gets (``DefenseContext``) and what it does (``Defense.repair``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..data.records import Record


@dataclass
class DefenseContext:
    """What every defense gets besides the model: the defender's clean samples, how to format them, and how a training
    defense runs (where its checkpoints go, whether a signal stops it, what it resumes from)."""

    clean: Sequence[Record]
    #: answers trained on beside ``clean`` and never held out of it (crow purify --keep-data: the suspect's own answers
    #: to prompts the clean samples do not cover, e.g. the harmful requests it refuses)
    keep: Sequence[Record] = ()
    template: str = "alpaca"
    max_length: int = 256
    seed: int | None = 0  # the training seed when the settings give none (crow bench: the cell's; None: the config's)
    task: str | None = None  # the target task when known (CROW's alpha preset: refusal 11)
    work_dir: Path = Path(".")
    progress: bool = False
    output_dir: Path | None = None  # a training run's checkpoints (default: a hidden folder in work_dir)
    save_steps: int | None = None  # checkpoint every N optimizer steps, for a resumed run
    resume_from_checkpoint: str | None = None
    handle_signals: bool = False
    #: a BAIT scan of the suspect on ``clean`` with ``template``, already made (crow purify's verification): a method
    #: that recovers its target with one (unlearn) takes it instead of scanning again
    scan: object = None
    train_log: list[dict] = field(default_factory=list)  # filled by a training defense: its metrics per logging step

    def run_options(self, name: str):
        from ..training.loop import RunOptions

        return RunOptions(output_dir=str(self.output_dir or self.work_dir / f".{name}-run"), template=self.template,
                          max_length=self.max_length, progress=self.progress, save_steps=self.save_steps,
                          resume_from_checkpoint=self.resume_from_checkpoint, handle_signals=self.handle_signals)


class Defense:
    """A defense repairs a suspect model. ``repair`` receives the victim (a PEFT model whose suspect adapter is
    trainable, or plain weights) and returns the repaired model; it may modify the model in place."""

    name: str = "defense"
    changes: str = "adapter"  # what the defense changes, for tables: "adapter", "weights" or "nothing"
    #: a reference, not a defense of the threat model (it knows more than a defender does, e.g. that the backdoor lives
    #: in the adapter): reports mark it and leave it out of the defenses' averages
    reference: bool = False

    def check_victim(self, form: str) -> None:
        """Raise a ``CrowError`` when this defense cannot repair a victim of this ``form`` ("adapter": with its
        trainable suspect adapter, "merged": merged in, "full": all weights poisoned): a bench fails when planned."""

    def repair(self, model: nn.Module, tokenizer, ctx: DefenseContext) -> nn.Module:
        raise NotImplementedError

    def settings(self, task: str | None = None, seed: int | None = None) -> dict:
        """Every setting with its value, defaults included (for a cell's key and record)."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
