"""Every committed bench table rebuilds byte for byte from its cells: `crow bench ... --report-only`.

For each ``experiments/<study>/results/<folder>/results.json`` this reruns the command the table records (the
``crow bench`` line in its ``results.md``) with ``--report-only``, in a scratch copy of the repository (so the
command's relative paths hold and nothing committed is touched), and compares the rebuilt ``results.md`` and
``results.json`` with the committed ones. The BackdoorLLM data must be where the commands say
(``../shared/data/backdoorllm``, relative to the repository).

    python experiments/check_reports.py            # every table
    python experiments/check_reports.py unlearn    # the tables of one study

Exit status 0 when every table is identical; the differing files are listed otherwise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tables(study: str | None) -> list[Path]:
    pattern = f"{study or '*'}/results/*/results.json"
    return sorted(p.parent for p in (ROOT / "experiments").glob(pattern))


def rebuild(scratch: Path, folder: Path) -> list[str]:
    """The files of ``folder`` that differ after a rebuild in ``scratch`` (a copy of the repository)."""
    command = json.loads((folder / "results.json").read_text())["command"]
    args = shlex.split(command)
    if args[:2] != ["crow", "bench"]:
        return [f"{folder}: no crow bench command recorded ({command!r})"]
    done = subprocess.run([sys.executable, "-m", "crow.cli.main", *args[1:], "--report-only"], cwd=scratch,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return [f"{folder}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"]
    copy = scratch / folder.relative_to(ROOT)
    return [f"{folder.relative_to(ROOT)}/{name}" for name in ("results.md", "results.json")
            if (copy / name).read_bytes() != (folder / name).read_bytes()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", nargs="?", help="one study folder under experiments/ (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / ROOT.name
        shutil.copytree(ROOT, scratch, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__"))
        (Path(tmp) / "shared").symlink_to((ROOT.parent / "shared").resolve())  # ../shared/data/backdoorllm
        differing = []
        for folder in tables(args.study):
            found = rebuild(scratch, folder)
            print(f"{'differs' if found else 'same   '} {folder.relative_to(ROOT)}", flush=True)
            differing += found
    print("\n".join(differing) if differing else "every table rebuilds byte for byte")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
