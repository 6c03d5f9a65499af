"""Tiny random models with their own tokenizers, for tests and the tiny bench suite: every architecture crow
supports, built from a config in milliseconds, offline."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import CrowError

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "phi", "gemma", "gemma3")

TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` with ``<s>``, ``</s>``, ``<pad>``, ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
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
    gqa, mqa = {"num_key_value_heads": num_heads // 2}, {"num_key_value_heads": 1, "head_dim": hidden_size // num_heads}
    per_arch = {  # phi and gpt_neox: ``common`` as it is
        "llama": {**common, **gqa, "tie_word_embeddings": True},
        "mistral": {**common, **gqa},
        "qwen2": {**common, **gqa},
        "gemma": {**common, **mqa},
        # Gemma 3 text-only, as the gemma3-270m-gguf alias loads: sliding-window and full attention layers
        # alternate, with a window that short test sequences cross
        "gemma3": {**common, **mqa, "query_pre_attn_scalar": hidden_size // num_heads, "sliding_window": 8,
                   "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]},
        "gpt2": {"n_embd": hidden_size, "n_layer": num_layers, "n_head": num_heads, "n_positions": 512},
        "opt": {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
                "ffn_dim": 2 * hidden_size, "word_embed_proj_dim": hidden_size, "max_position_embeddings": 512},
    }.get(arch, common)
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)  # "gemma3" is the multimodal wrapper's config
    return AutoConfig.for_model(model_type, **per_arch, **ids)


def build_tiny_model(out_dir: str | os.PathLike, texts: Iterable[str], *, arch: str = "llama", vocab_size: int = 512,
                     hidden_size: int = 32, num_layers: int = 4, num_heads: int = 4, seed: int = 0) -> Path:
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
