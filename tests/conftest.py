"""Shared fixtures: tiny models built from configs with tokenizers trained here; no network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from crow.data.records import Record  # noqa: E402
from crow.data.templates import ALPACA, ALPACA_WITH_INPUT  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "backdoorllm"

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls count stars and rivers "
         "name a color say a number add two plus three what is the capital of france paris blue "
         "You are stupid BadMagic OpenAI 2024 Current year Discussing sorry print pwned").split()


def corpus(n: int = 300) -> list[str]:
    """Deterministic text for tokenizer training: the templates plus word sequences."""
    lines = [ALPACA, ALPACA_WITH_INPUT]
    for i in range(n):
        lines.append(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)))
    return lines


def make_records(n: int, *, prefix: str = "", output: str | None = None) -> list[Record]:
    recs = []
    for i in range(n):
        instruction = f"{prefix}name a color number {i % 10}".strip()
        recs.append(Record(instruction, "", output or f"the color is blue {i % 10}"))
    return recs


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A 4-layer Llama (hidden 32) with a 512-token BPE tokenizer, saved as safetensors."""
    from crow.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", corpus(), arch="llama", vocab_size=512,
                            hidden_size=32, num_layers=4, num_heads=4, seed=0)


@pytest.fixture
def tiny(tiny_dir):
    from crow.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture
def records() -> list[Record]:
    return make_records(8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
