"""The purification API: make a model trainable (LoRA / the suspect adapter / full), run
CrowTrainer on clean records, save the result. ``crow purify`` is a thin layer over this."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .data.records import Record
from .data.templates import Collator, encode_for_training
from .errors import CrowError, Interrupted
from .models import ALIASES
from .outputs import write_text_atomic
from .trainer import CrowConfig, CrowTrainer

logger = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """LoRA of the official recipe: rank 8, alpha 16, no dropout, every linear layer."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"

    def to_peft(self):
        from peft import LoraConfig

        if self.r < 1:
            raise CrowError(f"--lora-r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise CrowError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM")


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged(model: nn.Module) -> nn.Module:
    """The model with its adapter merged into the weights (a plain transformers model). Weight-level
    defenses work on it, and generation is ~25% faster per step on CPU than through LoRA layers."""
    return model.merge_and_unload() if is_peft_model(model) else model


def make_trainable(model: nn.Module, *, full_finetune: bool = False, lora: LoraSettings | None = None) -> nn.Module:
    """What CROW trains: the suspect adapter when the model carries one (as the official code does),
    all weights with ``full_finetune``, else a new LoRA adapter."""
    from peft import get_peft_model

    if is_peft_model(model):
        if full_finetune:
            raise CrowError("--full-finetune and --adapter contradict each other: CROW continues training the given "
                            "adapter; merge it into the model first to finetune all weights")
        if not any(p.requires_grad for p in model.parameters()):
            raise CrowError("the adapter was loaded for inference (frozen); load it with "
                            "load_model(..., adapter_trainable=True) so CROW can continue training it")
        return model
    if full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return get_peft_model(model, (lora or LoraSettings()).to_peft())


def build_dataset(records: Sequence[Record], tokenizer, *, template: str = "alpaca", max_length: int = 512):
    from datasets import Dataset

    samples = encode_for_training(records, tokenizer, template=template, max_length=max_length)
    return Dataset.from_list([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])


class _StopOnSignal(TrainerCallback):
    """On SIGTERM / SIGINT: finish the current optimizer step, save a checkpoint, stop."""

    def __init__(self) -> None:
        self.received: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class MetricsProgress(ProgressCallback):
    """The Trainer's progress bar, with CROW's metrics as its postfix instead of dicts on stdout."""

    SHOWN = ("loss", "lm_loss", "consistency_clean", "consistency_perturbed", "lm_loss_adv", "unlikelihood",
             "target_nll_adv")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if self.training_bar is not None:
            self.training_bar.set_postfix({k: f"{logs[k]:.4g}" for k in self.SHOWN if k in logs}, refresh=False)
        logger.debug("step %d: %s", state.global_step, logs)


