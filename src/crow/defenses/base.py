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

    def repair(self, model: nn.Module, tokenizer, ctx: DefenseContext) -> nn.Module:
        raise NotImplementedError

    def settings(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
