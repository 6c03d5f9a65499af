"""The defense interface: what a defense gets (``DefenseContext``) and what it does (``Defense.repair``).

The defenses themselves and the name registry (``get_defense``) live in ``registry.py``, which imports
this module; this module imports none of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..data.records import Record


#: what a defense receives: "adapter" (a PEFT model with the suspect LoRA adapter, trainable), "merged" (the
#: suspect adapter merged into the base weights, no adapter) or "full" (a model whose weights were all trained
#: on the poisoned mix, as the tiny suite's victims)
VICTIM_FORMS = ("adapter", "merged", "full")


@dataclass
class DefenseContext:
    """What every defense gets besides the model: the defender's clean samples and how to format them."""

    clean: Sequence[Record]
    template: str = "alpaca"
    max_length: int = 256
    seed: int = 0
    task: str | None = None
    work_dir: Path = Path(".")
    progress: bool = False
    #: filled by defenses that train: the trainer's logged metrics (lm_loss, consistency_clean, ...) per logging step
    train_log: list[dict] = field(default_factory=list)


class Defense:
    """A defense repairs a suspect model. ``repair`` receives the victim (a PEFT model whose suspect
    adapter is trainable) and returns the repaired model; it may modify the model in place."""

    name: str = "defense"
    #: what the defense changes, for tables: "adapter", "weights" or "nothing"
    changes: str = "adapter"
    #: a reference, not a defense of the threat model (it knows more than a defender does, e.g. that the
    #: backdoor lives in the adapter): reports mark it and leave it out of the defenses' averages
    reference: bool = False

    def check_victim(self, form: str) -> None:
        """Raise a ``CrowError`` when this defense cannot repair a victim of this form (one of
        ``VICTIM_FORMS``), so that a bench fails when it is planned, not after training the victim."""

    def repair(self, model: nn.Module, tokenizer, ctx: DefenseContext) -> nn.Module:
        raise NotImplementedError

    def settings(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
