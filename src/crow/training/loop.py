"""The loop every training method shares: a ``LossTrainer`` on the clean samples, checkpoints, signals, saving."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..data.records import Record
from ..data.templates import Collator, encode_for_training
from ..errors import CrowError, Interrupted, TrainingDiverged
from ..losses import causal_lm_loss_sum
from ..modeling import keeps_logits
from ..models import ALIASES
from ..outputs import write_text_atomic
from .config import TrainingConfig

logger = logging.getLogger(__name__)


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def merged(model: nn.Module) -> nn.Module:
    """The adapter merged into the weights: what weight-level defenses need; it generates ~25% faster on CPU."""
    return model.merge_and_unload() if is_peft_model(model) else model


def make_trainable(model: nn.Module, config: TrainingConfig) -> nn.Module:
    """The suspect adapter if the model has one (as the official code), all weights if ``full_finetune``, or a LoRA."""
    from peft import get_peft_model
    if is_peft_model(model):
        if config.full_finetune:
            raise CrowError("full_finetune and a suspect adapter contradict each other: crow continues training the "
                            "given adapter; merge it into the model first to finetune every weight")
        if not any(p.requires_grad for p in model.parameters()):
            raise CrowError("the adapter was loaded for inference (frozen); load it with "
                            "load_model(..., adapter_trainable=True) so it can be trained")
        return model
    if config.full_finetune:
        return model.requires_grad_(True)
    return get_peft_model(model, config.lora())


class LossTrainer(Trainer):
    """A ``transformers.Trainer`` with the loss of ``method`` (its config): the response tokens' LM loss over the whole
    accumulated batch's targets (``num_items_in_batch``) plus the method's terms, each divided by the accumulation
    steps; ``self._metrics`` are averaged into the log, and a NaN/inf loss raises ``TrainingDiverged``."""

    loss_is_scaled_for_ga = True  # compute_loss normalizes for accumulation itself: the Trainer must not scale again
    config_class: type = TrainingConfig  # the method config the trainer needs (checked at construction)

    def __init__(self, *args, method: TrainingConfig, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(method, self.config_class):
            raise CrowError(f"{type(self).__name__} needs a {self.config_class.__name__} as method, got "
                            f"{type(method).__name__}")
        self.method = method
        self.model_accepts_loss_kwargs = True  # the Trainer counts num_items_in_batch only then (none reach the model)
        self._keeps_logits = keeps_logits(self.accelerator.unwrap_model(self.model))
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._last_finite: deque[float] = deque(maxlen=5)

    def _accumulation_steps(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", 1) if self.model.training else 1

    def _lm(self, logits, labels, num_items_in_batch, name: str = "lm_loss") -> torch.Tensor:
        """The LM loss of ``labels``, normalized for accumulation; its mean per target token is logged as ``name``."""
        lm_sum, n_targets = causal_lm_loss_sum(logits, labels)
        self._metrics[name].append((lm_sum / n_targets.clamp_min(1)).item())
        if num_items_in_batch is None:  # outside the training loop: a per-micro-batch mean
            return lm_sum / n_targets.clamp_min(1) / self._accumulation_steps()
        loss = lm_sum / num_items_in_batch
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return loss

    def _finish(self, loss: torch.Tensor, outputs, return_outputs: bool):
        """``compute_loss``'s return, after checking that ``loss`` is finite."""
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise TrainingDiverged(self.state.global_step + 1, value, list(self._last_finite))
        self._last_finite.append(value * self._accumulation_steps())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update({name: round(sum(values) / len(values), 6) for name, values in self._metrics.items() if values})
        self._metrics.clear()
        super().log(logs, start_time)


class StopOnSignal(TrainerCallback):
    """On SIGTERM / SIGINT: finish the current optimizer step, save a checkpoint, stop."""

    received: int | None = None  # the signal, once one came

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = control.should_training_stop = True
        return control


class MetricsProgress(ProgressCallback):
    """The Trainer's progress bar, with the method's metrics as its postfix instead of dicts on stdout."""

    SHOWN = ("loss", "lm_loss", "consistency_clean", "consistency_perturbed", "lm_loss_adv", "unlikelihood",
             "target_nll_adv")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if self.training_bar is not None:
            self.training_bar.set_postfix({k: f"{logs[k]:.4g}" for k in self.SHOWN if k in logs}, refresh=False)
        logger.debug("step %d: %s", state.global_step, logs)


class LoggedProgress(TrainerCallback):
    """Progress without a bar (stderr is a log file under nohup): an INFO line at every tenth of training."""

    parts = 10
    _started, _first, _next = 0.0, None, 1

    def on_train_begin(self, args, state, control, **kwargs):
        self._started, self._first = time.perf_counter(), None

    def on_step_end(self, args, state, control, **kwargs):
        step, total = state.global_step, state.max_steps
        if not state.is_world_process_zero or total <= 0:
            return
        if self._first is None:  # the step this run started from (> 0 when resumed from a checkpoint)
            self._first = step - 1
            self._next = self._first * self.parts // total + 1
        if step * self.parts < self._next * total:
            return
        self._next = step * self.parts // total + 1
        spent = time.perf_counter() - self._started
        left = spent / (step - self._first) * (total - step)
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
        logger.info("training step %d/%d (%d%%)%s; %s spent, about %s left", step, total, 100 * step // total,
                    "" if loss is None else f", loss {loss:.4g}", format_duration(spent), format_duration(left))


