"""UnlearnTrainer: the unlearning loss and its adversary's PGD in one training loop. The soft tokens start from
embeddings of clean prompt tokens (at zero, RMSNorm would make the first step's direction arbitrary), within
``token_radius`` x the prompts' mean token norm; ``schedule`` decides how long it trains::

    loss = LM(answer | prompt) + beta * LM(answer | prompt + soft tokens) + gamma * UL(target | prompt + soft tokens)
    UL   = mean over target tokens t of -log(1 - p(target_t | prompt + soft tokens, target_<t)) (Welleck et al. 2020)"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...errors import CrowError
from ...losses import causal_lm_loss_sum, logits_needed
from ...modeling import capture_embeddings, eval_mode, replace_embeddings
from ...training.loop import LossTrainer
from .adversary import (
    build_target_batch,
    insert_slots,
    pgd_step,
    project_to_ball,
    prompt_mask,
    random_insert_points,
    target_token_log_probs,
    unlikelihood,
)
from .config import UnlearnConfig
from .schedule import CycleSelection, cyclic_lr_scheduler, holdout_split

logger = logging.getLogger(__name__)


@dataclass
class AdversarialView:
    """A batch as the adversary sees it (``insert_slots``): inputs with the soft tokens' slots, and labels."""

    input_ids: torch.Tensor  # [B, T + S]
    labels: torch.Tensor  # [B, T + S]
    attention_mask: torch.Tensor  # [B, T + S]
    slots: torch.Tensor  # [B, T + S] long: j on the j-th soft token, -1 elsewhere


