"""Per-layer consistency profiles (the paper's Figure 1): mean cosine of consecutive hidden states
over the prompt tokens (or at the last prompt token only), for clean vs triggered prompts."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from ..data.records import Record
from ..data.templates import batches, encode_prompts, pad_batch
from ..errors import CrowError
from ..losses import consistency_profile
from ..modeling import evaluating


def strip_trigger(records: Sequence[Record], trigger: str, *, what: str = "triggered prompts") -> list[Record]:
    """The clean twins of triggered prompts: every ``trigger`` (and the whitespace around it) replaced by one space in
    instruction and input, both stripped. A record without ``trigger`` is an error."""
    trigger = trigger.strip()
    if not trigger:
        raise CrowError("--strip-trigger must be a non-empty text such as BadMagic")
    pattern = re.compile(r"\s*" + re.escape(trigger) + r"\s*")
    out = []
    for i, r in enumerate(records):
        if trigger not in r.instruction and trigger not in r.input:
            raise CrowError(f"{what}: record {i} does not contain the trigger {trigger!r}; "
                            "pass the trigger text exactly as it appears in the prompts")
        out.append(Record(pattern.sub(" ", r.instruction).strip(), pattern.sub(" ", r.input).strip(), r.output))
    return out


Position = Literal["mean", "last"]
POSITIONS: tuple[str, ...] = ("mean", "last")


@torch.no_grad()
@evaluating
def layer_profile(model, tokenizer, records: Sequence[Record], *, template: str = "alpaca",
                  batch_size: int = 16, position: Position = "mean") -> list[float]:
    """Mean cosine of every consecutive hidden-state pair over ``records`` (``num_hidden_states - 1`` values), over
    all real prompt tokens (``position="mean"``) or at the last one, which predicts the first answer token."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    prompts = encode_prompts(records, template, tokenizer)
    device = next(model.parameters()).device
    total, weight = None, 0.0
    for chunk in batches(prompts, batch_size):
        ids, mask = pad_batch(chunk, tokenizer.pad_token_id)  # [B, T] right-padded
        hs = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                   use_cache=False).hidden_states
        scope = mask
        if position == "last":  # right padding: the last real token of row r sits at len(p) - 1
            scope = torch.zeros_like(mask)
            scope[torch.arange(len(chunk)), mask.sum(dim=1) - 1] = 1
        n = float(scope.sum())
        profile = consistency_profile(hs, scope.to(device), layers="all") * n  # [P]
        total = profile if total is None else total + profile
        weight += n
    return [round(float(x), 6) for x in (total / weight)]


def plot_profiles(curves: Mapping[str, Sequence[float]], path: str | Path, *, title: str = "") -> Path:
    """Plot ``{label: profile}`` (x = layer pair i); labels containing 'triggered' are dashed. Pairs of curves
    ``"<model> clean"`` / ``"<model> triggered"`` get a second panel of triggered minus clean per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = [label[: -len(" clean")] for label in curves if label.endswith(" clean")
              and f"{label[: -len(' clean')]} triggered" in curves]
    rows = 2 if models else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3.4 * rows), dpi=120, sharex=True, squeeze=False)
    ax = axes[0][0]
    for label, values in curves.items():
        ax.plot(range(len(values)), values, label=label, linestyle="--" if "triggered" in label else "-",
                marker="o", markersize=2.5, linewidth=1.3)
    ax.set_ylabel("mean cosine similarity")
    ax.set_title(title or "Consistency of consecutive layers")
    if models:
        low = axes[1][0]
        for m in models:
            gap = [t - c for c, t in zip(curves[f"{m} clean"], curves[f"{m} triggered"])]
            low.plot(range(len(gap)), gap, label=m, marker="o", markersize=2.5, linewidth=1.3)
        low.axhline(0.0, color="grey", linewidth=0.8)
        low.set_ylabel("triggered - clean")
    for a in axes[:, 0]:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    axes[-1][0].set_xlabel("layer pair i (cosine of hidden state i and i+1; 0 = embeddings)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
