"""CROW and the baselines of the paper's comparison, behind one interface (``get_defense(name)``).

| name            | what it does                                                                     |
|-----------------|----------------------------------------------------------------------------------|
| none            | nothing (the victim itself)                                                      |
| crow            | CROW: LM + alpha * consistency(perturbed), continuing the suspect adapter        |
| finetune        | the same trainer with alpha 0, the paper's baseline lr 2e-4                      |
| finetune-lr1e-3 | the same with CROW's lr 1e-3: differs from crow in the loss only                 |
| reinit-adapter  | reference: drop the suspect adapter, train a fresh LoRA like finetune-lr1e-3     |
| unlearn         | target-inverted adversarial unlearning: BAIT recovers the target, a universal    |
|                 | residual-stream adversary (BEEAR) or inserted soft tokens (SANDE) elicit it,     |
|                 | unlikelihood unlearns it                                                         |
| prune-wanda     | Wanda (Sun et al. 2024): prune lowest |W| * ||X|| per output row                   |
| prune-magnitude | prune lowest |W| per weight matrix                                               |
| quantize        | INT8 per-channel round-to-nearest weights (runs on CPU)                          |
| quantize-nf4    | 4-bit NF4, block 64: bitsandbytes on CUDA, a round-to-nearest simulation on CPU  |
| fineprune       | Fine-Pruning (Liu et al. 2018): prune MLP neurons least active on clean data in  |
|                 | the last layers, then finetune (lr 2e-4) a new LoRA on the pruned model          |
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.templates import Collator, encode_for_training
from ..errors import CrowError
from ..purification import LoraSettings, is_peft_model, merged, purify
from ..trainer import ALPHA_PRESETS, CrowConfig
from .base import Defense, DefenseContext

logger = logging.getLogger(__name__)

DEFENSES: dict[str, Callable[..., Defense]] = {}


def register(name: str):
    def wrap(cls):
        DEFENSES[name] = cls
        return cls
    return wrap


def get_defense(name: str, **settings) -> Defense:
    """A defense by name with optional settings; unknown names and settings are errors that list the valid ones."""
    if name not in DEFENSES:
        raise CrowError(f"unknown defense {name!r}; valid: {', '.join(DEFENSES)}")
    factory = DEFENSES[name]
    if dataclasses.is_dataclass(factory):
        valid = {f.name for f in dataclasses.fields(factory)}
        unknown = sorted(set(settings) - valid)
        if unknown:
            raise CrowError(f"defense {name!r} has no setting {unknown[0]!r}; valid: {', '.join(sorted(valid)) or 'none'}")
    elif settings:
        raise CrowError(f"defense {name!r} takes no settings, got {sorted(settings)}")
    return factory(**settings)


@register("none")
@dataclass
class NoDefense(Defense):
    name = "none"
    changes = "nothing"

    def repair(self, model, tokenizer, ctx):
        return model


@register("crow")
@dataclass
class CrowDefense(Defense):
    """CROW with the official recipe; ``alpha=None`` takes the task's preset (refusal: 11).

    It trains the suspect adapter when the victim has one (as the official code does), else a new LoRA
    (r 8, alpha 16, every linear layer) on the victim's weights, or with ``full_finetune`` all weights."""

    alpha: float | None = None
    epsilon: float = 0.1
    learning_rate: float = 1e-3
    epochs: float = 5.0
    batch_size: int = 2
    grad_accum: int = 4
    layers: str = "official"
    token_scope: str = "all"
    #: train every weight instead of a LoRA (purify's full_finetune): needs a victim without an adapter
    #: (``victim_form: merged``, or the tiny suite's fully trained victims)
    full_finetune: bool = False
    #: the training seed (the order of the clean samples, a fresh adapter's init); None takes the bench cell's
    #: seed, which also seeds the victim: set it to repeat the defense on the same victim with another seed
    seed: int | None = None
    name = "crow"

    def resolved_alpha(self, task: str | None) -> float:
        return self.alpha if self.alpha is not None else ALPHA_PRESETS.get(task or "", 5.5)

    def check_victim(self, form: str) -> None:
        if self.full_finetune and form == "adapter":
            raise CrowError(f"defense {self.name!r} with full_finetune: true needs a victim without an adapter "
                            "(it would train around the suspect adapter); set the spec's victim_form: merged")

    def repair(self, model, tokenizer, ctx):
        config = CrowConfig(output_dir=str(ctx.work_dir / f".{self.name}-run"), crow_alpha=self.resolved_alpha(ctx.task),
                            crow_epsilon=self.epsilon, crow_layers=self.layers, crow_token_scope=self.token_scope,
                            learning_rate=self.learning_rate, num_train_epochs=self.epochs,
                            per_device_train_batch_size=self.batch_size, gradient_accumulation_steps=self.grad_accum,
                            seed=ctx.seed if self.seed is None else self.seed, save_strategy="no",
                            disable_tqdm=not ctx.progress, logging_steps=5)
        result = purify(model, tokenizer, ctx.clean, config, template=ctx.template, max_length=ctx.max_length,
                        full_finetune=self.full_finetune)
        ctx.train_log[:] = result.log_history
        return result.model


