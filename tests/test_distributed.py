"""Multi-process CROW with accelerate (gloo DDP on CPU) and gradient checkpointing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import make_records, write_json

WORKER = Path(__file__).with_name("ddp_worker.py")
ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))

pytestmark = pytest.mark.skipif(not Path(ACCELERATE).exists(), reason="accelerate's launcher is not installed")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _launch(args, timeout=600):
    out = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_processes_give_the_gradients_of_one_process_over_the_same_global_batch(tiny_dir, tmp_path):
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    _launch([sys.executable, str(WORKER), "--model", str(tiny_dir), "--out", str(single), "--per-device", "4"])
    _launch([ACCELERATE, "launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", "--main_process_port", "29533",
             str(WORKER), "--model", str(tiny_dir), "--out", str(ddp), "--per-device", "2"])
    a, b = torch.load(single), torch.load(ddp)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name
    assert any(g.abs().max() > 0 for g in a.values())


def test_accelerate_launch_runs_crow_purify_to_completion(tiny_dir, tmp_path):
    data = write_json(tmp_path / "d.json", [r.to_dict() for r in make_records(8)])
    out = tmp_path / "purified"
    _launch([ACCELERATE, "launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", "--main_process_port", "29534", "-m", "crow.cli.main",
             "purify", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--max-steps", "2",
             "--max-length", "128", "--batch-size", "2", "--grad-accum", "1"])
    config = json.loads((out / "crow_config.json").read_text())
    assert config["optimizer_steps"] == 2 and (out / "adapter_model.safetensors").is_file()
    assert not any(p.name.startswith(".purified") for p in tmp_path.iterdir())


def test_checkpointing_gives_the_gradients_of_a_plain_run(tiny_dir, tmp_path):
    plain, ckpt = tmp_path / "plain.pt", tmp_path / "ckpt.pt"
    _launch([sys.executable, str(WORKER), "--model", str(tiny_dir), "--out", str(plain), "--per-device", "2",
             "--grad-accum", "2"])
    _launch([sys.executable, str(WORKER), "--model", str(tiny_dir), "--out", str(ckpt), "--per-device", "2",
             "--grad-accum", "2", "--gradient-checkpointing"])
    a, b = torch.load(plain), torch.load(ckpt)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name
