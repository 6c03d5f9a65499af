"""Defenses that edit the weights, baselines of CROW's comparison: pruning (``prune-wanda``, ``prune-magnitude``),
Fine-Pruning (``fineprune``) and quantization (``quantize``: INT8, ``quantize-nf4``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data.templates import Collator, encode_for_training
from ..errors import CrowError
from ..methods import crow
from ..modeling import eval_mode
from ..training.loop import merged
from .base import Defense, DefenseContext
from .registry import DEFENSES


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model except the output head (Wanda prunes all linear layers of the blocks)."""
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


@torch.no_grad()
def input_feature_norms(model, tokenizer, ctx: DefenseContext, modules: dict[str, nn.Module],
                        batch_size: int = 8) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature j of each module over the real tokens of the clean samples."""
    samples = encode_for_training(ctx.clean, tokenizer, template=ctx.template, max_length=ctx.max_length)
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in modules.items()}
    batch = {}

    def accumulate(name: str, x: torch.Tensor) -> None:  # x [B, T, in]
        x = x.detach().double()
        keep = batch["attention_mask"].unsqueeze(-1).to(x.dtype)  # [B, T, 1]
        sums[name] += (x.pow(2) * keep).sum(dim=(0, 1)).cpu()

    handles = [m.register_forward_pre_hook(lambda _, args, n=n: accumulate(n, args[0])) for n, m in modules.items()]
    collate = Collator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for start in range(0, len(samples), batch_size):
                rows = samples[start:start + batch_size]
                batch = {k: v.to(device) for k, v in collate([{"input_ids": s.input_ids, "labels": s.labels}
                                                              for s in rows]).items()}
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt().float() for n, s in sums.items()}


@DEFENSES.register("prune-wanda")
@dataclass
class WandaPrune(Defense):
    """Wanda unstructured pruning (Sun et al., ICLR 2024): score |W_ij| * ||X_j||, prune per output row.
    Paper (CROW's comparison): sparsity 0.35 for Llama-family models, 0.65 for Mistral."""

    sparsity: float = 0.35
    name = "prune-wanda"
    changes = "weights"

    def __post_init__(self):
        _check_fraction(self.sparsity, "sparsity")

    def repair(self, model, tokenizer, ctx):
        model = merged(model)
        linears = prunable_linears(model)
        norms = input_feature_norms(model, tokenizer, ctx, linears)
        with torch.no_grad():
            for name, module in linears.items():
                score = module.weight.abs() * norms[name].to(module.weight.device, module.weight.dtype)[None, :]
                k = int(module.weight.shape[1] * self.sparsity)  # the lowest-scoring k of each output row
                if k:
                    module.weight.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, 0.0)
        return model


@DEFENSES.register("prune-magnitude")
@dataclass
class MagnitudePrune(Defense):
    """Magnitude pruning: zero the lowest |W| of each weight matrix (layer-wise, as Wanda's baseline)."""

    sparsity: float = 0.35
    name = "prune-magnitude"
    changes = "weights"

    def __post_init__(self):
        _check_fraction(self.sparsity, "sparsity")

    def repair(self, model, tokenizer, ctx):
        model = merged(model)
        with torch.no_grad():
            for module in prunable_linears(model).values():
                score, k = module.weight.abs(), int(module.weight.numel() * self.sparsity)
                if k:
                    module.weight[score <= torch.kthvalue(score.flatten().float(), k).values] = 0.0
        return model


def _check_fraction(value: float, name: str) -> None:
    if not 0 <= value < 1:
        raise CrowError(f"{name} must be in [0, 1), got {value}")


DOWN_PROJECTIONS = ("down_proj", "fc2", "dense_4h_to_h")


def mlp_down_projections(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The MLP output projections of the decoder layers, in layer order (their inputs are the neurons)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DOWN_PROJECTIONS]
    if not found:
        raise CrowError(f"fineprune found no MLP projection named {', '.join(DOWN_PROJECTIONS)} in "
                        f"{type(model).__name__}; this architecture is not supported by fineprune")
    return found