@register("finetune")
@dataclass
class FinetuneDefense(CrowDefense):
    """Plain finetuning on the clean samples: CROW's trainer and recipe with alpha 0 (paper's lr 2e-4)."""

    alpha: float | None = 0.0
    learning_rate: float = 2e-4
    name = "finetune"


@register("finetune-lr1e-3")
@dataclass
class FinetuneCrowLR(FinetuneDefense):
    """Plain finetuning at CROW's lr 1e-3: differs from CROW in the loss only."""

    learning_rate: float = 1e-3
    name = "finetune-lr1e-3"


@register("reinit-adapter")
@dataclass
class ReinitAdapter(FinetuneCrowLR):
    """A reference, not a defense of the threat model (it presumes the backdoor lives in the adapter): drop
    the suspect adapter (PEFT ``unload``: the base weights as they were, nothing merged) and train a fresh
    LoRA (r 8, alpha 16, every linear layer) on the clean samples with CROW's recipe and alpha 0: lr 1e-3,
    5 epochs, batch 2 x 4, cosine, warmup 0.1 (finetune-lr1e-3's training, from a new adapter). Needs an
    adapter victim."""

    name = "reinit-adapter"
    reference = True

    def __post_init__(self) -> None:
        if self.full_finetune:
            raise CrowError("defense 'reinit-adapter' trains a fresh LoRA adapter; full_finetune: true contradicts it "
                            "(use crow or finetune with full_finetune on a merged victim instead)")

    def check_victim(self, form: str) -> None:
        if form != "adapter":
            raise CrowError(f"defense 'reinit-adapter' needs an adapter victim (it drops the suspect adapter), but this "
                            f"bench's victims are {form!r}; use victim_form: adapter on the backdoorllm suite or "
                            "remove reinit-adapter from the defenses")

    def repair(self, model, tokenizer, ctx):
        if not is_peft_model(model):
            raise CrowError(f"defense 'reinit-adapter' needs an adapter victim (a PEFT model with the suspect adapter), "
                            f"got a {type(model).__name__} without an adapter; load the victim with its adapter")
        return super().repair(model.unload(), tokenizer, ctx)  # unload: drop the adapter; merge would keep it


@dataclass
class RecoveredTarget:
    """What ``unlearn`` unlearns: the text and its first tokens, and where it came from."""

    text: str  # the text recovered by the scan (or given)
    token_ids: list[int]  # its first ``target_tokens`` tokens (no special tokens), the ones unlearned
    used_text: str  # those tokens decoded
    source: str  # "bait" (recovered) or "oracle" (given: not a defense of the threat model)
    scan_score: float | None = None  # BAIT's Q-score of the best candidate
    scan_verdict: str | None = None  # "backdoored" or "clean" (the defense runs either way)
    scan_seconds: float | None = None


