"""Target-inverted adversarial unlearning, crow's recommended recipe: BAIT recovers the backdoor's target (``target``),
soft tokens in the clean prompts stand in for the trigger while it is unlearned (``adversary``, ``trainer``), held-out
cycles decide how long to train (``schedule``) and CROW may refit the weights on every clean sample (``recipe`` runs
the stages)."""

from .config import UnlearnConfig
from .recipe import RecoveredTarget, UnlearnResult, recover_target, run

__all__ = ["RecoveredTarget", "UnlearnConfig", "UnlearnResult", "recover_target", "run"]
