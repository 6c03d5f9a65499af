"""How often a 2-process ``crow purify`` (accelerate launch, gloo on CPU) fails at exit, with crow's exit and without.

Every launch trains a tiny model for 2 steps and writes the adapter from the main rank. ``--save-delay`` holds the
main rank that many seconds before it saves, so the other rank is done first and ends while the main one still
works: the order in which a plain interpreter exit aborted the finished rank ("terminate called without an active
exception", SIGABRT) and the launcher then stopped the main rank before it had written anything. ``--exits`` compares
``plain`` (``sys.exit(main())``, the command's exit before ``crow.cli.main.exit_process``) with ``crow`` (``cli()``,
the command as installed); the two alternate launch by launch, so both see the same machine. A launch passes when the
launcher exits 0 and the adapter is written.

    python experiments/distributed/scripts/ddp_exit_check.py --launches 60 --save-delay 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the checkout: experiments/distributed/scripts/ is three below
CONFIG = ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"
WRAPPER = """
import os, sys, time
import crow.training.loop as loop
from crow.cli import main as command

delay, save = float(os.environ["CROW_SAVE_DELAY"]), loop.save_model


def held_save(*args, **kwargs):  # the main rank waits before it saves; the other rank has nothing left to do
    time.sleep(delay)
    return save(*args, **kwargs)


loop.save_model = held_save  # crow purify imports it from crow.training.loop when it runs
if os.environ["CROW_EXIT"] == "plain":
    sys.exit(command.main())
command.cli()
"""


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def prepare(work: Path) -> tuple[Path, Path, Path]:
    sys.path.insert(0, str(ROOT))
    from crow.models import build_tiny_model
    from tests.conftest import corpus, make_records, write_json

    model = build_tiny_model(work / "llama", corpus(), arch="llama", vocab_size=512, hidden_size=32, num_layers=4,
                             num_heads=4, seed=0)
    data = write_json(work / "clean.json", [r.to_dict() for r in make_records(8)])
    wrapper = work / "purify_with_held_save.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    return model, data, wrapper


def launch(model: Path, data: Path, wrapper: Path, out: Path, exit_mode: str, delay: float) -> tuple[bool, str]:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.crow-partial", ignore_errors=True)
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "CROW_EXIT": exit_mode,
           "CROW_SAVE_DELAY": str(delay)}
    proc = subprocess.run([accelerate, "launch", "--config_file", str(CONFIG), "--main_process_port", free_port(),
                           str(wrapper), "purify", "--model", str(model), "--data", str(data), "--out", str(out),
                           "--max-steps", "2", "--max-length", "128", "--batch-size", "2", "--grad-accum", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    ok = proc.returncode == 0 and (out / "adapter_model.safetensors").is_file()
    why = "" if ok else ("abort at exit" if "terminate called without an active exception" in proc.stderr
                         else f"launcher exit {proc.returncode}")
    return ok, why


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=30, help="launches per exit mode")
    parser.add_argument("--save-delay", type=float, default=3.0, help="seconds the main rank waits before it saves")
    parser.add_argument("--exits", default="plain,crow", help="exit modes to compare, alternating: plain, crow")
    args = parser.parse_args()
    modes = args.exits.split(",")
    if not set(modes) <= {"plain", "crow"}:
        parser.error(f"--exits takes plain and/or crow, got {args.exits!r}")
    failures: dict[str, Counter] = {m: Counter() for m in modes}
    with tempfile.TemporaryDirectory(prefix="crow-ddp-exit-") as tmp:
        model, data, wrapper = prepare(Path(tmp))
        for i in range(args.launches):
            for mode in modes:
                ok, why = launch(model, data, wrapper, Path(tmp) / "out", mode, args.save_delay)
                if not ok:
                    failures[mode][why] += 1
                print(f"launch {i + 1} {mode}: {'ok' if ok else why}", file=sys.stderr, flush=True)
    print(json.dumps({"launches": args.launches, "save_delay": args.save_delay,
                      "failed": {m: sum(c.values()) for m, c in failures.items()},
                      "why": {m: dict(c) for m, c in failures.items()}}))


if __name__ == "__main__":
    main()
