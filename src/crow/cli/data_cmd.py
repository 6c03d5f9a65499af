"""crow data fetch: download the data crow's benchmarks use, each file checked against a pinned sha256."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("action", choices=("fetch",), help="fetch: download a data set")
    p.add_argument("name", choices=("backdoorllm",), help="backdoorllm: the BackdoorLLM subset `crow bench` uses "
                   "(from the CROW repository at a pinned commit)")
    p.add_argument("--out", required=True, help="directory to write; files already there with the right hash are kept")
    p.add_argument("--base-url", help="a mirror of the repository at the pinned commit (default: GitHub)")


def run(args) -> int:
    from ..data.fetch import BASE_URL, MANIFEST, fetch
    fetched = fetch(args.out, base_url=args.base_url or BASE_URL, progress=sys.stderr.isatty())
    print(json.dumps({"out": args.out, "downloaded": len(fetched), "files": len(MANIFEST)}))
    return 0
