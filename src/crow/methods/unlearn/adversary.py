"""``unlearn``'s adversary: S free, norm-bounded embedding vectors inserted at one random point of each clean prompt
(SANDE's simulated trigger, Li et al. 2024, arXiv 2405.07667; random as a trigger like ``BadMagic`` sits anywhere)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...errors import CrowError


def prompt_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: the real tokens before each row's first label != -100 (any padding side; each row needs one)."""
    has_label = labels != -100  # [B, T]
    if not bool(has_label.any(dim=1).all()):
        raise CrowError("a sample of the batch has no answer token (all labels -100); its prompt is not defined")
    first = has_label.to(torch.int8).argmax(dim=1)  # [B] index of the first answer token
    mask = torch.arange(labels.shape[1], device=labels.device)[None, :] < first[:, None]  # [B, T]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    return mask


def build_target_batch(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                       target_ids: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The batch of UL(target | prompt, delta): each prompt + the K ``target_ids``, right-padded [B, P_max + K]:
    ``input_ids``, ``labels`` (-100 but on the target), ``attention_mask``, ``prompt_mask`` (bool: the prompt)."""
    if len(target_ids) == 0:
        raise CrowError("the unlearning target has no tokens")
    prompts = prompt_mask(labels, attention_mask)  # [B, T]
    target = torch.as_tensor(list(target_ids), dtype=input_ids.dtype, device=input_ids.device)  # [K]
    rows = [input_ids[b][prompts[b]] for b in range(input_ids.shape[0])]  # B x [P_b]
    width = max(len(r) for r in rows) + len(target)
    out_ids = input_ids.new_full((len(rows), width), pad_token_id)  # [B, P_max + K]
    out_labels = torch.full_like(out_ids, -100)
    out_mask = torch.zeros_like(out_ids)
    out_prompt = torch.zeros_like(out_ids, dtype=torch.bool)
    for b, prompt in enumerate(rows):
        p, k = len(prompt), len(target)
        out_ids[b, :p], out_ids[b, p:p + k] = prompt, target
        out_labels[b, p:p + k] = target
        out_mask[b, :p + k] = 1
        out_prompt[b, :p] = True
    return {"input_ids": out_ids, "labels": out_labels, "attention_mask": out_mask, "prompt_mask": out_prompt}


def random_insert_points(prompt_lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B] prompt lengths P -> [B] long trigger points, uniform on 1..P-1 (inside the instruction); 1 if P <= 2."""
    high = (prompt_lengths - 1).clamp_min(1).cpu()  # [B] the largest point, inclusive
    u = torch.rand(prompt_lengths.shape, generator=generator)  # [B] on the generator's (CPU) device
    return (1 + (u * high).long().clamp_max(high - 1)).to(prompt_lengths.device)


def insert_slots(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                 points: torch.Tensor, n: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """``n`` slots (for ``replace_embeddings``) before each row's prompt token ``points[b]`` (0 <= points[b] <= prompt
    length): [B, T] batch (any padding side) -> right-padded [B, T' + n] (T': most real tokens) ``input_ids`` (pad on
    slots), ``labels`` (-100 on slots), ``attention_mask`` (1 on slots), ``slots`` (j on slot j, else -1)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()  # [B, T]
    lengths = prompt_mask(labels, real).sum(dim=1)  # [B] prompt tokens
    if bool((points < 0).any()) or bool((points > lengths).any()):
        raise CrowError(f"insert points {points.tolist()} must lie in each row's prompt (lengths {lengths.tolist()})")
    rows = [(input_ids[b][real[b]], labels[b][real[b]]) for b in range(input_ids.shape[0])]
    width = max(len(ids) for ids, _ in rows) + n
    out_ids = input_ids.new_full((len(rows), width), pad_token_id)  # [B, T' + n]
    out_labels = torch.full_like(out_ids, -100)
    out_mask = torch.zeros_like(out_ids)
    slots = torch.full_like(out_ids, -1)
    for b, (ids, lab) in enumerate(rows):
        at, m = int(points[b]), len(ids)
        out_ids[b, :at], out_ids[b, at + n:m + n] = ids[:at], ids[at:]
        out_labels[b, :at], out_labels[b, at + n:m + n] = lab[:at], lab[at:]
        out_mask[b, :m + n] = 1
        slots[b, at:at + n] = torch.arange(n, device=slots.device)
    return {"input_ids": out_ids, "labels": out_labels, "attention_mask": out_mask, "slots": slots}


def labelled_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict a labelled token and those tokens: logits [B, K', V] of the last K' positions (as
    ``causal_lm_loss_sum``), labels [B, T] -> ([N, V], [N]) row-major, N = labelled tokens."""
    k, t = logits.shape[1], labels.shape[1]
    targets = F.pad(labels[:, t - k + 1:], (0, 1), value=-100)  # [B, K'] the token each position predicts
    keep = targets != -100  # [B, K']
    return logits[keep], targets[keep]


def target_token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | <t) of every labelled token (``labelled_positions``) -> [N] fp32."""
    kept, targets = labelled_positions(logits, labels)  # [N, V], [N]
    return torch.log_softmax(kept.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]


def unlikelihood(log_probs: torch.Tensor, clip: float = 1e-6) -> torch.Tensor:
    """-log(1 - p) per token from log p [N] -> [N]; p is clipped at 1 - ``clip``: -log(1 - p) <= 13.8, a finite loss."""
    return -torch.log1p(-log_probs.exp().clamp(max=1.0 - clip))


def pgd_step(delta: torch.Tensor, grad: torch.Tensor, step: float, radius: float) -> torch.Tensor:
    """One normalized-gradient *descent* step on each vector of ``delta`` [..., H] (none on a zero gradient), then
    projection onto ||delta|| <= radius; fp32, detached."""
    g = grad.float()
    norm = g.norm(dim=-1, keepdim=True)  # [..., 1]
    moved = delta.float() - step * torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    return project_to_ball(moved, radius).detach()


def project_to_ball(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Each vector of ``delta``'s last dimension scaled down onto the L2 ball of ``radius`` when it lies outside."""
    norm = delta.norm(dim=-1, keepdim=True)  # [..., 1]
    return torch.where(norm > radius, delta * (radius / norm.clamp_min(torch.finfo(delta.dtype).tiny)), delta)
