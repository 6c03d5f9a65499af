"""Per-layer consistency profiles (the paper's Figure 1): mean cosine of consecutive hidden states
over the prompt tokens (or at the last prompt token only), for clean vs triggered prompts."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from ..data.padding import pad_batch
from ..data.records import Record
from ..data.templates import encode_prompt, format_prompt
from ..errors import CrowError
from ..losses import consistency_profile


def strip_trigger(records: Sequence[Record], trigger: str, *, what: str = "triggered prompts") -> list[Record]:
    """The clean twins of triggered prompts: every occurrence of ``trigger`` removed from instruction and
    input (with the whitespace around it collapsed to one space), so that a profile compares the same
    prompts with and without the trigger. A record that does not contain ``trigger`` is an error."""
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
def layer_profile(model, tokenizer, records: Sequence[Record], *, template: str = "alpaca",
                  batch_size: int = 16, position: Position = "mean") -> list[float]:
    """Mean cosine of every consecutive hidden-state pair (``layers="all"``) over ``records``: a list of
    length ``num_hidden_states - 1``.

    ``position="mean"`` averages over all real prompt tokens (a trigger is one or two tokens of a
    prompt, so its effect is diluted); ``"last"`` takes only the last prompt token, the position that
    predicts the first answer token, where a backdoor must act.
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    prompts = [encode_prompt(format_prompt(r, template, tokenizer), template, tokenizer) for r in records]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, weight = None, 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
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
    model.train(was_training)
    return [round(float(x), 6) for x in (total / weight)]


def plot_profiles(curves: Mapping[str, Sequence[float]], path: str | Path, *, title: str = "") -> Path:
    """Plot ``{label: profile}`` (x = layer pair i: hs[i] vs hs[i+1]); labels containing 'triggered' are
    dashed. When curves come in pairs ``"<model> clean"`` / ``"<model> triggered"``, a second panel shows
    triggered minus clean per model: the per-layer gaps are small next to the curves themselves."""
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
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if models:
        low = axes[1][0]
        for m in models:
            gap = [t - c for c, t in zip(curves[f"{m} clean"], curves[f"{m} triggered"])]
            low.plot(range(len(gap)), gap, label=m, marker="o", markersize=2.5, linewidth=1.3)
        low.axhline(0.0, color="grey", linewidth=0.8)
        low.set_ylabel("triggered - clean")
        low.grid(alpha=0.3)
        low.legend(fontsize=8)
    axes[-1][0].set_xlabel("layer pair i (cosine of hidden state i and i+1; 0 = embeddings)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
