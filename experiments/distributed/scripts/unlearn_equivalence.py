"""``crow purify --method unlearn`` in 2 processes (accelerate launch, gloo DDP on CPU) against 1 process over the same
global batch: the largest difference between the two adapters' weights and between their held-out NLLs.

Each case trains the tiny model of the tests (4-layer Llama, hidden 32) on ``make_records(N)`` with the whole recipe:
BAIT's target (the main process scans), the unlearning cycle with the soft tokens' PGD and, with
``--refit-gain 0``, the CROW refit. 1 process runs ``--batch-size 2``, 2 processes ``--batch-size 1``, with the same
``--grad-accum``. The held-out NLL is the mean answer NLL of the samples unlearn holds out (log of crow's perplexity).

    python experiments/distributed/scripts/unlearn_equivalence.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the checkout: experiments/distributed/scripts/ is three below
CONFIG = ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"
#: (records, --epochs, --cycle-epochs, --grad-accum)
CASES = ((12, 2, 1, 1), (12, 2, 1, 2), (36, 4, 2, 1))


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def purify(model: Path, data: Path, out: Path, processes: int, case: tuple[int, int, int, int]) -> dict:
    _, epochs, cycle, accum = case
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    launcher = [sys.executable] if processes == 1 else [accelerate, "launch", "--config_file", str(CONFIG),
                                                        "--main_process_port", free_port()]
    args = ["-m", "crow.cli.main", "purify", "--model", str(model), "--data", str(data), "--out", str(out),
            "--method", "unlearn", "--holdout", "4", "--epochs", str(epochs), "--cycle-epochs", str(cycle),
            "--refit-epochs", "1", "--refit-gain", "0", "--max-length", "128", "--batch-size", str(2 // processes),
            "--grad-accum", str(accum), "--no-verify"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads((out / "crow_config.json").read_text())


def held_out_nll(model: Path, adapter: Path, records, seed: int) -> float:
    from crow.evaluation.evaluate import perplexity
    from crow.methods.unlearn.schedule import holdout_split
    from crow.models import load_model

    loaded = load_model(str(model), adapter=str(adapter))
    _, held = holdout_split(len(records), 4, seed)
    return math.log(perplexity(loaded.model, loaded.tokenizer, [records[i] for i in held], max_length=128))


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    sys.path.insert(0, str(ROOT))
    from safetensors.torch import load_file

    from crow.models import build_tiny_model
    from tests.conftest import corpus, make_records, write_json

    with tempfile.TemporaryDirectory(prefix="crow-unlearn-ddp-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "llama", corpus(), arch="llama", vocab_size=512, hidden_size=32, num_layers=4,
                                 num_heads=4, seed=0)
        for case in CASES:
            records = make_records(case[0])
            data = write_json(work / f"clean{case[0]}.json", [r.to_dict() for r in records])
            runs = {n: purify(model, data, work / f"out{n}", n, case) for n in (1, 2)}
            one, two = (load_file(work / f"out{n}" / "adapter_model.safetensors") for n in (1, 2))
            nll = {n: held_out_nll(model, work / f"out{n}", records, runs[n]["settings"]["seed"]) for n in (1, 2)}
            print(json.dumps({
                "records": case[0], "epochs": case[1], "cycle_epochs": case[2], "grad_accum": case[3],
                "optimizer_steps": [runs[n]["optimizer_steps"] for n in (1, 2)],
                "learning_rate": [runs[n]["settings"]["learning_rate"] for n in (1, 2)],
                "same_target": runs[1]["settings"]["target_text"] == runs[2]["settings"]["target_text"],
                "max_abs_weight_diff": max(float((one[k] - two[k]).abs().max()) for k in one),
                "max_abs_weight": max(float(w.abs().max()) for w in one.values()),
                "held_out_nll": [nll[1], nll[2]], "held_out_nll_diff": abs(nll[1] - nll[2])}), flush=True)
            for n in (1, 2):
                shutil.rmtree(work / f"out{n}")


if __name__ == "__main__":
    main()