@DEFENSES.register("fineprune")
@dataclass
class FinePrune(Defense):
    """Fine-Pruning for LLMs: in the last ``layer_fraction`` of decoder layers, zero the ``prune_ratio`` MLP neurons
    least active on the clean samples (lowest L2 norm of the down projection's input: SwiGLU outputs are signed, so the
    norm stands in for Liu et al.'s mean ReLU output), then finetune a new LoRA (the paper's finetuning baseline)."""

    prune_ratio: float = 0.2
    layer_fraction: float = 0.25
    learning_rate: float = 2e-4
    epochs: float = 5.0
    name = "fineprune"
    changes = "weights"

    def __post_init__(self):
        _check_fraction(self.prune_ratio, "prune_ratio")

    def repair(self, model, tokenizer, ctx):
        model = merged(model)
        downs = mlp_down_projections(model)
        last = downs[-max(1, math.ceil(len(downs) * self.layer_fraction)):]
        norms = input_feature_norms(model, tokenizer, ctx, dict(last))  # ||activation|| per neuron
        with torch.no_grad():
            for name, module in last:
                k = int(module.in_features * self.prune_ratio)
                dead = torch.topk(norms[name], k, largest=False).indices
                module.weight[:, dead] = 0.0
        config = crow.CrowConfig(alpha=0.0, learning_rate=self.learning_rate, epochs=self.epochs, seed=ctx.seed)
        result = crow.run(model, tokenizer, ctx.clean, config, ctx.run_options(self.name))
        ctx.train_log[:] = result.log_history
        return result.model


NF4_CODE = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                         0.7229568362236023, 1.0])  # QLoRA's NormalFloat4 levels (as in bitsandbytes)


def int8_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel INT8: round(W / s) * s with s = max|W_row| / 127."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return ((w / scale).round().clamp(-127, 127) * scale).to(weight.dtype)


def nf4_roundtrip(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Round-to-nearest NF4 with absmax scaling per block of ``block`` weights (bitsandbytes' layout)."""
    w = weight.float().flatten()
    blocks = torch.nn.functional.pad(w, (0, (-w.numel()) % block)).view(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    code = NF4_CODE.to(w.device)
    idx = ((blocks / absmax).unsqueeze(-1) - code).abs().argmin(dim=-1)
    return (code[idx] * absmax).flatten()[: w.numel()].view_as(weight).to(weight.dtype)


SIMULATED_NF4 = "simulated (round-to-nearest NF4, block 64)"


def _bnb_nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(weight.to(torch.bfloat16).cuda(), blocksize=64, quant_type="nf4")
    return F.dequantize_4bit(q, state).to(weight.dtype).to(weight.device)


@torch.no_grad()
def roundtrip_linears(model, roundtrip):
    """``model`` with ``roundtrip`` applied to the weights of every linear layer but the head, in place."""
    for module in prunable_linears(model).values():
        module.weight.copy_(roundtrip(module.weight))
    return model


@DEFENSES.register("quantize")
@dataclass
class Int8Quantize(Defense):
    """INT8 weights (per channel, round-to-nearest) in every linear but the head, stored back dequantized (CPU too)."""

    name = "quantize"
    changes = "weights"

    def repair(self, model, tokenizer, ctx):
        return roundtrip_linears(merged(model), int8_roundtrip)


@DEFENSES.register("quantize-nf4")
@dataclass
class NF4Quantize(Defense):
    """4-bit NF4 (block 64): bitsandbytes when a CUDA device and bitsandbytes exist, else a round-to-nearest
    simulation with the same code book and block layout (``implementation`` in the results says which)."""

    name = "quantize-nf4"
    changes = "weights"

    @staticmethod
    def implementation() -> str:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return SIMULATED_NF4
        return "bitsandbytes" if torch.cuda.is_available() else SIMULATED_NF4

    def settings(self, task: str | None = None, seed: int | None = None) -> dict:
        return {"implementation": self.implementation()}

    def repair(self, model, tokenizer, ctx):
        roundtrip = _bnb_nf4_roundtrip if self.implementation() == "bitsandbytes" else nf4_roundtrip
        return roundtrip_linears(merged(model), roundtrip)
