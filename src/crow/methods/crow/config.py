"""CrowConfig: CROW's settings (Min, Pham, Li, Sun, "CROW: Eliminating Backdoors from Large Language Models via Internal
Consistency Regularization", ICML 2025, arXiv 2411.12768) on top of the shared training recipe."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ...losses import parse_layer_range
from ...training.config import TrainingConfig, check, finite, option

logger = logging.getLogger(__name__)

#: the paper's alpha per target task: targeted refusal needs the stronger regularizer (Sec. 5)
ALPHA_PRESETS: dict[str, float] = {"negsentiment": 5.5, "refusal": 11.0, "codeinjection": 5.5, "refusal-pool": 11.0}


@dataclass
class CrowConfig(TrainingConfig):
    """CROW: LM + alpha x the mean over consecutive layer pairs of 1 - cos(h_l, h_l+1), on input embeddings perturbed by
    one FGSM step of epsilon; the recipe's defaults are the official ones."""

    alpha: float = option(5.5, "Weight of the consistency term (paper: 5.5; 11 for targeted refusal, which a task's "
                               "preset picks). 0: plain finetuning.")
    epsilon: float = option(0.1, "FGSM step on the input embeddings, e + epsilon x sign(grad) (paper: 0.1). 0 "
                                 "regularizes the clean hidden states only.")
    layers: str = option("official", "Layer pairs of the consistency term: 'official' (hidden_states[1:-2] vs [2:-1], "
                                     "as the paper's code), 'all' (every consecutive pair) or 'START:STOP'.")
    token_scope: str = option("all", "Positions averaged: 'all' (official, padding included) or 'masked' (real tokens "
                                     "only).", choices=("all", "masked"))

    def validate(self) -> None:
        check(finite(self.alpha), "alpha", "a finite number >= 0 (paper: 5.5, 11 for refusal)", self.alpha)
        check(finite(self.epsilon), "epsilon", "a finite number >= 0 (paper: 0.1)", self.epsilon)
        check(self.token_scope in ("all", "masked"), "token_scope", "'all' or 'masked'", self.token_scope)
        if self.layers not in ("official", "all"):
            parse_layer_range(self.layers)
        if self.epsilon > 1.0:
            logger.warning("epsilon=%s is far above the paper's 0.1: the perturbation may swamp the embeddings",
                           self.epsilon)

    def input_grad_user(self) -> str | None:
        return "CROW needs for its perturbation" if self.alpha > 0 and self.epsilon > 0 else None
