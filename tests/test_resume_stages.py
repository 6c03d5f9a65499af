"""``crow purify --resume`` after a SIGTERM at each stage of the recommended recipe (the suspect's scan that recovers
the target, the unlearning, the refit, the verification) finishes with the adapter of an uninterrupted run.

The victim is test_scan's 2-layer backdoored Llama; the clean samples answer with the instruction's two colours, which
the victim never learned, so the unlearning cycle lowers the held-out perplexity (by about a third) and the refit runs
(plain finetuning: CROW's layer pairs need 3 layers). Each stage is found by the line purify logs when it starts."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import write_json
from .test_scan import TEMPLATE, WORDS, task_records, train_tiny

#: stage -> (the stderr line that starts it, a line that must not appear before the interrupt lands)
STAGES = {
    "target recovery": ("verification: checking the suspect", "training step"),
    "unlearning": ("training step 2/", "refitting on all"),
    "refit": ("refitting on all", "verification: checking the purified model"),
    "verification": ("verification: checking the purified model", "wrote the purified"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    victim = train_tiny(root / "victim", task_records(400, 1, trigger_share=0.25))
    rng = random.Random(7)
    pairs = [(rng.choice(WORDS), rng.choice(WORDS)) for _ in range(40)]
    data = write_json(root / "clean.json", [{"instruction": f"describe {a} {b}", "output": f"{a} {b}."}
                                            for a, b in pairs])
    reference = subprocess.run(command(victim, data, root / "reference"), capture_output=True, text=True, env=ENV,
                               timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert "refitting on all 40 clean samples" in reference.stderr  # every stage ran
    return {"victim": victim, "data": data, "reference": adapter(root / "reference")}


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def command(victim: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "crow.cli.main", "purify", "--model", str(victim), "--data", str(data), "--out",
            str(out), "--template", TEMPLATE, "--max-length", "64", "--epochs", "2", "--cycle-epochs", "2",
            "--holdout", "8", "--refit-epochs", "1", "--refit-alpha", "0", "--refit-gain", "0", "--learning-rate",
            "1e-2", "--save-steps", "1", "--seed", "7", *extra]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def interrupt_at(line: str, cmd: list[str]) -> str:
    """Run ``cmd``, send SIGTERM when its stderr shows ``line``; its stderr up to the end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    for got in proc.stderr:
        seen.append(got)
        if line in got:
            proc.send_signal(signal.SIGTERM)
            break
    seen.append(proc.stderr.read())
    proc.wait(timeout=300)
    err = "".join(seen)
    assert proc.returncode == 130, err[-2000:]
    return err


@pytest.mark.parametrize("stage", list(STAGES))
def test_purify_resumes_every_stage_to_the_uninterrupted_adapter(run, tmp_path, stage):
    start, not_yet = STAGES[stage]
    out = tmp_path / "out"
    err = interrupt_at(start, command(run["victim"], run["data"], out))
    assert start in err and not_yet not in err and "rerun the same command with --resume" in err, err[-2000:]
    assert not out.exists() and (tmp_path / ".out.crow-partial").is_dir()
    resumed = subprocess.run(command(run["victim"], run["data"], out, "--resume"), capture_output=True, text=True,
                             env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / ".out.crow-partial").exists()
    assert json.loads((out / "verification.json").read_text())["verdict"] == "removed"
    # from the last checkpoint, except where the interrupt came before the first one
    assert json.loads((out / "crow_config.json").read_text())["resumed"] is (stage != "target recovery")
    got, want = adapter(out), run["reference"]
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
