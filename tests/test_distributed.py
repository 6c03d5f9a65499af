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
                        "--max-length", "128", "--batch-size", "2", "--grad-accum", "1", "--method", "crow"])
    config = json.loads((out / "crow_config.json").read_text())
    assert config["optimizer_steps"] == 2 and config["num_processes"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    verification = json.loads((out / "verification.json").read_text())  # the main process verifies, once
    assert verification["samples"]["n"] == 1 and config["verification_seconds"] == verification["seconds"]
    assert not any(p.name.startswith(".purified") for p in tmp_path.iterdir())



def _unlearn(launcher, data, out, batch_size):
    """The whole recommended recipe on the tiny model: BAIT's target, one unlearning cycle with
    the soft tokens' PGD, and (refit_gain 0) the CROW refit; 8 training and 12 refit samples divide into the batches."""
    return _launch(launcher + ["-m", "crow.cli.main", "purify", "--model", str(data.parent / "model"), "--data",
                               str(data), "--out", str(out), "--method", "unlearn", "--holdout", "4", "--epochs", "2",
                               "--cycle-epochs", "1", "--refit-epochs", "1", "--refit-gain", "0", "--max-length",
                               "128", "--batch-size", str(batch_size), "--grad-accum", "1", "--no-verify"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU DDP config is for machines without CUDA")
def test_two_processes_unlearn_like_one_process_over_the_same_global_batch(tiny_dir, tmp_path):
    """2 processes x batch 1 against 1 process x batch 2: BAIT runs in the main process only, every process draws the
    insertion points of the whole micro-batch and takes PGD steps on the
    global gradient, so the adapters agree to float rounding (measured 4.8e-8; 1.0e-3 with each process's own delta
    gradient, 3.6e-3 with each drawing only its own rows' points: docs/distributed.md)."""
    from safetensors.torch import load_file

    (tmp_path / "model").symlink_to(tiny_dir)
    data = write_json(tmp_path / "d.json", [r.to_dict() for r in make_records(12)])
    one = _unlearn([sys.executable], data, tmp_path / "one", 2)
    two = _unlearn(LAUNCH_2 + ["--main_process_port", _free_port()], data, tmp_path / "two", 1)
    assert one.stderr.count("unlearn: BAIT verdict") == 1
    assert two.stderr.count("unlearn: BAIT verdict") == 1  # every process logs: the other one did not scan
    assert two.stderr.count("unlearn: process 1 of 2 took the target of the main process") == 1
    a, b = (json.loads((tmp_path / name / "crow_config.json").read_text()) for name in ("one", "two"))
    assert (a["num_processes"], b["num_processes"]) == (1, 2) and a["optimizer_steps"] == b["optimizer_steps"] == 10
    assert b["settings"]["target_source"] == "bait" and a["settings"]["target_text"] == b["settings"]["target_text"]
    curve_a, curve_b = ([h for h in c["epoch_selection"] if "holdout_nll" in h] for c in (a, b))
    assert [h.get("refit") for h in curve_a] == [h.get("refit") for h in curve_b] == [None, True]  # it refitted
    assert all(abs(x["holdout_nll"] - y["holdout_nll"]) < 1e-5 for x, y in zip(curve_a, curve_b))
    wa, wb = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU check: on GPUs accelerate applies FSDP")
def test_an_fsdp_config_on_cpu_processes_runs_ddp_and_says_so(tiny_dir, tmp_path):
    """accelerate (1.16) enables FSDP for accelerator devices only: CPU processes under an FSDP config get gloo DDP,
    and crow warns that nothing is sharded (torch 2.13's own FSDP2 runs on gloo; accelerate does not route to it)."""
    config = tmp_path / "fsdp_cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
                      "num_processes: 2\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: false\nfsdp_config:\n"
                      "  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
                      "  fsdp_state_dict_type: FULL_STATE_DICT\n  fsdp_cpu_ram_efficient_loading: false\n")
    data = write_json(tmp_path / "d.json", [r.to_dict() for r in make_records(4)])
    out = tmp_path / "purified"
    run = _launch([ACCELERATE, "launch", "--config_file", str(config), "--main_process_port", _free_port(), "-m",
                   "crow.cli.main", "purify", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
                   "--method", "crow", "--max-steps", "1", "--max-length", "128", "--batch-size", "2", "--grad-accum",
                   "1", "--no-verify"])
    assert "the launch config asks for FSDP, but accelerate set up MULTI_CPU with 2 process(es)" in run.stderr
    assert json.loads((out / "crow_config.json").read_text())["num_processes"] == 2

def test_checkpointing_gives_the_gradients_of_a_plain_run(tiny_dir, tmp_path):
    plain, ckpt = tmp_path / "plain.pt", tmp_path / "ckpt.pt"
    _launch([sys.executable, str(WORKER), "--model", str(tiny_dir), "--out", str(plain), "--per-device", "2",
             "--grad-accum", "2"])
    _launch([sys.executable, str(WORKER), "--model", str(tiny_dir), "--out", str(ckpt), "--per-device", "2",
             "--grad-accum", "2", "--gradient-checkpointing"])
    a, b = torch.load(plain)["grads"], torch.load(ckpt)["grads"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name
