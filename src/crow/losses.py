"""Pure tensor math of CROW: the layer-consistency loss and the FGSM perturbation. ``hs``: the ``N = L + 1``
hidden states [B, T, H] of ``output_hidden_states=True`` (``hs[0]`` the embedding output, ``hs[i]`` decoder layer
``i``'s, in most architectures ``hs[-1]`` *after* the final norm); "pair ``i``" compares ``hs[i]`` and ``hs[i+1]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .errors import CrowError

LayerSpec = Literal["official", "all"] | tuple[int, int] | str
TokenScope = Literal["all", "masked"]


def layer_pairs(num_hidden_states: int, layers: LayerSpec = "official") -> range:
    """Indices ``i`` of the pairs ``(hs[i], hs[i + 1])`` the loss compares: ``"official"``: ``1 .. N-3``, the CROW
    code's ``stack(hs[1:-2])`` vs ``stack(hs[2:-1])`` (no embedding pair, no post-final-norm state); ``"all"``:
    ``0 .. N-2``; ``(start, stop)`` or ``"start:stop"``: ``range(start, stop)``, ``0 <= start < stop <= N-1``."""
    n = num_hidden_states
    options = f"layers='all' (pairs 0..{n - 2}) or an explicit (start, stop) with 0 <= start < stop <= {n - 1}"
    if layers == "official":
        pairs = range(1, n - 2)
    elif layers == "all":
        pairs = range(0, n - 1)
    else:
        start, stop = parse_layer_range(layers)
        if not (0 <= start < stop <= n - 1):
            raise CrowError(f"layer range ({start}, {stop}) does not fit a model with {n - 1} layers "
                            f"({n} hidden states); use {options}")
        pairs = range(start, stop)
    if len(pairs) == 0:
        raise CrowError(f"layers={layers!r} selects no layer pair in a model with {n - 1} layers "
                        f"({n} hidden states; 'official' needs at least 3 layers); use {options}")
    return pairs


def parse_layer_range(layers: LayerSpec) -> tuple[int, int]:
    """``(start, stop)`` from a tuple/list or a ``"start:stop"`` string; CrowError otherwise."""
    if isinstance(layers, str):
        parts = layers.split(":")
        if len(parts) == 2 and all(p.strip().lstrip("-").isdigit() for p in parts):
            return int(parts[0]), int(parts[1])
        raise CrowError(f"layers={layers!r} is not understood; use 'official', 'all' or 'START:STOP' (e.g. '1:20')")
    if isinstance(layers, Sequence) and len(layers) == 2 and all(isinstance(x, int) for x in layers):
        return int(layers[0]), int(layers[1])
    raise CrowError(f"layers={layers!r} is not understood; use 'official', 'all' or a (start, stop) pair of ints")


def pair_cosines(hidden_states: Sequence[torch.Tensor], layers: LayerSpec = "official") -> list[torch.Tensor]:
    """Cosine similarity per selected pair, each [B, T] in at least fp32 (one pair in memory at a time)."""
    out = []
    for i in layer_pairs(len(hidden_states), layers):
        a, b = (h.to(torch.promote_types(h.dtype, torch.float32)) for h in hidden_states[i:i + 2])  # [B, T, H]
        out.append(F.cosine_similarity(a, b, dim=-1, eps=1e-8))  # [B, T]; the official code's eps
    return out


def layer_consistency_loss(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None,
                           layers: LayerSpec = "official", token_scope: TokenScope = "all") -> torch.Tensor:
    """Mean of ``1 - cos(hs[i], hs[i+1])`` over selected pairs x batch x positions (a scalar, fp32, pair by pair).
    The defaults are the official ``(1 - F.cosine_similarity(stack(hs[1:-2]), stack(hs[2:-1]), dim=-1, eps=1e-8))
    .mean()``, padding included; ``token_scope="masked"`` averages over ``attention_mask == 1`` only."""
    if token_scope not in ("all", "masked"):
        raise CrowError(f"token_scope={token_scope!r} is not known; use 'all' (official) or 'masked'")
    cosines = pair_cosines(hidden_states, layers)  # P x [B, T]
    if token_scope == "all":
        return sum((1.0 - c).mean() for c in cosines) / len(cosines)
    if attention_mask is None:
        raise CrowError("token_scope='masked' needs an attention_mask")
    mask = attention_mask.to(torch.float32)  # [B, T]
    n_tokens = mask.sum().clamp_min(1.0)
    return sum(((1.0 - c) * mask).sum() for c in cosines) / (len(cosines) * n_tokens)


def consistency_profile(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None,
                        layers: LayerSpec = "all") -> torch.Tensor:
    """Mean cosine of each selected pair over the real (unpadded) tokens: [P] fp32, no grad (the paper's Figure 1)."""
    with torch.no_grad():
        cosines = torch.stack(pair_cosines(hidden_states, layers))  # [P, B, T]
        if attention_mask is None:
            return cosines.mean(dim=(1, 2))
        mask = attention_mask.to(torch.float32)  # [B, T]
        return (cosines * mask).sum(dim=(1, 2)) / mask.sum().clamp_min(1.0)


def fgsm_delta(grad: torch.Tensor, epsilon: float) -> torch.Tensor:
    """One FGSM step: ``epsilon * sign(grad)``, detached. ``sign(0) = 0``: zero entries get no push."""
    return (epsilon * grad.sign()).detach()


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of target tokens. ``logits`` [B, K, V]: the *last* K positions
    (``logits_to_keep=K``), paired with ``labels[:, T-K+1 :]`` ([B, T], -100: no loss) plus an ignored target for the
    last one (the labels are shifted, not the logits: no copy)."""
    k, t = logits.shape[1], labels.shape[1]
    targets = F.pad(labels[:, t - k + 1 :], (0, 1), value=-100)  # [B, K]
    flat = logits.float().reshape(-1, logits.shape[-1])  # [B*K, V], a view for contiguous fp32 logits
    loss_sum = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss_sum, (targets != -100).sum()


def logits_needed(labels: torch.Tensor) -> int:
    """How many trailing positions need logits for ``labels`` [B, T] (>= 1): from the one before the first target."""
    has_target = (labels != -100).any(dim=0)  # [T]
    if not bool(has_target.any()):
        return 1
    first = int(has_target.to(torch.int8).argmax())
    return labels.shape[1] - max(first - 1, 0)
