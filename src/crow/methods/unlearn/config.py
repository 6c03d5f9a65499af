"""UnlearnConfig: target-inverted adversarial unlearning, the recommended recipe, on top of the shared training recipe.
Its defaults are the recipe measured on every committed victim (experiments/unlearn)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ...training.config import TrainingConfig, check, finite, option, whole
from ..crow.config import CrowConfig


@dataclass
class UnlearnConfig(TrainingConfig):
    """Target-inverted adversarial unlearning (``crow.methods.unlearn``): the loss LM(clean) + beta x LM(clean | soft
    tokens) + gamma x UL(target | soft tokens), in held-out cycles, then a refit by CROW."""

    epochs: float = option(6.0, "Epochs at most: the unlearning cycle and the finetuning cycles that follow it (a "
                                "multiple of cycle_epochs).")
    soft_tokens: int = option(6, "Soft tokens inserted at a random point of every clean prompt (SANDE, Li et al. 2024, "
                                 "assumes 6; a trigger word is 3-4 tokens in Llama / Gemma tokenizers).")
    token_radius: float = option(1.0, "Each soft token's L2 norm at most this times the mean embedding norm of the "
                                      "clean prompts' tokens.")
    token_step: float = option(0.1, "PGD step, a fraction of a soft token's budget (larger steps overshoot in the "
                                    "embedding space).")
    pgd_steps: int = option(2, "Normalized-gradient PGD steps on the soft tokens per micro-step (BEEAR, Zeng et al. "
                               "2024, runs a few inner steps).")
    beta: float = option(1.0, "Weight of LM(clean answer | prompt with the soft tokens): keep the clean answers under "
                              "the adversary.")
    gamma: float = option(1.0, "Weight of the target's unlikelihood under the soft tokens (Welleck et al., ICLR 2020).")
    target_tokens: int = option(8, "How many of the target's first tokens are unlearned (a backdoor decides in its "
                                   "first answer tokens).")
    holdout: int = option(20, "Clean samples held out of training: their answers' NLL decides the refit and which "
                              "cycle's weights are kept.")
    cycle_epochs: int = option(2, "Epochs of a cycle: the schedule restarts every cycle (SGDR, Loshchilov & Hutter "
                                  "2017); the first cycle unlearns, the next ones finetune while the held-out NLL "
                                  "improves.")
    refit_gain: float = option(0.15, "Refit when the unlearning cycle lowered the held-out perplexity below the "
                                     "suspect's by more than this fraction: the suspect's clean answers were far from "
                                     "the clean samples', and finetuning on all of them is what improves them.")
    refit_epochs: float = option(5.0, "Epochs of the refit on every clean sample (0: never refit).")
    refit_alpha: float = option(5.5, "CROW's consistency weight in the refit (Min et al. 2025; 0: plain finetuning).")
    target: str | None = option(None, "The target text to unlearn instead of BAIT's: an oracle experiment, not a "
                                      "defense (a defender knows no target).")

    def validate(self) -> None:
        check(whole(self.soft_tokens, 1), "soft_tokens", "an integer >= 1", self.soft_tokens, 6)
        check(finite(self.token_radius, strict=True), "token_radius", "a number > 0", self.token_radius, 1.0)
        check(finite(self.token_step, strict=True) and self.token_step <= 1, "token_step", "a number in (0, 1]",
              self.token_step, 0.1)
        check(whole(self.pgd_steps), "pgd_steps", "an integer >= 0", self.pgd_steps, 2)
        check(finite(self.beta), "beta", "a number >= 0", self.beta, 1.0)
        check(finite(self.gamma), "gamma", "a number >= 0", self.gamma, 1.0)
        check(whole(self.target_tokens, 1), "target_tokens", "an integer >= 1", self.target_tokens, 8)
        check(whole(self.holdout, 1), "holdout", "an integer >= 1 (clean samples held out)", self.holdout, 20)
        check(whole(self.cycle_epochs, 1), "cycle_epochs", "an integer >= 1", self.cycle_epochs, 2)
        check(self.max_steps == -1, "max_steps", "unset (-1): unlearn trains whole cycles", self.max_steps)
        check(self.epochs % self.cycle_epochs == 0, "epochs",
              f"a multiple of cycle_epochs={self.cycle_epochs}: every cycle ends annealed", self.epochs)
        check(finite(self.refit_gain), "refit_gain", "a number >= 0", self.refit_gain, 0.15)
        check(finite(self.refit_epochs), "refit_epochs", "a number >= 0 (0: never refit)", self.refit_epochs, 5.0)
        check(finite(self.refit_alpha), "refit_alpha", "a number >= 0", self.refit_alpha, 5.5)
        check(self.target is None or bool(str(self.target).strip()), "target",
              "a non-empty text, or unset (recovered by BAIT)", self.target)

    def input_grad_user(self) -> str | None:
        return "unlearn needs for its soft tokens" if self.pgd_steps > 0 else None

    def refit_config(self) -> CrowConfig:
        """CROW with ``refit_alpha`` for ``refit_epochs`` (its own epsilon and layers), the rest of the recipe alike."""
        shared = {f.name: getattr(self, f.name) for f in fields(TrainingConfig) if f.name != "epochs"}
        return CrowConfig(**shared, epochs=self.refit_epochs, alpha=self.refit_alpha)