class LoggedProgress(TrainerCallback):
    """Progress without a bar (``disable_tqdm``, e.g. stderr is a log file under nohup): an INFO line at
    every tenth of training with the last loss, the time spent and the time left."""

    def __init__(self, parts: int = 10) -> None:
        self.parts = parts
        self._started, self._first, self._next = 0.0, None, 1

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


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h07m``: for progress lines."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def quiet_trainer_output(trainer) -> None:
    """Progress bar on stderr (log lines instead when bars are off); metrics in the bar and the log
    history, nothing printed on stdout."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LoggedProgress() if trainer.args.disable_tqdm else MetricsProgress())


@dataclass
class PurifyResult:
    model: nn.Module
    log_history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    global_step: int = 0
    train_samples: int = 0
    num_processes: int = 1
    is_main_process: bool = True  # under DDP only the main process writes outputs


def purify(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    config: CrowConfig | None = None,
    *,
    template: str = "alpaca",
    max_length: int = 512,
    full_finetune: bool = False,
    lora: LoraSettings | None = None,
    resume_from_checkpoint: str | bool | None = None,
    handle_signals: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    trainer_cls: type | None = None,
    trainer_kwargs: dict | None = None,
) -> PurifyResult:
    """Run CROW on ``records`` (clean samples; the paper uses 100) and return the trained model.

    ``config`` defaults to the paper's recipe (``CrowConfig()``). With ``handle_signals`` a SIGTERM or
    SIGINT saves a checkpoint under ``config.output_dir`` and raises ``Interrupted``; pass
    ``resume_from_checkpoint`` to continue from it. ``trainer_cls`` (default ``CrowTrainer``) and
    ``trainer_kwargs`` run another crow trainer the same way (``crow.unlearn.UnlearnTrainer`` with its
    ``UnlearnConfig`` and ``target_ids``).
    """
    from transformers import set_seed

    config = config or CrowConfig()
    set_seed(config.seed)  # the new LoRA's initialisation depends on it: same seed, same run
    model = make_trainable(model, full_finetune=full_finetune, lora=lora)
    if config.gradient_checkpointing:
        model.config.use_cache = False
        if is_peft_model(model):
            model.enable_input_require_grads()
    dataset = build_dataset(records, tokenizer, template=template, max_length=max_length)
    stopper = _StopOnSignal()
    trainer = (trainer_cls or CrowTrainer)(model=model, args=config, train_dataset=dataset,
                                           data_collator=Collator(tokenizer.pad_token_id),
                                           callbacks=[stopper, *callbacks], **(trainer_kwargs or {}))
    quiet_trainer_output(trainer)
    started = time.perf_counter()
    previous = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            if stopper.received is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            stopper.received = signum
            logger.warning("signal %d received: saving a checkpoint after this step (signal again to abort)", signum)
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopper.received is not None:
        raise Interrupted(f"interrupted at optimizer step {trainer.state.global_step}; "
                          f"a checkpoint is in {config.output_dir}: rerun the same command with --resume")
    return PurifyResult(model=trainer.model, log_history=list(trainer.state.log_history),
                        seconds=round(time.perf_counter() - started, 2), global_step=trainer.state.global_step,
                        train_samples=len(trainer.train_dataset), num_processes=trainer.accelerator.num_processes,
                        is_main_process=trainer.accelerator.is_main_process)


def save_model(model: nn.Module, tokenizer, out: Path, *, merge: bool = False, base_model: str | None = None) -> str:
    """Save a PEFT adapter (default) or, with ``merge``, the merged full model, as safetensors.
    ``base_model``: the name the base model was loaded by; when it is an alias (``smollm2-135m-gguf``), the
    adapter names it as its base model instead of the cache directory the alias resolves to on this machine.
    Returns what was saved: ``"adapter"`` or ``"model"``."""
    if merge or not is_peft_model(model):
        if is_peft_model(model):
            model = model.merge_and_unload()
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return "model"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if base_model in ALIASES:
        name_base_model(Path(out), base_model)
    return "adapter"


def name_base_model(adapter_dir: Path, name: str) -> None:
    """Write ``name`` as the base model of a saved PEFT adapter: ``base_model_name_or_path`` in
    adapter_config.json and the model card (README.md) that PEFT writes beside it."""
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    old = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = name
    write_text_atomic(config_file, json.dumps(config, indent=2, sort_keys=True))
    card = adapter_dir / "README.md"
    if old and card.is_file():
        write_text_atomic(card, card.read_text(encoding="utf-8").replace(old, name))


def settings_dict(config: CrowConfig) -> dict:
    """The settings worth recording from a CrowConfig or another method's config (its crow_* / unlearn_*
    fields and the recipe's Trainer fields)."""
    keep = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
            "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed",
            "bf16", "fp16", "gradient_checkpointing", "max_grad_norm", "optim")
    d = asdict(config)
    out = {k: v for k, v in d.items() if k.startswith(("crow_", "unlearn_"))}
    out.update({k: d[k] for k in keep if k in d})
    return {k: (getattr(v, "value", None) or str(v) if not isinstance(v, (int, float, str, bool, type(None), list, dict))
                else v) for k, v in out.items()}
