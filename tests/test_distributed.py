"""Multi-process CROW with accelerate (gloo DDP on CPU) and gradient checkpointing."""

import json
import os
import shutil
import socket
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


def _free_port() -> str:
    """A TCP port nothing listens on now. A fixed port hung the first launch to its timeout once (another
    process, perhaps a stale worker of an earlier run, held it); the OS picks one that is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(args, timeout=300):
    out = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


# accelerate 1.15 starts several CPU processes with `--cpu` only through mpirun; its torch.distributed
# launcher (--multi_gpu, or configs/accelerate/ddp_cpu.yaml) on a machine without CUDA starts CPU
# processes that talk over gloo.
LAUNCH_2 = [ACCELERATE, "launch", "--config_file", str(Path(__file__).resolve().parents[1] / "configs" / "accelerate"
                                                       / "ddp_cpu.yaml")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU DDP config is for machines without CUDA")
def test_two_processes_give_the_gradients_of_one_process_over_the_same_global_batch(tiny_dir, tmp_path):
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    _launch([sys.executable, str(WORKER), "--model", str(tiny_dir), "--out", str(single), "--per-device", "4"])
    _launch(LAUNCH_2 + ["--main_process_port", _free_port(), str(WORKER), "--model", str(tiny_dir), "--out", str(ddp),
                        "--per-device", "2"])
    one, two = torch.load(single), torch.load(ddp)
    assert one["world_size"] == 1 and two["world_size"] == 2  # two processes really ran
    a, b = one["grads"], two["grads"]
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name
    assert any(g.abs().max() > 0 for g in a.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU DDP config is for machines without CUDA")
def test_accelerate_launch_runs_crow_purify_to_completion(tiny_dir, tmp_path):
    data = write_json(tmp_path / "d.json", [r.to_dict() for r in make_records(8)])
    out = tmp_path / "purified"
    _launch(LAUNCH_2 + ["--main_process_port", _free_port(), "-m", "crow.cli.main",
                        "purify", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--max-steps", "2",
                        "--max-length", "128", "--batch-size", "2", "--grad-accum", "1"])
    config = json.loads((out / "crow_config.json").read_text())
    assert config["optimizer_steps"] == 2 and config["num_processes"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    assert not any(p.name.startswith(".purified") for p in tmp_path.iterdir())


def test_checkpointing_gives_the_gradients_of_a_plain_run(tiny_dir, tmp_path):
    plain, ckpt = tmp_path / "plain.pt", tmp_path / "ckpt.pt"
    _launch([sys.executable, str(WORKER), "--model", str(tiny_dir), "--out", str(plain), "--per-device", "2",
             "--grad-accum", "2"])
    _launch([sys.executable, str(WORKER), "--model", str(tiny_dir), "--out", str(ckpt), "--per-device", "2",
             "--grad-accum", "2", "--gradient-checkpointing"])
    a, b = torch.load(plain)["grads"], torch.load(ckpt)["grads"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name
