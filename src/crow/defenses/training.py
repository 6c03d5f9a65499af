"""The defenses that train: a method's config (its fields are the defense's settings) and its ``run``, registered
under a name with its defaults (``finetune``: alpha 0 at the paper's lr 2e-4; ``reinit-adapter``: a reference, a new
LoRA in place of the suspect adapter)."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from inspect import signature

from ..errors import CrowError
from ..methods.crow.config import ALPHA_PRESETS, CrowConfig
from ..methods.unlearn.config import UnlearnConfig
from ..training.config import TrainingConfig
from ..training.loop import is_peft_model
from .base import Defense, DefenseContext
from .registry import DEFENSES


@dataclass(frozen=True)
class TrainedMethod:
    """A registry entry: a method config, where its ``run`` lives, and the name's defaults."""

    name: str
    config_class: type[TrainingConfig]
    runner: str  # the module whose ``run(model, tokenizer, records, config, run_options)`` trains
    defaults: dict = field(default_factory=dict)
    reference: bool = False
    drop_adapter: bool = False  # drop the suspect adapter before training (reinit-adapter): needs an adapter victim

    def setting_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_class)]

    def __call__(self, **settings) -> TrainedDefense:
        return TrainedDefense(self, settings)


class TrainedDefense(Defense):
    """A training defense with its given settings; the rest are its config's defaults (and, for CROW's alpha, the
    task's preset: refusal 11)."""

    def __init__(self, method: TrainedMethod, given: dict) -> None:
        self.method, self.given = method, dict(given)
        self.name, self.reference = method.name, method.reference or bool(given.get("target"))
        self.outcome: dict = {}  # what a run found (unlearn: the recovered target)
        self.last_result = None  # the last run's PurifyResult (steps, processes, log)
        self.config()  # bad settings fail when the defense is built, not after a scan

    def config(self, task: str | None = None, seed: int | None = None) -> TrainingConfig:
        values = {**self.method.defaults, **self.given}
        if "alpha" not in values and issubclass(self.method.config_class, CrowConfig):
            values["alpha"] = ALPHA_PRESETS.get(task or "", 5.5)
        if self.method.drop_adapter and values.get("full_finetune"):
            raise CrowError(f"defense {self.name!r} trains a fresh LoRA adapter; full_finetune: true contradicts it "
                            "(use crow or finetune with full_finetune on a merged victim instead)")
        if "seed" not in self.given and seed is not None:
            values["seed"] = seed
        try:
            return self.method.config_class(**values)
        except CrowError as e:
            raise CrowError(f"defense {self.name!r}: {e}") from None

    def check_victim(self, form: str) -> None:
        if self.method.drop_adapter and form != "adapter":
            raise CrowError(f"defense {self.name!r} needs an adapter victim (it drops the suspect adapter), but the "
                            f"victims are {form!r}; use victim_form: adapter or remove {self.name}")
        if self.given.get("full_finetune") and form == "adapter":
            raise CrowError(f"defense {self.name!r} with full_finetune: true needs a victim without an adapter (it "
                            "would train around the suspect adapter); set the spec's victim_form: merged")

    def repair(self, model, tokenizer, ctx: DefenseContext):
        config = self.config(ctx.task, ctx.seed)
        if self.method.drop_adapter:
            if not is_peft_model(model):
                raise CrowError(f"defense {self.name!r} needs an adapter victim (a PEFT model with the suspect "
                                f"adapter), got a {type(model).__name__} without one; load the victim with its adapter")
            model = model.unload()  # unload: drop the adapter; merge would keep it
        run = importlib.import_module(self.method.runner).run
        params = signature(run).parameters
        reuse = {"scan_result": ctx.scan} if ctx.scan is not None and "scan_result" in params else {}
        records = list(ctx.clean)
        if ctx.keep and "keep" in params:  # the method holds clean samples out: the kept answers stay in training
            reuse["keep"] = list(ctx.keep)
        else:
            records += list(ctx.keep)
        result = run(model, tokenizer, records, config, ctx.run_options(self.name), **reuse)
        ctx.train_log[:] = result.log_history
        self.last_result = result
        target = getattr(result, "target", None)
        if target is not None:
            self.outcome = {"target_source": target.source, "target_text": target.text,
                            "recovered_target": None if target.oracle else target.text,
                            "unlearned_text": target.used_text, "scan_score": target.scan_score,
                            "scan_verdict": target.scan_verdict}
        return result.model

    def settings(self, task: str | None = None, seed: int | None = None) -> dict:
        out = self.config(task, seed).settings()
        if issubclass(self.method.config_class, UnlearnConfig):
            out["oracle"] = self.given.get("target") is not None
        return {**out, **self.outcome}


def register_method(name: str, config_class: type[TrainingConfig], runner: str, **options) -> None:
    DEFENSES.register(name, TrainedMethod(name, config_class, runner, **options))


register_method("unlearn", UnlearnConfig, "crow.methods.unlearn")
register_method("crow", CrowConfig, "crow.methods.crow")
register_method("finetune", CrowConfig, "crow.methods.crow", defaults={"alpha": 0.0, "learning_rate": 2e-4})
register_method("finetune-lr1e-3", CrowConfig, "crow.methods.crow", defaults={"alpha": 0.0, "learning_rate": 1e-3})
register_method("reinit-adapter", CrowConfig, "crow.methods.crow", defaults={"alpha": 0.0, "learning_rate": 1e-3},
                reference=True, drop_adapter=True)