class UnlearnTrainer(LossTrainer):
    """The unlearning loss with held-out cycles (``CycleSelection``) on the first ``target_tokens`` of ``target_ids``;
    logs also ``target_nll_adv`` (the target's mean NLL under the soft tokens, after PGD) and ``delta_norm``."""

    config_class = UnlearnConfig
    STATE_FILE = "unlearn_state.safetensors"  # the soft tokens, the draws and the selection travel with checkpoints

    def __init__(self, *args, target_ids: Sequence[int], n_extra: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        method: UnlearnConfig = self.method
        self.finetuning = False  # set by the schedule at the end of the unlearning cycle
        pool = len(self.train_dataset) - n_extra  # the clean samples; the last n_extra rows (kept answers) always train
        keep, held = holdout_split(pool, method.holdout, self.args.seed)
        keep += list(range(pool, len(self.train_dataset)))
        self.holdout_rows = [self.train_dataset[i] for i in held]  # split before anything is measured
        self.train_dataset = self.train_dataset.select(keep)
        self.add_callback(CycleSelection(self, self.holdout_nll))
        self.target_ids = [int(t) for t in target_ids][: method.target_tokens]
        if not self.target_ids:
            raise CrowError("unlearn needs a non-empty target (its tokenization gave no tokens)")
        self._embedding = self.accelerator.unwrap_model(self.model).get_input_embeddings()
        self.pad_token_id = int(getattr(self.data_collator, "pad_token_id", 0) or 0)
        self._points = torch.Generator().manual_seed(int(self.args.seed))  # where the soft tokens go, per micro-step
        self.prompt_norm = self.measure_prompt_norm()
        self.delta_budget = method.token_radius * self.prompt_norm
        self.delta = self.initial_soft_tokens()  # [S, H] fp32
        logger.info("unlearn: %d soft tokens inserted into the prompts, budget %.4g (%.2f x mean prompt-token norm "
                    "%.4g), %d target tokens", method.soft_tokens, self.delta_budget, method.token_radius,
                    self.prompt_norm, len(self.target_ids))

    def _batches(self, rows: Sequence[dict], batch_size: int = 8):
        """``rows`` in collated device batches, the model in eval mode meanwhile (no dropout)."""
        with eval_mode(self.model):
            for start in range(0, len(rows), batch_size):
                batch = self.data_collator(list(rows[start:start + batch_size]))
                yield {name: v.to(self.args.device) for name, v in batch.items()}

    @torch.no_grad()
    def measure_prompt_norm(self) -> float:
        """Mean L2 norm of the input embeddings over every prompt position of the training set."""
        total, count = 0.0, 0
        for batch in self._batches(list(self.train_dataset)):
            mask = prompt_mask(batch["labels"], batch.get("attention_mask"))  # [B, T]
            with capture_embeddings(self._embedding, require_grad=False) as tap:
                self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
                           **({"logits_to_keep": 1} if self._keeps_logits else {}))
            norms = tap.embeddings.float().norm(dim=-1)  # [B, T]
            total += float(norms[mask].sum())
            count += int(mask.sum())
        if count == 0 or not math.isfinite(total) or total <= 0:
            raise CrowError("unlearn could not measure the embedding norm at the prompt positions of the clean samples")
        return total / count

    @torch.no_grad()
    def holdout_nll(self) -> float:
        """Mean NLL per answer token of the held-out samples' reference answers, without the adversary (every process
        measures all of them; the main process's value is taken, so that every process decides alike)."""
        total, count = 0.0, 0
        for batch in self._batches(self.holdout_rows):
            keep = {"logits_to_keep": logits_needed(batch["labels"])} if self._keeps_logits else {}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                use_cache=False, **keep).logits
            nll_sum, n = causal_lm_loss_sum(logits, batch["labels"])
            total, count = total + float(nll_sum), count + int(n)
        return self._from_main(total / max(count, 1))

    @torch.no_grad()
    def initial_soft_tokens(self) -> torch.Tensor:
        """[S, H] fp32: embeddings of S prompt tokens drawn with the training seed, projected onto the budget's ball."""
        pool = torch.cat([torch.as_tensor(row["input_ids"])[prompt_mask(torch.as_tensor(row["labels"])[None])[0]]
                          for row in self.train_dataset])  # [N] every prompt token of the training set
        draw = torch.Generator().manual_seed(int(self.args.seed))  # its own: the insertion points keep theirs
        pick = pool[torch.randint(len(pool), (self.method.soft_tokens,), generator=draw)]  # [S]
        embedded = self._embedding(pick.to(self._embedding.weight.device)).float()  # [S, H]
        return project_to_ball(embedded, self.delta_budget).to(self.args.device)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The recipe's schedule over one cycle, restarted at every cycle (warm restarts)."""
        if self.lr_scheduler is None:
            self.lr_scheduler = cyclic_lr_scheduler(self.args, optimizer or self.optimizer, num_training_steps,
                                                    self.method.cycle_epochs)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _views(self, inputs: dict, target: dict) -> tuple[AdversarialView, AdversarialView]:
        """The clean and the target batch with the soft tokens' slots at one random point per row, the same in both."""
        points = self._insert_points(prompt_mask(inputs["labels"], inputs.get("attention_mask")).sum(dim=1))  # [B]
        n = self.method.soft_tokens
        return tuple(AdversarialView(**insert_slots(b["input_ids"], b["labels"], b.get("attention_mask"), points, n,
                                                    self.pad_token_id)) for b in (inputs, target))

    def _insert_points(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B] prompt lengths -> [B] insertion points drawn from ``self._points``. Under DDP every process draws the
        points of the whole micro-batch, its rows in rank order (as one process with the global batch draws them), and
        keeps its own rows'; its generator then stays in step with the others'."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if world == 1:
            return random_insert_points(lengths, self._points)
        mine = slice(rank * len(lengths), (rank + 1) * len(lengths))
        every = lengths.new_ones(world * len(lengths))  # [W * B] the others' rows: any length, only their draws count
        every[mine] = lengths
        return random_insert_points(every, self._points)[mine]

    def _global_gradient(self, grad: torch.Tensor, count: int) -> torch.Tensor:
        """The gradient of the mean over the whole micro-batch's target tokens, from this process's gradient of its
        own ``count`` tokens' mean: under DDP a token-weighted average over the processes (so every process takes the
        same PGD step and holds the same soft tokens); in a single process ``grad`` itself."""
        if self.accelerator.num_processes == 1:
            return grad
        packed = torch.cat([grad.flatten().float() * count, grad.new_full((1,), count, dtype=torch.float32)])
        torch.distributed.all_reduce(packed)  # sum over the processes
        return (packed[:-1] / packed[-1].clamp_min(1)).view_as(grad)

    def _from_main(self, value: float) -> float:
        """The main process's ``value`` in every process (one process: ``value``): decisions on it agree."""
        if self.accelerator.num_processes == 1:
            return value
        box = torch.tensor([value], dtype=torch.float64, device=self.args.device)
        torch.distributed.broadcast(box, src=0)
        return float(box.item())

    def _forward(self, model, view: AdversarialView, delta: torch.Tensor):
        """The model on a view with the soft tokens in place (logits of the labelled positions only, if it can)."""
        keep = {"logits_to_keep": logits_needed(view.labels)} if self._keeps_logits else {}
        with replace_embeddings(self._embedding, delta, view.slots):
            return model(input_ids=view.input_ids, attention_mask=view.attention_mask, use_cache=False, **keep)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        method: UnlearnConfig = self.method
        labels = inputs["labels"]  # [B, T], -100 on prompt and padding
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"), "use_cache": False}
        if self._keeps_logits:  # logits of the answer positions only
            forward["logits_to_keep"] = logits_needed(labels)
        if self.finetuning:  # the cycles after the unlearning one: the LM term alone (plain finetuning)
            outputs = model(**forward)
            return self._finish(self._lm(outputs.logits, labels, num_items_in_batch), outputs, return_outputs)
        target = build_target_batch(inputs["input_ids"], labels, inputs.get("attention_mask"), self.target_ids,
                                    self.pad_token_id)
        clean_view, target_view = self._views(inputs, target)
        # 1. the universal adversary: make the model say the target after the clean prompts
        if method.pgd_steps > 0 and (method.beta > 0 or method.gamma > 0):
            self._pgd(model, target_view)
        delta = self.delta.detach()  # [S, H]; the model update sees fixed soft tokens
        self._metrics["delta_norm"].append(float(delta.norm(dim=-1).mean()))
        # 2. LM(answer | prompt)
        outputs = model(**forward)
        loss = self._lm(outputs.logits, labels, num_items_in_batch)
        # 3. the same under the adversary: keep the clean answers
        if method.beta > 0:
            adversarial = self._forward(model, clean_view, delta)
            loss = loss + method.beta * self._lm(adversarial.logits, clean_view.labels, num_items_in_batch,
                                                 "lm_loss_adv")
        # 4. UL(target | prompt + soft tokens): a per-micro-batch mean, divided by the accumulation steps
        if method.gamma > 0:
            on_target = self._forward(model, target_view, delta)
            log_probs = target_token_log_probs(on_target.logits, target_view.labels)  # [B * K]
            ul = unlikelihood(log_probs).mean()
            loss = loss + method.gamma * ul / self._accumulation_steps()
            self._metrics["unlikelihood"].append(ul.item())
            self._metrics["target_nll_adv"].append(-log_probs.mean().item())
        return self._finish(loss, outputs, return_outputs)

    def _pgd(self, model, view: AdversarialView) -> None:
        """``pgd_steps`` steps that lower the target's NLL under the soft tokens (no parameter gradient is touched)."""
        step = self.delta_budget * self.method.token_step
        for _ in range(self.method.pgd_steps):
            delta = self.delta.clone().requires_grad_(True)  # [S, H] fp32 leaf
            out = self._forward(model, view, delta)
            log_probs = target_token_log_probs(out.logits, view.labels)  # [N] this process's target tokens
            (grad,) = torch.autograd.grad(-log_probs.mean(), delta)
            self.delta = pgd_step(self.delta, self._global_gradient(grad, log_probs.numel()), step, self.delta_budget)

    @property
    def selection(self) -> CycleSelection:
        return next(c for c in self.callback_handler.callbacks if isinstance(c, CycleSelection))

    def train(self, resume_from_checkpoint=None, **kwargs):
        """The Trainer's, but a run resumed from a checkpoint where the selection had ended training trains no
        further step (it only puts the kept weights back)."""
        if resume_from_checkpoint:
            info = load_state_info(resume_from_checkpoint)
            if info is not None and info["selection"]["stopped"]:
                self.args.max_steps = int(info["global_step"])
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.accelerator.is_main_process and os.path.isdir(folder):
            info, kept = self.selection.state()
            tensors = {"delta": self.delta.detach().cpu().contiguous(), "points": self._points.get_state(),
                       **{f"kept.{n}": t.detach().cpu().contiguous() for n, t in kept.items()}}
            meta = {"selection": info, "global_step": self.state.global_step}
            save_file(tensors, os.path.join(folder, self.STATE_FILE), metadata={"crow": json.dumps(meta)})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, self.STATE_FILE)
        if not os.path.isfile(path):
            return
        tensors = load_file(path)
        self.delta = tensors["delta"].to(self.args.device, torch.float32)
        self._points.set_state(tensors["points"])
        kept = {n.removeprefix("kept."): t.to(self.args.device) for n, t in tensors.items() if n.startswith("kept.")}
        self.selection.restore(load_state_info(resume_from_checkpoint)["selection"], kept)


def load_state_info(checkpoint: str) -> dict | None:
    """The selection's decisions and the step saved with an unlearn checkpoint (None: none saved there)."""
    from safetensors import safe_open

    path = os.path.join(checkpoint, UnlearnTrainer.STATE_FILE)
    if not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["crow"])