@functools.cache
def fsdp_ignored(distributed_type: str, processes: int) -> None:
    """Warn (once) that an FSDP launch config was not applied: accelerate enables FSDP on accelerator devices only;
    CPU processes get DDP (docs/distributed.md)."""
    logger.warning("the launch config asks for FSDP, but accelerate set up %s with %d process(es): nothing is sharded, "
                   "every process holds the whole model (accelerate applies FSDP on GPUs and other accelerators only)",
                   distributed_type, processes)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h07m``: for progress lines."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class PurifyResult:
    model: nn.Module
    log_history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    global_step: int = 0
    train_samples: int = 0
    num_processes: int = 1
    is_main_process: bool = True  # under DDP only the main process writes outputs


@dataclass
class RunOptions:
    """How a training run is executed, never what it learns: its checkpoints, and whether a signal stops it."""

    output_dir: str = "crow_output"
    template: str = "alpaca"
    max_length: int = 512
    progress: bool = True
    save_steps: int | None = None  # checkpoint every N optimizer steps (for a resumed run)
    resume_from_checkpoint: str | None = None
    handle_signals: bool = False  # SIGTERM / SIGINT: checkpoint after the step, then raise Interrupted


def train(model: nn.Module, tokenizer, records: Sequence[Record], method: TrainingConfig, trainer_cls: type,
          run: RunOptions | None = None, *, callbacks: Sequence[TrainerCallback] = (),
          trainer_kwargs: dict | None = None, extra: Sequence[Record] = ()) -> PurifyResult:
    """Train ``model`` on the clean ``records`` with ``trainer_cls`` (a ``LossTrainer``); with ``run.handle_signals``
    a SIGTERM or SIGINT saves a checkpoint and raises ``Interrupted``. ``extra``: records trained on after ``records``
    that the trainer must never hold out (it gets ``n_extra``, their count in the dataset's last rows)."""
    from datasets import Dataset
    from transformers import set_seed
    run = run or RunOptions()
    set_seed(method.seed)  # a new LoRA's initialisation depends on it: same seed, same run
    model = make_trainable(model, method)
    if method.gradient_checkpointing:
        model.config.use_cache = False
        if is_peft_model(model):
            model.enable_input_require_grads()
    checkpoints = {"save_strategy": "steps", "save_steps": run.save_steps, "save_total_limit": 1}
    args = method.training_arguments(run.output_dir, disable_tqdm=not run.progress,
                                     **(checkpoints if run.save_steps else {}))
    samples = encode_for_training(records, tokenizer, template=run.template, max_length=run.max_length)
    if extra:
        more = encode_for_training(extra, tokenizer, template=run.template, max_length=run.max_length)
        samples, trainer_kwargs = [*samples, *more], {**(trainer_kwargs or {}), "n_extra": len(more)}
    dataset = Dataset.from_list([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])
    stopper = StopOnSignal()
    trainer = trainer_cls(model=model, args=args, method=method, train_dataset=dataset, callbacks=[stopper, *callbacks],
                          data_collator=Collator(tokenizer.pad_token_id), **(trainer_kwargs or {}))
    # a progress bar on stderr (log lines when bars are off) showing the metrics; nothing printed on stdout
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LoggedProgress() if trainer.args.disable_tqdm else MetricsProgress())
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        fsdp_ignored(trainer.accelerator.distributed_type.value, trainer.accelerator.num_processes)
    started, previous = time.perf_counter(), {}
    if run.handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            if stopper.received is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            stopper.received = signum
            logger.warning("signal %d received: saving a checkpoint after this step (signal again to abort)", signum)
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        trainer.train(resume_from_checkpoint=run.resume_from_checkpoint)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopper.received is not None:
        raise Interrupted(f"interrupted at optimizer step {trainer.state.global_step}; a checkpoint is in "
                          f"{run.output_dir}: rerun the same command with --resume")
    return PurifyResult(model=trainer.model, log_history=list(trainer.state.log_history),
                        seconds=round(time.perf_counter() - started, 2), global_step=trainer.state.global_step,
                        train_samples=len(trainer.train_dataset), num_processes=trainer.accelerator.num_processes,
                        is_main_process=trainer.accelerator.is_main_process)


def save_model(model: nn.Module, tokenizer, out: Path, *, merge: bool = False, base_model: str | None = None) -> str:
    """Save the PEFT adapter or (``merge``) the merged model as safetensors; ``"adapter"`` or ``"model"``. A
    ``base_model`` alias is named as the adapter's base, not the cache directory it resolves to on this machine."""
    full = merge or not is_peft_model(model)
    (merged(model) if full else model).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not full and base_model in ALIASES:
        name_base_model(Path(out), base_model)
    return "model" if full else "adapter"


def name_base_model(adapter_dir: Path, name: str) -> None:
    """Write ``name`` as a saved adapter's base model, in adapter_config.json and PEFT's model card (README.md)."""
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    old = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = name
    write_text_atomic(config_file, json.dumps(config, indent=2, sort_keys=True))
    card = adapter_dir / "README.md"
    if old and card.is_file():
        write_text_atomic(card, card.read_text(encoding="utf-8").replace(old, name))
