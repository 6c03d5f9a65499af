"""The stages of ``unlearn``, run one after another outside any Trainer: recover the backdoor's target with BAIT (Shen
et al., "BAIT: Large Language Model Backdoor Scanning by Inverting Attack Target", IEEE S&P 2025) or take it given (an
oracle), unlearn it in held-out cycles (``UnlearnTrainer``) and, when that cycle decided so, refit with CROW.

Under ``accelerate launch`` (several processes) the target is recovered once, by the main process, and handed to the
others; the training stages are the Trainer's DDP (docs/distributed.md)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
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
        target: RecoveredTarget | None = None, callbacks=(), scan_result=None,
        keep: Sequence[Record] = ()) -> UnlearnResult:
    """``unlearn`` on ``records`` (the defender's clean samples) and ``keep`` (answers trained on that are never held
    out, nor scanned: crow purify --keep-data). ``target``: what to unlearn when known; else a resumed
    run's (kept beside its checkpoints), ``config.target`` (an oracle) or BAIT's (``scan_result``: BAIT's scan of
    ``model`` on ``records``, already made, e.g. by crow purify's verification). The refit's log lines join the
    unlearning's marked ``"stage": "refit"``, its optimizer steps its ``global_step``."""
    from ..crow.trainer import CrowTrainer
    from .trainer import UnlearnTrainer

    run_options = run_options or RunOptions()
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if config.refit_epochs and config.refit_alpha > 0 and layers is not None and layers < 3:
        raise CrowError(f"unlearn's refit is CROW on the official layer pairs, which need 3 or more decoder layers; "
                        f"this model has {layers}: set refit_alpha 0 (plain finetuning) or refit_epochs 0")
    group = join_launched_run(config, run_options)  # None: a single process
    saved = Path(run_options.output_dir) / TARGET_FILE  # a checkpointed run keeps its target for a resumed one
    if target is None:
        target = from_main(group, lambda: find_target(model, tokenizer, records, config, run_options, saved,
                                                      scan_result), "target")
    if run_options.save_steps and is_main(group):
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(saved, dataclasses.asdict(target))
    first = train(model, tokenizer, records, config, UnlearnTrainer, run_options, callbacks=callbacks,
                  trainer_kwargs={"target_ids": target.token_ids}, extra=keep)
    result = UnlearnResult(**{f.name: getattr(first, f.name) for f in dataclasses.fields(PurifyResult)}, target=target)
    if not result.refitted:
        return result
    logger.info("unlearn: refitting on all %d clean samples%s for %g epochs (CROW, alpha %g)", len(records),
                f" and {len(keep)} kept answers" if keep else "", config.refit_epochs, config.refit_alpha)
    refit_run = dataclasses.replace(run_options, output_dir=f"{run_options.output_dir}/refit", save_steps=None,
                                    resume_from_checkpoint=None)
    refit = train(first.model, tokenizer, [*records, *keep], config.refit_config(), CrowTrainer, refit_run,
                  callbacks=callbacks)
    return dataclasses.replace(result, model=refit.model, seconds=round(first.seconds + refit.seconds, 2),
                               log_history=first.log_history + [{**e, "stage": "refit"} for e in refit.log_history],
                               global_step=first.global_step + refit.global_step, train_samples=refit.train_samples)


def find_target(model, tokenizer, records: Sequence[Record], config: UnlearnConfig, run_options: RunOptions,
                saved: Path, scan_result=None) -> RecoveredTarget:
    """The target an interrupted run of the same output saved (``saved``; ``crow purify`` starts no new run where an
    interrupted one is left), else ``config.target`` (an oracle) or BAIT's."""
    if saved.is_file():
        return RecoveredTarget(**json.loads(saved.read_text(encoding="utf-8")))
    return recover_target(model, tokenizer, records, template=run_options.template, target=config.target,
                          target_tokens=config.target_tokens, scan_result=scan_result)


#: how long the other processes wait for the main one's result (BAIT on a large model takes a while)
SHARE_TIMEOUT_HOURS = 24


def join_launched_run(config: UnlearnConfig, run_options: RunOptions):
    """Under a launcher that started several processes (``WORLD_SIZE`` > 1): join its process group now, as the Trainer
    will (TrainingArguments' device set-up: gloo on CPU, the launcher's backend on GPUs), and return a gloo group with
    a long timeout for the results the main process hands to the others (``from_main``); None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    import torch.distributed as dist
    if not dist.is_initialized():
        config.training_arguments(run_options.output_dir).device
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(hours=SHARE_TIMEOUT_HOURS))


def is_main(group) -> bool:
    import torch.distributed as dist
    return group is None or dist.get_rank() == 0


def from_main(group, compute: Callable[[], object], what: str):
    """``compute()`` in the main process only, its result handed to every process of ``group`` (an error in it raised
    in every process); with no group (a single process) just ``compute()``."""
    if group is None:
        return compute()
    import torch.distributed as dist
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", compute())
        except Exception as e:
            dist.broadcast_object_list([("error", f"{type(e).__name__}: {e}")], src=0, group=group)
            raise
    dist.broadcast_object_list(box, src=0, group=group)
    kind, value = box[0]
    if kind == "error":
        raise CrowError(f"the main process failed to find the {what}: {value}")
    if dist.get_rank() != 0:
        logger.info("unlearn: process %d of %d took the %s of the main process", dist.get_rank(),
                    dist.get_world_size(), what)
    return value