def recover_target(model, tokenizer, records, *, template: str, target: str | None = None, target_tokens: int = 8,
                   scan_settings=None) -> RecoveredTarget:
    """The target to unlearn: ``target`` when given (an oracle), else BAIT's recovered target on the
    defender's clean ``records``, or its best candidate when the verdict is clean (the defense runs anyway)."""
    from ..detection.scan import scan

    if target is not None and not target.strip():
        raise CrowError("unlearn: the target is empty; give the text the backdoor answers with, or leave it unset "
                        "to recover it with BAIT")
    result = None
    if target is None:
        result = scan(model, tokenizer, records, method="bait", template=template, settings=scan_settings)
        target = result.target or (result.candidates[0].text if result.candidates else "")
        if not target.strip():
            raise CrowError("unlearn: BAIT recovered no target candidate from the clean samples; give target "
                            "explicitly (an oracle experiment) or check the data and template")
        logger.info("unlearn: BAIT verdict %s (Q %.3f), unlearning %r", result.verdict, result.score, target)
    else:
        logger.warning("unlearn: an explicit target was given (%r): an oracle experiment, not a defense under the "
                       "threat model (a defender knows no target)", target)
    ids = tokenizer(target, add_special_tokens=False)["input_ids"][:target_tokens]
    if not ids:
        raise CrowError(f"unlearn: the target {target!r} has no tokens")
    return RecoveredTarget(text=target, token_ids=list(ids), used_text=tokenizer.decode(ids),
                           source="oracle" if result is None else "bait",
                           scan_score=None if result is None else result.score,
                           scan_verdict=None if result is None else result.verdict,
                           scan_seconds=None if result is None else result.seconds)


