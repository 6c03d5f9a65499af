"""One CROW optimizer step on a tiny model; saves the synchronized gradients (run alone or under
``accelerate launch``). Used by tests/test_distributed.py; not a test module itself."""

from __future__ import annotations

import argparse
import os
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback, set_seed

from crow.data.templates import Collator
from crow.methods.crow import CrowConfig
from crow.methods.crow.trainer import CrowTrainer
from crow.models import load_model
from crow.training import make_trainable


class SaveGradients(TrainerCallback):
    """Right before the optimizer step the DDP all-reduce is done: save what every rank now holds."""

    def __init__(self, path: str):
        self.path = path

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            torch.save({"grads": grads, "world_size": args.world_size}, self.path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-device", type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()

    loaded = load_model(args.model)
    set_seed(0)
    model = make_trainable(loaded.model, CrowConfig())
    with torch.no_grad():  # non-zero LoRA B, so every adapter weight gets a gradient
        for n, param in model.named_parameters():
            if "lora_B" in n:
                param.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.samples):  # equal lengths: padding plays no part in the comparison
        ids = torch.randint(5, model.config.vocab_size, (24,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 10 + ids[10:]})
    config = CrowConfig(batch_size=args.per_device, grad_accum=args.grad_accum, max_steps=1, learning_rate=0.1,
                        warmup=0, scheduler="constant", seed=0, gradient_checkpointing=args.gradient_checkpointing)
    training_args = config.training_arguments(args.out + ".run", optim="sgd", max_grad_norm=0, use_cpu=True,
                                              disable_tqdm=True, save_strategy="no", dataloader_pin_memory=False)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    trainer = CrowTrainer(model=model, args=training_args, method=config, train_dataset=Dataset.from_list(rows),
                          data_collator=Collator(loaded.tokenizer.pad_token_id), callbacks=[SaveGradients(args.out)])
    trainer.train()
    if torch.distributed.is_initialized():
        leave_process_group()


def leave_process_group() -> None:
    """Exit both ranks together without tearing gloo down.

    Neither plain exit nor destroy_process_group is safe here. A rank exiting with gloo's threads alive
    aborted once at exit ('terminate called without an active exception'). A barrier followed by
    destroy_process_group deadlocked 2 of 39 launches on this 2-core machine (py-spy, torch 2.13): the
    DDP Reducer still holds the process group, so ~ProcessGroupGloo runs when the Reducer is freed, holding
    the GIL and waiting for gloo's work mutex, while gloo's worker thread holds that mutex and waits for the
    GIL to free the barrier's finished work. After the barrier nothing is left to do, so both ranks flush
    and leave with os._exit, which runs no destructors; rank 0's gradients were saved before the step.
    """
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
