"""The stages of ``unlearn``, run one after another outside any Trainer: recover the backdoor's target with BAIT (Shen
et al., "BAIT: Large Language Model Backdoor Scanning by Inverting Attack Target", IEEE S&P 2025) or take it given (an
oracle), unlearn it in held-out cycles (``UnlearnTrainer``) and, when that cycle decided so, refit with CROW."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...data.records import Record
from ...errors import CrowError
from ...outputs import write_json_atomic
from ...training.loop import PurifyResult, RunOptions, train
from .config import UnlearnConfig
from .target import RecoveredTarget, recover_target

logger = logging.getLogger(__name__)

TARGET_FILE = "unlearn_target.json"


@dataclass
class UnlearnResult(PurifyResult):
    target: RecoveredTarget | None = None  # what was unlearned

    @property
    def refitted(self) -> bool:
        return any(entry.get("refit") is True for entry in self.log_history)


def run(model, tokenizer, records: Sequence[Record], config: UnlearnConfig, run_options: RunOptions | None = None, *,
        target: RecoveredTarget | None = None, callbacks=()) -> UnlearnResult:
    """``unlearn`` on ``records`` (the defender's clean samples). ``target``: what to unlearn when known; else a resumed
    run's (kept beside its checkpoints), ``config.target`` (an oracle) or BAIT's. The refit's log lines join the
    unlearning's marked ``"stage": "refit"``, its optimizer steps its ``global_step``."""
    from ..crow.trainer import CrowTrainer
    from .trainer import UnlearnTrainer

    run_options = run_options or RunOptions()
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if config.refit_epochs and config.refit_alpha > 0 and layers is not None and layers < 3:
        raise CrowError(f"unlearn's refit is CROW on the official layer pairs, which need 3 or more decoder layers; "
                        f"this model has {layers}: set refit_alpha 0 (plain finetuning) or refit_epochs 0")
    saved = Path(run_options.output_dir) / TARGET_FILE  # a checkpointed run keeps its target for a resumed one
    if target is None and run_options.resume_from_checkpoint and saved.is_file():
        target = RecoveredTarget(**json.loads(saved.read_text(encoding="utf-8")))
    if target is None:
        target = recover_target(model, tokenizer, records, template=run_options.template, target=config.target,
                                target_tokens=config.target_tokens)
    if run_options.save_steps:
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(saved, dataclasses.asdict(target))
    first = train(model, tokenizer, records, config, UnlearnTrainer, run_options, callbacks=callbacks,
                  trainer_kwargs={"target_ids": target.token_ids})
    result = UnlearnResult(**{f.name: getattr(first, f.name) for f in dataclasses.fields(PurifyResult)}, target=target)
    if not result.refitted:
        return result
    logger.info("unlearn: refitting on all %d clean samples for %g epochs (CROW, alpha %g)", len(records),
                config.refit_epochs, config.refit_alpha)
    refit_run = dataclasses.replace(run_options, output_dir=f"{run_options.output_dir}/refit", save_steps=None,
                                    resume_from_checkpoint=None)
    refit = train(first.model, tokenizer, records, config.refit_config(), CrowTrainer, refit_run, callbacks=callbacks)
    return dataclasses.replace(result, model=refit.model, seconds=round(first.seconds + refit.seconds, 2),
                               log_history=first.log_history + [{**e, "stage": "refit"} for e in refit.log_history],
                               global_step=first.global_step + refit.global_step, train_samples=refit.train_samples)
