"""Runs at the tag v0.1.0 (`git checkout v0.1.0`): it uses options crow 0.2 retired.

Does PGD on inserted soft tokens elicit a recovered target? A probe with only the defender's knowledge.

``unlearn --adversary tokens`` inserts S soft tokens into each clean prompt and moves them by normalized-gradient
PGD to make the model say the target BAIT recovered. Its first run (zero start, steps of half the budget) never
elicited the target on the development victim. This script measures, on that victim, with the model frozen, the
target's mean NLL after the clean prompts of the first ``--samples`` clean samples (6 soft tokens inserted at one
random point per prompt, as the trainer does) for each start (``zeros``: SANDE's; ``prompt``: the embeddings of
tokens drawn from the clean prompts) and step (a fraction of the budget, 1x the mean prompt-token embedding norm),
over ``--steps`` PGD steps. The target text is read from a committed unlearn cell (``unlearned_text``: what BAIT
recovered, not the attack's target). No trigger, no triggered prompt, no ASR. Prints one JSON object.

    python experiments/unlearn/scripts/soft_token_probe.py --victim experiments/backdoorllm-table/results/backdoorllm-cpu/victims/5b4509d2ea879dc6 \
        --cell experiments/unlearn/results/unlearn-tokens-dev-cpu --data ../shared/data/backdoorllm/clean/consistency_data.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--victim", required=True, help="a committed victim directory (victim.json + adapter/)")
    p.add_argument("--cell", required=True, help="a bench folder with one unlearn cell (its unlearned_text is used)")
    p.add_argument("--data", required=True, help="the clean samples (consistency_data.json)")
    p.add_argument("--model", default="smollm2-135m-gguf")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--soft-tokens", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from crow.unlearn import (
        build_target_batch,
        insert_slots,
        pgd_step,
        project_to_ball,
        prompt_mask,
        random_insert_points,
        target_token_log_probs,
    )

    from crow.data.records import load_records
    from crow.data.templates import Collator, encode_for_training
    from crow.modeling import replace_embeddings
    from crow.models import load_model

    cells = sorted(Path(args.cell, "cells").glob("*.json"))
    text = json.loads(cells[0].read_text())["defense_settings"]["unlearned_text"]
    loaded = load_model(args.model, adapter=str(Path(args.victim, "adapter")))
    model, tok = loaded.model.eval(), loaded.tokenizer
    for param in model.parameters():
        param.requires_grad_(False)
    samples = encode_for_training(load_records(args.data)[: args.samples], tok, max_length=128)
    batch = Collator(tok.pad_token_id)([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])
    target_ids = tok(text, add_special_tokens=False)["input_ids"][:8]
    target = build_target_batch(batch["input_ids"], batch["labels"], batch["attention_mask"], target_ids,
                                tok.pad_token_id)
    prompts = prompt_mask(batch["labels"], batch["attention_mask"])  # [B, T]
    points = random_insert_points(prompts.sum(1), torch.Generator().manual_seed(args.seed))
    slots = insert_slots(target["input_ids"], target["labels"], target["attention_mask"], points, args.soft_tokens,
                         tok.pad_token_id)
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        budget = embedding(batch["input_ids"])[prompts].norm(dim=-1).mean().item()

    def nll(soft: torch.Tensor) -> torch.Tensor:
        with replace_embeddings(embedding, soft, slots["slots"]):
            logits = model(input_ids=slots["input_ids"], attention_mask=slots["attention_mask"]).logits
        return -target_token_log_probs(logits, slots["labels"]).mean()

    with torch.no_grad():
        plain = model(input_ids=target["input_ids"], attention_mask=target["attention_mask"]).logits
        no_insertion = -target_token_log_probs(plain, target["labels"]).mean().item()
        pool = batch["input_ids"][prompts]
        pick = pool[torch.randint(len(pool), (args.soft_tokens,), generator=torch.Generator().manual_seed(args.seed))]
        starts = {"zeros": torch.zeros(args.soft_tokens, embedding.embedding_dim),
                  "prompt": project_to_ball(embedding(pick).float(), budget)}
    runs = []
    for start, soft0 in starts.items():
        for frac in (0.5, 0.1, 0.02):
            soft, trace = soft0.clone(), []
            for _ in range(args.steps):
                leaf = soft.clone().requires_grad_(True)
                value = nll(leaf)
                (grad,) = torch.autograd.grad(value, leaf)
                trace.append(round(value.item(), 3))
                soft = pgd_step(soft, grad, frac * budget, budget)
            with torch.no_grad():
                trace.append(round(nll(soft).item(), 3))
            runs.append({"start": start, "step": frac, "nll": trace})
    result = {"target": tok.decode(target_ids), "budget": round(budget, 4), "nll_without_insertion": round(no_insertion, 3),
              "runs": runs}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
