"""Loading models and adapters safely (README "Safety"): weights are read from ``*.safetensors`` (or parsed from GGUF)
unless ``allow_pickle=True`` (pickle files can run code when loaded); ``trust_remote_code`` is off unless asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CrowError
from .packaged import ALIASES, cache_dir, default_device, first_line, load_gguf, resolve_model

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_safe(directory: Path, *, allow_pickle: bool, what: str) -> None:
    """Refuse a directory whose weights exist only as pickle files unless ``allow_pickle``."""
    files = [p for p in directory.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = sorted(p for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise CrowError(f"{what} {directory} has weights only as pickle ({pickles[0].name}), which can run code when "
                        "loaded; convert it to safetensors, or pass --allow-pickle if you trust its source")
    if not pickles:
        raise CrowError(f"{what} {directory} holds no weights (*.safetensors); "
                        "point to a saved model or adapter directory")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # the path or hub id actually loaded
    adapter: str | None = None


def describe_source(source: str) -> str:
    """``source`` for files that others read: a directory in crow's cache is named without this machine's path."""
    path = Path(source).expanduser()
    cache = cache_dir().expanduser()
    if path.is_absolute() and cache in path.parents:
        return f"{path.relative_to(cache)} (in crow's cache)"
    return source


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_model(model: str, *, adapter: str | None = None, adapter_trainable: bool = False, allow_pickle: bool = False,
               trust_remote_code: bool = False, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str | None = None) -> LoadedModel:
    """Load a causal LM (+ tokenizer, + optional PEFT adapter) from a directory, a ``.gguf`` file, an alias or a hub id;
    every user mistake is a one-line ``CrowError``. ``device="auto"`` is :func:`default_device`, None the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise CrowError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    source = resolve_model(model)
    path = Path(source).expanduser()
    kwargs = {"trust_remote_code": trust_remote_code}
    net_kwargs = {"dtype": dtype, "use_safetensors": not allow_pickle or None, **kwargs}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CrowError(f"model file {path} does not exist")
        net, tokenizer = load_gguf(path, dtype)
    elif path.exists():
        if not path.is_dir():
            raise CrowError(f"model {path} is a file; pass a model directory or a .gguf file")
        if not (path / "config.json").is_file():
            raise CrowError(f"model directory {path} has no config.json; pass a directory saved with save_pretrained")
        check_weights_safe(path, allow_pickle=allow_pickle, what="model directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            net = AutoModelForCausalLM.from_pretrained(path, **net_kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise CrowError(f"model directory {path} cannot be loaded: {first_line(e)}") from None
    elif _is_hub_id(source):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            net = AutoModelForCausalLM.from_pretrained(source, **net_kwargs)
        except (OSError, ValueError) as e:
            raise CrowError(f"model {source} cannot be loaded from the hub: {first_line(e)} "
                            "(offline? pass a local directory; pickle-only repos need --allow-pickle)") from None
    else:
        raise CrowError(f"model {model!r} is not a directory, a .gguf file, an alias ({', '.join(ALIASES)}) "
                        "or a hub id (org/name)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # generation and batching need a pad token
    if adapter is not None:
        net = load_adapter(net, adapter, trainable=adapter_trainable, allow_pickle=allow_pickle)
    if device is not None:
        net.to(default_device() if device == "auto" else device)
    return LoadedModel(net, tokenizer, source, adapter)


def load_adapter(model: nn.Module, adapter: str, *, trainable: bool = False, allow_pickle: bool = False) -> nn.Module:
    """Attach a PEFT adapter (local directory or hub id), refusing pickle-only weights by default."""
    from peft import PeftModel
    path = Path(adapter).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "adapter_config.json").is_file():
            raise CrowError(f"adapter {path} is not a PEFT adapter directory (no adapter_config.json)")
        check_weights_safe(path, allow_pickle=allow_pickle, what="adapter directory")
        local = path
    elif _is_hub_id(adapter):
        from huggingface_hub import snapshot_download
        patterns = ["adapter_config.json", "*.safetensors"] + (["*.bin"] if allow_pickle else [])
        try:
            local = Path(snapshot_download(adapter, allow_patterns=patterns))
        except Exception as e:  # network and hub errors come in many types
            raise CrowError(f"adapter {adapter} cannot be fetched from the hub: {first_line(e)}") from None
        check_weights_safe(local, allow_pickle=allow_pickle, what="adapter")
    else:
        raise CrowError(f"adapter {adapter} does not exist; pass a PEFT adapter directory or hub id")
    try:
        return PeftModel.from_pretrained(model, local, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CrowError(f"adapter {adapter} does not fit the model: {first_line(e)}") from None
