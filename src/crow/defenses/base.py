"""The defense interface and registry: CROW and the baselines it is compared with."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..data.records import Record
from ..errors import CrowError


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


DEFENSES: dict[str, Callable[..., Defense]] = {}


def register(name: str):
    def wrap(cls):
        DEFENSES[name] = cls
        return cls
    return wrap


def get_defense(name: str, **settings) -> Defense:
    """A defense by name with optional settings; unknown names and settings are errors that list the valid ones."""
    from . import registry  # noqa: F401  (fills DEFENSES)

    if name not in DEFENSES:
        raise CrowError(f"unknown defense {name!r}; valid: {', '.join(DEFENSES)}")
    factory = DEFENSES[name]
    if dataclasses.is_dataclass(factory):
        valid = {f.name for f in dataclasses.fields(factory)}
        unknown = sorted(set(settings) - valid)
        if unknown:
            raise CrowError(f"defense {name!r} has no setting {unknown[0]!r}; valid: {', '.join(sorted(valid)) or 'none'}")
    elif settings:
        raise CrowError(f"defense {name!r} takes no settings, got {sorted(settings)}")
    return factory(**settings)

