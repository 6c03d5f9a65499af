"""How long unlearn trains, from the defender's own data: a held-out split, warm-restart cycles (SGDR, Loshchilov &
Hutter, ICLR 2017), the refit decision and early stopping at the best annealed cycle end (Goodfellow et al., Deep
Learning, 2016, Sec. 7.8)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from ...errors import CrowError

logger = logging.getLogger(__name__)


def holdout_split(n: int, k: int, seed: int) -> tuple[list[int], list[int]]:
    """``k`` of ``n`` sample indices drawn with ``seed``: (training, held out), each sorted; one stays for training."""
    if not 0 <= k < n:
        raise CrowError(f"holdout={k} must leave training samples: there are {n} clean samples; hold out fewer (e.g. "
                        "a fifth)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(order[k:]), sorted(order[:k])


def cyclic_schedule(one_cycle: Callable[[int], float], cycle_steps: int) -> Callable[[int], float]:
    """A learning-rate multiplier that restarts ``one_cycle`` (step -> multiplier) every ``cycle_steps`` steps."""
    if cycle_steps < 1:
        raise CrowError(f"a learning-rate cycle needs at least one step, got {cycle_steps}")
    return lambda step: one_cycle(step % cycle_steps)


def cyclic_lr_scheduler(args, optimizer, num_training_steps: int, cycle_epochs: int):
    """A ``LambdaLR``: ``args.lr_scheduler_type`` with its warm-up over one cycle of ``cycle_epochs``, restarted."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    cycle_steps = round(num_training_steps * cycle_epochs / args.num_train_epochs)
    one = get_scheduler(args.lr_scheduler_type, optimizer=torch.optim.SGD([torch.zeros(1)], lr=1.0),
                        num_warmup_steps=args.get_warmup_steps(cycle_steps), num_training_steps=cycle_steps,
                        scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    if not isinstance(one, LambdaLR) or len(one.lr_lambdas) != 1:
        raise CrowError(f"cycles need a step-wise scheduler (cosine, linear, ...), got {args.lr_scheduler_type!r}")
    return LambdaLR(optimizer, cyclic_schedule(one.lr_lambdas[0], cycle_steps))


def holdout_gain(suspect_nll: float, nll: float) -> float:
    """exp(NLL_suspect - NLL) - 1 from mean NLLs per answer token (0.15: the suspect's perplexity is 15% above)."""
    return math.exp(suspect_nll - nll) - 1.0


@dataclass
class Kept:
    """The best cycle end so far: its held-out NLL, its epoch and a copy of the trainable weights."""

    nll: float
    epoch: float
    weights: dict[str, torch.Tensor]


def trainable_weights(model) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s trainable parameters (name -> tensor)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class CycleSelection(TrainerCallback):
    """The schedule's decisions for an ``UnlearnTrainer``: ``holdout_nll`` before training and after every epoch; after
    the unlearning cycle, a refit (stop there) when the held-out perplexity fell below the suspect's by more than
    ``refit_gain`` (``holdout_gain``, ``refit``), else finetuning cycles until one does not improve the held-out NLL;
    the best cycle end's weights put back at the end (``selected_epoch``). An epoch is scored in the step that ends it,
    before that step's checkpoint is saved, and the selection travels with every checkpoint (``state``/``restore``):
    a resumed run decides as the uninterrupted one."""

    def __init__(self, trainer, measure: Callable[[], float]) -> None:
        self.trainer, self.measure = trainer, measure
        self.suspect_nll: float | None = None
        self.kept: Kept | None = None
        self.refit = False
        self.stopped = False  # the selection ended training (a resumed run then trains no further step)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # the suspect's held-out NLL; a resumed run restored it with the rest
            self._score(state)

    def on_step_end(self, args, state, control, **kwargs):
        epoch = float(state.epoch or 0.0)
        if epoch > 0 and abs(epoch - round(epoch)) < 1e-6 and self._score(state):  # this step ends an epoch
            self.stopped = control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.kept is None:
            return
        with torch.no_grad():
            for name, p in self.trainer.model.named_parameters():
                if name in self.kept.weights:
                    p.copy_(self.kept.weights[name])
        state.log_history.append({"epoch": round(float(state.epoch or 0.0), 4), "step": state.global_step,
                                  "selected_epoch": self.kept.epoch, "selected_holdout_nll": round(self.kept.nll, 6)})
        logger.info("unlearn: kept the weights of epoch %g (held-out NLL %.4f)", self.kept.epoch, self.kept.nll)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(the decisions so far, the kept weights) for a checkpoint."""
        info = {"suspect_nll": self.suspect_nll, "refit": self.refit, "stopped": self.stopped,
                "finetuning": bool(self.trainer.finetuning),
                "kept": None if self.kept is None else {"nll": self.kept.nll, "epoch": self.kept.epoch}}
        return info, ({} if self.kept is None else dict(self.kept.weights))

    def restore(self, info: dict, weights: dict[str, torch.Tensor]) -> None:
        """Take back what ``state`` saved (a resumed run)."""
        self.suspect_nll, self.refit, self.stopped = info["suspect_nll"], info["refit"], info["stopped"]
        self.trainer.finetuning = info["finetuning"]
        kept = info["kept"]
        self.kept = None if kept is None else Kept(kept["nll"], kept["epoch"], weights)

    def _score(self, state) -> bool:
        """Measure and log the held-out NLL; keep the weights of a best cycle end. True: stop training."""
        nll, epoch = self.measure(), round(float(state.epoch or 0.0), 4)
        if state.global_step == 0:
            self.suspect_nll = nll
        cycles = epoch / self.trainer.method.cycle_epochs
        end = epoch > 0 and abs(cycles - round(cycles)) < 1e-6
        entry = {"epoch": epoch, "step": state.global_step, "holdout_nll": round(nll, 6)}
        if end and self.kept is None:
            self.refit = self._decide(nll, entry)
        state.log_history.append(entry)
        logger.info("unlearn: epoch %g, held-out NLL %.4f (%d samples)%s", epoch, nll,
                    len(self.trainer.holdout_rows), "" if end else ", not a cycle end")
        if not end:
            return False
        self.trainer.finetuning = True  # the cycles after the unlearning one train the LM term alone
        if self.kept is None or nll < self.kept.nll:
            self.kept = Kept(nll, epoch, trainable_weights(self.trainer.model))
            return self.refit  # the refit replaces the finetuning cycles: stop here
        return True  # a cycle that did not improve the held-out answers: stop

    def _decide(self, nll: float, entry: dict) -> bool:
        """At the end of the unlearning cycle: refit when its held-out perplexity is below the suspect's by more than
        ``refit_gain`` (and the refit has epochs). Records ``holdout_gain`` and ``refit`` in ``entry``."""
        method = self.trainer.method
        if self.suspect_nll is None or not method.refit_epochs:
            if self.suspect_nll is None:
                logger.warning("unlearn: the suspect's held-out NLL was not measured (a resumed run): no refit")
            entry["refit"] = False
            return False
        gain = holdout_gain(self.suspect_nll, nll)
        entry["holdout_gain"], entry["refit"] = round(gain, 6), gain > method.refit_gain
        logger.info("unlearn: the unlearning cycle changed the held-out perplexity by %+.1f%%: %s",
                    -100 * gain / (1 + gain),
                    "CROW on every clean sample" if entry["refit"] else "finetuning cycles on the training split")
        return entry["refit"]