@register("unlearn")
@dataclass
class UnlearnDefense(Defense):
    """Target-inverted adversarial unlearning (``crow.unlearn``): BAIT (Shen et al., S&P 2025) recovers the
    target from the clean samples, a universal perturbation of decoder layer ``layer``'s residual stream
    at the prompt positions (BEEAR, Zeng et al. 2024), or ``soft_tokens`` free embeddings inserted into the prompts
    (``adversary: tokens``; SANDE, Li et al. 2024), is optimized to elicit it, and the model is trained
    on LM(clean) + beta LM(clean | delta) + gamma UL(target | delta) (unlikelihood, Welleck et al. 2020),
    with CROW's recipe (lr 1e-3, 5 epochs, batch 2 x 4), continuing the suspect adapter as CROW does.

    Only the defender's knowledge: the model and the clean samples. ``target`` set is an *oracle*
    experiment (the defense then knows the target): marked ``reference`` and ``oracle`` in settings()."""

    target: str | None = None
    layer: int | None = None
    radius: float = 0.5
    pgd_steps: int = 2
    beta: float = 1.0
    gamma: float = 1.0
    target_tokens: int = 8
    learning_rate: float = 1e-3
    epochs: float = 5.0
    batch_size: int = 2
    grad_accum: int = 4
    #: train every weight instead of a LoRA (needs a victim without an adapter, as crow's)
    full_finetune: bool = False
    #: the training seed (the order of the clean samples; the adversary starts at zero); None takes the cell's seed
    seed: int | None = None
    #: BAIT's stop rule for recovering the target (crow.detection.scan.BaitSettings.stop_rule): "entropy" (the rule
    #: unlearn's settings were frozen with on the development cell, as every committed unlearn cell ran; crow scan's
    #: default is "official" since 2026-12-03) or "official" (the official code's: continue confident flat steps)
    scan_stop_rule: str = "entropy"
    #: what keeps the clean answers (UnlearnConfig.unlearn_retain): "references" (LM on the clean samples' answers,
    #: every committed cell), "suspect" (KL to the suspect's own answer distributions) or "both"
    retain: str = "references"
    retain_topk: int = 32
    #: where the adversary acts (UnlearnConfig.unlearn_adversary): "residual" (one delta in decoder layer ``layer``'s
    #: output at every prompt position, BEEAR; every committed cell before 2026-12-04) or "tokens" (``soft_tokens``
    #: free embeddings inserted at a random point of each prompt, SANDE's simulated trigger; ``token_radius``,
    #: ``token_step``, ``token_init``)
    adversary: str = "residual"
    soft_tokens: int = 6
    token_radius: float = 1.0
    token_step: float = 0.1
    token_init: str = "prompt"
    #: clean samples held out of training to choose the epoch by their answers' NLL (UnlearnConfig.unlearn_holdout;
    #: 0, every committed cell before the twelfth session: the last epoch) and the first eligible epoch
    holdout: int = 0
    select_from: float = 2.0
    #: with holdout: the lr schedule restarts every cycle_epochs, cycle ends are the candidates, training stops at the
    #: first that does not improve the held-out NLL (UnlearnConfig.unlearn_cycle_epochs; 0: one schedule)
    cycle_epochs: int = 0
    #: with cycle_epochs: the cycles after the first are plain finetuning on the references
    #: (UnlearnConfig.unlearn_finetune_cycles)
    finetune_cycles: bool = False
    #: with holdout: what scores the held-out samples, "nll" (their answers' NLL) or "rougeL" (ROUGE-L of the
    #: model's greedy answers against theirs; UnlearnConfig.unlearn_select_by)
    select_by: str = "nll"
    #: with finetune_cycles: when the unlearning cycle lowered the held-out perplexity below the suspect's by more than
    #: this fraction, finetune on every clean sample for refit_epochs instead of the finetuning cycles
    #: (UnlearnConfig.unlearn_refit_gain; 0: never, every committed cell before 2026-12-05)
    refit_gain: float = 0.0
    refit_epochs: float = 5.0
    #: with refit_gain: CROW's consistency weight in that finetuning (UnlearnConfig.unlearn_refit_alpha; 0: the
    #: finetune baselines' training, 5.5: CROW's)
    refit_alpha: float = 0.0
    #: with refit_gain: "after" refits the unlearned weights; "before" refits the suspect's, then unlearns again from
    #: them keeping their answers (UnlearnConfig.unlearn_refit_order; "after": every committed cell before 2026-12-06)
    refit_order: str = "after"
    #: with refit_gain and refit_order "after": refit the suspect's weights into a teacher first, then finetune the
    #: unlearned weights towards the references and its answers (UnlearnConfig.unlearn_refit_teacher)
    refit_teacher: bool = False
    #: with refit_teacher: the student learns from the teacher's answers alone, not the references too
    #: (UnlearnConfig.unlearn_teacher_only)
    teacher_only: bool = False
    name = "unlearn"

    def __post_init__(self) -> None:
        if self.target is not None and not str(self.target).strip():
            raise CrowError("defense 'unlearn': target is empty; leave it unset (recovered by BAIT) or give the text")
        from ..detection.scan import STOP_RULES

        if self.scan_stop_rule not in STOP_RULES:
            raise CrowError(f"defense 'unlearn': scan_stop_rule must be one of {', '.join(STOP_RULES)}, "
                            f"got {self.scan_stop_rule!r}")
        self.reference = self.target is not None  # an oracle knows the target: not a defense of the threat model
        self.recovered: RecoveredTarget | None = None
        self._config(Path("."), 0, False)  # bad settings fail when the defense is built, not after a scan

    def check_victim(self, form: str) -> None:
        if self.full_finetune and form == "adapter":
            raise CrowError(f"defense {self.name!r} with full_finetune: true needs a victim without an adapter "
                            "(it would train around the suspect adapter); set the spec's victim_form: merged")

    def _config(self, work_dir: Path, seed: int, progress: bool):
        from ..unlearn import UnlearnConfig

        return UnlearnConfig(output_dir=str(work_dir / f".{self.name}-run"), unlearn_layer=self.layer,
                             unlearn_radius=self.radius, unlearn_pgd_steps=self.pgd_steps, unlearn_beta=self.beta,
                             unlearn_gamma=self.gamma, unlearn_target_tokens=self.target_tokens,
                             unlearn_retain=self.retain, unlearn_retain_topk=self.retain_topk,
                             unlearn_adversary=self.adversary, unlearn_soft_tokens=self.soft_tokens,
                             unlearn_token_radius=self.token_radius, unlearn_token_step=self.token_step,
                             unlearn_token_init=self.token_init, unlearn_holdout=self.holdout,
                             unlearn_select_from=self.select_from, unlearn_cycle_epochs=self.cycle_epochs,
                             unlearn_finetune_cycles=self.finetune_cycles, unlearn_select_by=self.select_by,
                             unlearn_refit_gain=self.refit_gain, unlearn_refit_epochs=self.refit_epochs,
                             unlearn_refit_alpha=self.refit_alpha, unlearn_refit_order=self.refit_order,
                             unlearn_refit_teacher=self.refit_teacher, unlearn_teacher_only=self.teacher_only,
                             learning_rate=self.learning_rate, num_train_epochs=self.epochs,
                             per_device_train_batch_size=self.batch_size, gradient_accumulation_steps=self.grad_accum,
                             seed=seed, save_strategy="no", disable_tqdm=not progress, logging_steps=5)

    def repair(self, model, tokenizer, ctx):
        from ..unlearn import UnlearnTrainer

        config = self._config(ctx.work_dir, ctx.seed if self.seed is None else self.seed, ctx.progress)
        from ..detection.scan import BaitSettings

        self.recovered = recover_target(model, tokenizer, ctx.clean, template=ctx.template, target=self.target,
                                        target_tokens=self.target_tokens,
                                        scan_settings=BaitSettings(stop_rule=self.scan_stop_rule))
        result = purify(model, tokenizer, ctx.clean, config, template=ctx.template, max_length=ctx.max_length,
                        full_finetune=self.full_finetune, trainer_cls=UnlearnTrainer,
                        trainer_kwargs={"target_ids": self.recovered.token_ids, "processing_class": tokenizer})
        ctx.train_log[:] = result.log_history
        return result.model

    def settings(self) -> dict:
        out = dataclasses.asdict(self)
        out["oracle"] = self.target is not None
        if self.recovered is not None:
            bait = self.recovered.source == "bait"
            out.update(target_source=self.recovered.source, target_text=self.recovered.text,
                       recovered_target=self.recovered.text if bait else None,
                       unlearned_text=self.recovered.used_text, scan_score=self.recovered.scan_score,
                       scan_verdict=self.recovered.scan_verdict)
        return out


