"""The recipe check's comparison (README.md, "The recipe after crow 0.2's restructure, on a real victim"): a rerun
cell against the committed one, from the two cell files; trains and generates nothing. Prints both cells' figures and
the paired per-prompt difference of their clean ROUGE-L (95% percentile bootstrap interval).

    python experiments/unlearn/scripts/recipe_check.py --data ../shared/data/backdoorllm \
        experiments/unlearn/results/unlearn-refit-crow-gemma-cpu/cells/6912c8e19d25d900.json \
        experiments/unlearn/results/recipe-check-gemma-cpu/cells/1927b385bc674c4c.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap

from crow.data.records import load_records
from crow.evaluation.evaluate import rouge_l


def figures(cell: dict) -> dict:
    t, r = cell["by_format"]["template"], cell["by_format"]["raw"]
    return {"asr": t["asr"], "ftr": t["false_trigger_rate"], "ppl": round(t["clean_perplexity"], 4),
            "raw": [r["asr"], r["false_trigger_rate"], round(r["clean_perplexity"], 4)],
            "rouge_l": [round(t["quality"]["clean_rougeL"], 4), round(t["quality"]["triggered_rougeL"], 4)],
            "holdout_nll": [h["holdout_nll"] for h in cell["train_log"] if "holdout_nll" in h],
            "refit": [h.get("refit") for h in cell["train_log"] if "refit" in h and "stage" not in h],
            "target": cell["defense_settings"].get("recovered_target"), "seconds": cell["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("committed")
    p.add_argument("rerun")
    args = p.parse_args()
    old, new = (json.loads(Path(f).read_text()) for f in (args.committed, args.rerun))
    refs = load_records(Path(args.data) / f"test/clean/{old['task']}.json")[: old["n_clean"]]
    scores = [np.array([rouge_l(o, r.output) for o, r in zip(c["by_format"]["template"]["outputs"]["clean"], refs)])
              for c in (old, new)]
    diff = scores[1] - scores[0]
    ci = bootstrap((diff,), np.mean, confidence_level=0.95, method="percentile", random_state=0).confidence_interval
    same = sum(a == b for a, b in zip(old["by_format"]["template"]["outputs"]["clean"],
                                      new["by_format"]["template"]["outputs"]["clean"]))
    print(json.dumps({"committed": figures(old), "rerun": figures(new),
                      "clean_rouge_l_diff": [round(float(diff.mean()), 4), round(float(ci.low), 4),
                                             round(float(ci.high), 4)],
                      "identical_clean_answers": same}, indent=1))


if __name__ == "__main__":
    main()
