"""Record, once, the resolved config of every committed bench cell whose settings crow 0.2 still runs.

crow 0.1 named a cell by the hash of its spec's settings as written; crow 0.2 names it by the hash of its fully
resolved settings (``crow.bench.keys.cell_config``), so a changed default makes a new cell. The committed cells keep
their file names; this script adds to each one the ``"config"`` a crow 0.2 run computes for the same cell, so that
``crow bench`` finds it instead of running it again. The config is rebuilt from what the cell recorded at the time
(``defense_settings``: the defense's every setting, then), mapped to crow 0.2's names, and resolved by crow 0.2's own
code (``get_defense(...).settings(task, seed)``). Cells of options crow 0.2 retired get no config (their folder's
report still rebuilds, by their old key): unlearn with the residual adversary, the KL retain terms, ROUGE-L selection,
the refit before or towards a teacher, no held-out cycles, or BAIT's entropy stop rule.

    python experiments/migrate_cells.py            # writes "config" into the cells that lack it
    python experiments/migrate_cells.py --check    # exit 1 when a cell's recorded config is not what it should be
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crow.bench.keys import cell_config
from crow.bench.spec import load_spec
from crow.defenses import get_defense
from crow.errors import CrowError
from crow.outputs import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("learning_rate", "epochs", "batch_size", "grad_accum", "full_finetune")
CROW = ("alpha", "epsilon", "layers", "token_scope")
UNLEARN = ("soft_tokens", "token_radius", "token_step", "pgd_steps", "beta", "gamma", "target_tokens", "holdout",
           "cycle_epochs", "refit_epochs", "refit_alpha", "target")
#: unlearn's recorded settings that crow 0.2 runs as it is: the value each must have had (None: the field did not
#: exist yet, and its default then was this behaviour's only where it is listed as None here)
UNLEARN_KEPT = {"adversary": ("tokens",), "token_init": ("prompt",), "retain": ("references",),
                "finetune_cycles": (True,), "select_by": ("nll", None), "refit_order": ("after", None),
                "refit_teacher": (False, None), "teacher_only": (False, None), "scan_stop_rule": ("official",)}


def crow_settings(method: str, recorded: dict) -> dict | None:
    """The crow 0.2 settings of a cell recorded by crow 0.1 (as a spec would write them), None when 0.2 cannot run it."""
    if method in ("none", "quantize", "quantize-nf4"):
        return {}
    if method in ("prune-wanda", "prune-magnitude"):
        return {"sparsity": recorded["sparsity"]}
    if method == "fineprune":
        return {k: recorded[k] for k in ("prune_ratio", "layer_fraction", "learning_rate", "epochs")}
    if method in ("crow", "finetune", "finetune-lr1e-3", "reinit-adapter"):
        out = {k: recorded[k] for k in TRAINING + CROW if recorded.get(k) is not None}
    elif method == "unlearn":
        if any(recorded.get(k) not in allowed for k, allowed in UNLEARN_KEPT.items()) or not recorded.get("holdout"):
            return None
        out = {k: recorded[k] for k in TRAINING + UNLEARN if recorded.get(k) is not None}
        out["refit_gain"] = recorded.get("refit_gain") or 0.15
        if not recorded.get("refit_gain"):
            out["refit_epochs"] = 0  # crow 0.1's refit_gain 0: never refit
    else:
        return None
    if recorded.get("seed") is not None:
        out["seed"] = recorded["seed"]
    return out


def resolved_config(spec, cell: dict) -> dict | None:
    settings = crow_settings(cell["method"], cell.get("defense_settings") or {})
    if settings is None:
        return None
    try:
        resolved = get_defense(cell["method"], **settings).settings(cell["task"], cell["seed"])
    except CrowError:
        return None
    planned = {"method": cell["method"], "settings": resolved, "n_defense": cell.get("n_defense") or spec.n_defense}
    return cell_config(spec, planned, cell["victim_key"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check the recorded configs; write nothing")
    args = parser.parse_args()
    written, skipped, wrong = 0, 0, []
    for results in sorted(ROOT.glob("experiments/*/results/*/results.json")):
        spec = load_spec(None, base=json.loads(results.read_text())["spec"])
        for path in sorted((results.parent / "cells").glob("*.json")):
            cell = json.loads(path.read_text(encoding="utf-8"))
            if cell.get("reference"):
                continue  # a reference cell's key is what it was
            config = resolved_config(spec, cell)
            if config is None:
                skipped += 1
            elif args.check:
                if cell.get("config") != config:
                    wrong.append(str(path.relative_to(ROOT)))
            elif cell.get("config") is None:
                write_json_atomic(path, {**cell, "config": config})
                written += 1
    print(f"{written} cells given their resolved config, {skipped} of retired settings left as they are"
          + (f"; {len(wrong)} differ: {wrong[:5]}" if wrong else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