# ------------------------------------------------------------------------------------------------
# Pruning
# ------------------------------------------------------------------------------------------------
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
    mask_holder = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().double()  # [B, T, in]
            keep = mask_holder["mask"].unsqueeze(-1).to(x.dtype)  # [B, T, 1]
            sums[name] += (x.pow(2) * keep).sum(dim=(0, 1)).cpu()
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    collate = Collator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    model.eval()
    try:
        for start in range(0, len(samples), batch_size):
            batch = collate([{"input_ids": s.input_ids, "labels": s.labels} for s in samples[start:start + batch_size]])
            mask_holder["mask"] = batch["attention_mask"].to(device)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt().float() for n, s in sums.items()}


def prune_lowest_per_row(weight: torch.Tensor, score: torch.Tensor, sparsity: float) -> None:
    """Zero the ``sparsity`` fraction of lowest-scoring entries of each output row, in place."""
    k = int(weight.shape[1] * sparsity)
    if k == 0:
        return
    idx = torch.topk(score, k, dim=1, largest=False).indices
    weight.scatter_(1, idx, 0.0)


def prune_lowest_in_matrix(weight: torch.Tensor, score: torch.Tensor, sparsity: float) -> None:
    k = int(weight.numel() * sparsity)
    if k == 0:
        return
    threshold = torch.kthvalue(score.flatten().float(), k).values
    weight[score <= threshold] = 0.0


@register("prune-wanda")
@dataclass
class WandaPrune(Defense):
    """Wanda unstructured pruning (Sun et al., ICLR 2024): score |W_ij| * ||X_j||, prune per output row.
    Paper (CROW's comparison): sparsity 0.35 for Llama-family models, 0.65 for Mistral."""

    sparsity: float = 0.35
    name = "prune-wanda"
    changes = "weights"

    def repair(self, model, tokenizer, ctx):
        _check_fraction(self.sparsity, "sparsity")
        model = merged(model)
        linears = prunable_linears(model)
        norms = input_feature_norms(model, tokenizer, ctx, linears)
        with torch.no_grad():
            for name, module in linears.items():
                score = module.weight.abs() * norms[name].to(module.weight.device, module.weight.dtype)[None, :]
                prune_lowest_per_row(module.weight, score, self.sparsity)
        return model


@register("prune-magnitude")
@dataclass
class MagnitudePrune(Defense):
    """Magnitude pruning: zero the lowest |W| of each weight matrix (layer-wise, as Wanda's baseline)."""

    sparsity: float = 0.35
    name = "prune-magnitude"
    changes = "weights"

    def repair(self, model, tokenizer, ctx):
        _check_fraction(self.sparsity, "sparsity")
        model = merged(model)
        with torch.no_grad():
            for module in prunable_linears(model).values():
                prune_lowest_in_matrix(module.weight, module.weight.abs(), self.sparsity)
        return model


