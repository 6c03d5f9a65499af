"""The backdoor's target, recovered from the suspect model and the clean samples by BAIT (``crow scan``), or given
(an oracle)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ...data.records import Record
from ...errors import CrowError

logger = logging.getLogger(__name__)

@dataclass
class RecoveredTarget:
    """The target text and its first tokens (the ones unlearned), and where it came from."""

    text: str  # the text recovered by the scan (or given)
    token_ids: list[int]  # its first ``target_tokens`` tokens (no special tokens)
    used_text: str  # those tokens decoded
    source: str  # "bait" (recovered) or "oracle" (given: not a defense of the threat model)
    scan_score: float | None = None  # BAIT's Q-score of the best candidate
    scan_verdict: str | None = None  # "backdoored" or "clean" (the defense runs either way)
    scan_seconds: float | None = None

    @property
    def oracle(self) -> bool:
        return self.source == "oracle"


def recover_target(model, tokenizer, records: Sequence[Record], *, template: str, target: str | None = None,
                   target_tokens: int = 8, scan_result=None) -> RecoveredTarget:
    """The target to unlearn: ``target`` when given (an oracle), else BAIT's recovered target on the defender's clean
    ``records``, or its best candidate when the verdict is clean (the defense runs anyway). ``scan_result``: BAIT's
    scan of this model on these ``records`` with this ``template``, already made (it is not run again)."""
    from ...detection.scan import scan

    found = {"source": "oracle"}
    if target is None:
        result = scan_result or scan(model, tokenizer, records, method="bait", template=template)
        target = result.target or (result.candidates[0].text if result.candidates else "")
        if not target.strip():
            raise CrowError("unlearn: BAIT recovered no target candidate from the clean samples; give target "
                            "explicitly (an oracle experiment) or check the data and template")
        logger.info("unlearn: BAIT verdict %s (Q %.3f), unlearning %r", result.verdict, result.score, target)
        found = {"source": "bait", "scan_score": result.score, "scan_verdict": result.verdict,
                 "scan_seconds": result.seconds}
    else:
        logger.warning("unlearn: an explicit target was given (%r): an oracle experiment, not a defense under the "
                       "threat model (a defender knows no target)", target)
    ids = tokenizer(target, add_special_tokens=False)["input_ids"][:target_tokens]
    if not ids:
        raise CrowError(f"unlearn: the target {target!r} has no tokens")
    return RecoveredTarget(text=target, token_ids=list(ids), used_text=tokenizer.decode(ids), **found)
