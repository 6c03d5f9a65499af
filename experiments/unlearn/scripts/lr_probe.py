"""A step-size probe for unlearn, measured and not kept: could the learning rate be chosen from the defender's held-out
clean samples instead of by model family? Each candidate learning rate finetunes the suspect on the training split
(the LM loss alone, PROBE_EPOCHS or --probe-epochs), the held-out samples' answer NLL is measured, the weights are put
back; the candidate with the lowest held-out NLL would be chosen. Run on committed victims, nothing else trained:
README.md, "A learning rate from the held-out samples".

    python experiments/unlearn/scripts/lr_probe.py --data ../shared/data/backdoorllm --out FILE.json \
        --victims experiments/backdoorllm-table/results/backdoorllm-cpu/victims/5b4509d2ea879dc6 ... [--merged] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crow.data.records import Record, load_records
from crow.methods.crow.trainer import CrowTrainer
from crow.methods.unlearn.config import UnlearnConfig
from crow.methods.unlearn.schedule import holdout_split, trainable_weights
from crow.models import load_model
from crow.training.loop import RunOptions, is_peft_model, merged, train

logger = logging.getLogger(__name__)
LR_CANDIDATES = (1e-3, 2e-4)  # the learning rates unlearn was measured at: SmolLM2-135M, Gemma-3-270M
PROBE_EPOCHS = 1.0


@dataclass
class StepSizeChoice:
    """The chosen learning rate and the evidence: the suspect's held-out NLL and each candidate's after its probe."""

    learning_rate: float
    suspect_nll: float
    holdout_nll: dict[float, float]  # candidate learning rate -> held-out NLL per answer token after the probe
    probe_epochs: float
    seconds: float

    def to_dict(self) -> dict:
        return {"learning_rate": self.learning_rate, "suspect_holdout_nll": round(self.suspect_nll, 6),
                "holdout_nll": {f"{lr:g}": round(nll, 6) for lr, nll in self.holdout_nll.items()},
                "probe_epochs": self.probe_epochs, "seconds": self.seconds}


def pick_learning_rate(holdout_nll: dict[float, float]) -> float:
    """The candidate with the lowest held-out NLL; a tie (within 1e-6) goes to the larger learning rate."""
    best = min(holdout_nll.values())
    return max(lr for lr, nll in holdout_nll.items() if nll <= best + 1e-6)


def answer_nll(model, tokenizer, records: Sequence[Record], *, template: str, max_length: int) -> float:
    """Mean NLL per answer token of the records' reference answers (the log of crow's clean perplexity)."""
    from crow.evaluation.evaluate import perplexity
    return math.log(perplexity(model, tokenizer, records, template=template, max_length=max_length))


def probe_config(config: UnlearnConfig, learning_rate: float, epochs: float = PROBE_EPOCHS):
    """Plain finetuning (CROW's config with alpha 0) at ``learning_rate`` for ``epochs``, the recipe's batch,
    schedule, seed and adapter settings."""
    from crow.methods.crow.config import CrowConfig
    from crow.training.config import TrainingConfig
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainingConfig)
              if f.name not in ("epochs", "learning_rate", "logging_steps")}
    return CrowConfig(**shared, learning_rate=learning_rate, epochs=epochs, alpha=0.0,
                      logging_steps=10_000)


def choose_learning_rate(model, tokenizer, records: Sequence[Record], config: UnlearnConfig,
                         run: RunOptions, candidates: Sequence[float] = LR_CANDIDATES, epochs: float = PROBE_EPOCHS):
    """(the model, as given, and the ``StepSizeChoice``): each candidate probed from the suspect's weights."""
    started = time.perf_counter()
    keep, held = holdout_split(len(records), config.holdout, config.seed)
    training, heldout = [records[i] for i in keep], [records[i] for i in held]
    measure = dict(template=run.template, max_length=run.max_length)
    suspect_nll = answer_nll(model, tokenizer, heldout, **measure)
    had_adapter = is_peft_model(model)
    nlls: dict[float, float] = {}
    with tempfile.TemporaryDirectory(prefix="crow-lr-probe-") as work:
        for lr in candidates:
            before = trainable_weights(model) if had_adapter else all_weights(model) if config.full_finetune else None
            probe = RunOptions(output_dir=work, template=run.template, max_length=run.max_length, progress=False)
            probed = train(model, tokenizer, training, probe_config(config, lr, epochs), CrowTrainer, probe).model
            nlls[lr] = answer_nll(probed, tokenizer, heldout, **measure)
            model = restore(probed, before)
            logger.info("unlearn: step-size probe at lr %g: held-out NLL %.4f (suspect %.4f)", lr, nlls[lr],
                        suspect_nll)
    choice = StepSizeChoice(pick_learning_rate(nlls), suspect_nll, nlls, epochs,
                            round(time.perf_counter() - started, 2))
    logger.info("unlearn: learning rate %g, chosen on %d held-out samples", choice.learning_rate, len(heldout))
    return model, choice


def all_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def restore(model, weights: dict | None):
    """The suspect back: its adapter's weights copied in, or the probe's new adapter removed."""
    import torch
    if weights is None:
        return model.unload()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in weights:
                p.copy_(weights[name])
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the BackdoorLLM subset (crow data fetch backdoorllm)")
    p.add_argument("--victims", nargs="+", required=True, help="committed victim directories (victim.json, adapter/)")
    p.add_argument("--merged", action="store_true", help="merge each victim's adapter into the weights first")
    p.add_argument("--seed", type=int, default=0, help="the cell's seed (crow bench's defenses train with it)")
    p.add_argument("--probe-epochs", type=float, nargs="+", default=[1.0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records = load_records(Path(args.data) / "clean/consistency_data.json")[:100]
    rows = []
    for victim in args.victims:
        info = json.loads((Path(victim) / "victim.json").read_text())
        for epochs in args.probe_epochs:
            loaded = load_model(info["model"], adapter=str(Path(victim) / "adapter"), adapter_trainable=True)
            model = merged(loaded.model) if args.merged else loaded.model
            config = UnlearnConfig(seed=args.seed)
            started = time.perf_counter()
            _, choice = choose_learning_rate(model, loaded.tokenizer, records, config,
                                             RunOptions(template="alpaca", max_length=128, progress=False), epochs=epochs)
            rows.append({"victim": info["key"], "model": info["model"], "task": info["task"],
                         "attack": info["attack"], "form": "merged" if args.merged else "adapter",
                         **choice.to_dict(), "wall_seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