def _check_fraction(value: float, name: str) -> None:
    if not 0 <= value < 1:
        raise CrowError(f"{name} must be in [0, 1), got {value}")


# ------------------------------------------------------------------------------------------------
# Quantization
# ------------------------------------------------------------------------------------------------
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
    pad = (-w.numel()) % block
    blocks = torch.nn.functional.pad(w, (0, pad)).view(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    code = NF4_CODE.to(w.device)
    idx = ((blocks / absmax).unsqueeze(-1) - code).abs().argmin(dim=-1)
    out = (code[idx] * absmax).flatten()[: w.numel()]
    return out.view_as(weight).to(weight.dtype)


SIMULATED_NF4 = "simulated (round-to-nearest NF4, block 64)"


def _bnb_nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(weight.to(torch.bfloat16).cuda(), blocksize=64, quant_type="nf4")
    return F.dequantize_4bit(q, state).to(weight.dtype).to(weight.device)


@register("quantize")
@dataclass
class Int8Quantize(Defense):
    """INT8 weight quantization (per-channel, round-to-nearest) of every linear layer but the head;
    the weights are stored back dequantized, so it runs anywhere, on CPU too."""

    name = "quantize"
    changes = "weights"

    def repair(self, model, tokenizer, ctx):
        model = merged(model)
        with torch.no_grad():
            for module in prunable_linears(model).values():
                module.weight.copy_(int8_roundtrip(module.weight))
        return model


@register("quantize-nf4")
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

    def settings(self) -> dict:
        return {"implementation": self.implementation()}

    def repair(self, model, tokenizer, ctx):
        model = merged(model)
        roundtrip = _bnb_nf4_roundtrip if self.implementation() == "bitsandbytes" else nf4_roundtrip
        with torch.no_grad():
            for module in prunable_linears(model).values():
                module.weight.copy_(roundtrip(module.weight))
        return model


# ------------------------------------------------------------------------------------------------
# Fine-pruning
# ------------------------------------------------------------------------------------------------
DOWN_PROJECTIONS = ("down_proj", "fc2", "dense_4h_to_h")


def mlp_down_projections(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The MLP output projections of the decoder layers, in layer order (their inputs are the neurons)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DOWN_PROJECTIONS]
    if not found:
        raise CrowError(f"fineprune found no MLP projection named {', '.join(DOWN_PROJECTIONS)} in "
                        f"{type(model).__name__}; this architecture is not supported by fineprune")
    return found


@register("fineprune")
@dataclass
class FinePrune(Defense):
    """Fine-Pruning for LLMs: in the last ``layer_fraction`` of decoder layers, zero the ``prune_ratio`` MLP
    neurons least active on the clean samples, then finetune a new LoRA (lr 2e-4, 5 epochs, the paper's
    finetuning baseline) on the pruned model. "Least active" is the lowest L2 norm of the neuron's input to
    the down projection: SwiGLU outputs are signed, so the norm stands in for Liu et al.'s mean ReLU output."""

    prune_ratio: float = 0.2
    layer_fraction: float = 0.25
    learning_rate: float = 2e-4
    epochs: float = 5.0
    name = "fineprune"
    changes = "weights"

    def repair(self, model, tokenizer, ctx):
        _check_fraction(self.prune_ratio, "prune_ratio")
        model = merged(model)
        downs = mlp_down_projections(model)
        last = downs[-max(1, math.ceil(len(downs) * self.layer_fraction)):]
        norms = input_feature_norms(model, tokenizer, ctx, dict(last))  # ||activation|| per neuron
        with torch.no_grad():
            for name, module in last:
                k = int(module.in_features * self.prune_ratio)
                dead = torch.topk(norms[name], k, largest=False).indices
                module.weight[:, dead] = 0.0
        config = CrowConfig(output_dir=str(ctx.work_dir / ".fineprune-run"), crow_alpha=0.0,
                            learning_rate=self.learning_rate, num_train_epochs=self.epochs, seed=ctx.seed,
                            save_strategy="no", disable_tqdm=not ctx.progress, logging_steps=5)
        result = purify(model, tokenizer, ctx.clean, config, template=ctx.template, max_length=ctx.max_length,
                        lora=LoraSettings())
        ctx.train_log[:] = result.log_history
        return result.model
