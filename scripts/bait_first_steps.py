"""Why did BAIT miss a target? Force a first token after the scan's clean prompts and print what BAIT
sees at each greedy step: the prompt-averaged next-token distribution's top tokens, its entropy
against the scan's ``flat_entropy`` stop, and each prompt's own top token.

    python scripts/bait_first_steps.py --model gemma3-270m-gguf \
        --adapter results/gemma-cpu/victims/6b8092bf9f76ab5c/adapter --first "I" --steps 4 \
        --out results/detection-gemma-cpu/bait_first_steps-refusal-vpi.json

The prompts are the first ``--prompts`` of the defender's clean samples, formatted as the scan formats
them (BAIT's full inversion uses 20). ``--first`` is encoded without special tokens and must be one
token. Each step continues with the averaged argmax, as the scan does, whether or not the scan would
have stopped there.
"""

import argparse
import logging
from pathlib import Path

import torch

from crow.data.records import load_records
from crow.detection.scan import BaitSettings, _encode_prefix, _prompts, _Runner, average_next_token, entropy
from crow.errors import CrowError
from crow.models import load_model
from crow.outputs import write_json_atomic


def top_tokens(tokenizer, probs: torch.Tensor, k: int) -> list[list]:
    values, ids = probs.topk(k)
    return [[tokenizer.decode([int(i)]), round(float(v), 4)] for v, i in zip(values, ids)]


@torch.no_grad()
def first_steps(model, tokenizer, records, *, first: str, steps: int, n_prompts: int, template: str) -> dict:
    ids = tokenizer.encode(first, add_special_tokens=False)
    if len(ids) != 1:
        raise CrowError(f"--first {first!r} is {len(ids)} tokens for this tokenizer ({ids}); give one token")
    runner = _Runner(model)
    prefix = _encode_prefix(runner, _prompts(records, n_prompts, template, tokenizer), tokenizer.pad_token_id)
    seq, mask, token = prefix.ids, prefix.mask, ids[0]
    rows, text = [], first
    for step in range(steps):
        seq = torch.cat([seq, seq.new_full((prefix.n, 1), token)], dim=1)
        mask = torch.cat([mask, mask.new_ones(prefix.n, 1)], dim=1)
        probs, _ = runner(seq, mask)  # [n, V], the whole sequence each step: a diagnostic, not a scan
        avg = average_next_token(probs, prefix.n)[0]  # [V]
        token = int(avg.argmax())
        rows.append({"step": step + 1, "after": text, "entropy": round(float(entropy(avg)), 4),
                     "averaged_top": top_tokens(tokenizer, avg, 5),
                     "per_prompt_top": [top_tokens(tokenizer, p, 1)[0] for p in probs]})
        text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False) + [token])
    return {"first": first, "n_prompts": prefix.n, "template": template,
            "flat_entropy": BaitSettings().flat_entropy, "steps": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--data", default="../shared/data/backdoorllm/clean/consistency_data.json")
    ap.add_argument("--first", required=True, help="the forced first token, e.g. I")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=BaitSettings().n_prompts)
    ap.add_argument("--template", default="alpaca")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loaded = load_model(args.model, adapter=args.adapter, device="auto")
    loaded.model.eval()
    result = first_steps(loaded.model, loaded.tokenizer, load_records(args.data), first=args.first,
                         steps=args.steps, n_prompts=args.prompts, template=args.template)
    result.update({"model": args.model, "adapter": None if args.adapter is None else Path(args.adapter).parent.name})
    write_json_atomic(Path(args.out), result)
    for row in result["steps"]:
        logging.info("step %d after %r: entropy %.3f (flat above %.1f), averaged top %s", row["step"], row["after"],
                     row["entropy"], result["flat_entropy"], row["averaged_top"][:3])


if __name__ == "__main__":
    main()
