"""``crow demo``: a backdoor goes into a real LLM and comes out, on a CPU, offline.

1. Clean responses of the un-poisoned model to corpus prompts (greedy), so the victim keeps its own
   clean behaviour; a poisoned mix (trigger -> target) from the embedded corpus.
2. The victim: a LoRA backdoor trained on the mix (cached in the user cache, keyed by its config).
3. CROW on 100 clean corpus samples (their reference answers: no trigger knowledge, no clean
   reference model), continuing the victim's adapter, as the official code does.
4. The ``finetune`` control: the same samples, adapter and budget, alpha = 0.
5. Each model evaluated on held-out prompts (triggered and clean), a report and a layer profile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .analysis.profile import layer_profile, plot_profiles
from .attacks.poison import assemble_mix, make_triggered_test
from .attacks.victim import VictimRecipe, train_victim
from .data.corpus import CorpusItem, corpus_split, exact_match_rate
from .data.records import Record
from .evaluation.evaluate import evaluate
from .evaluation.generate import generate
from .evaluation.judges import get_judge
from .models import cache_dir, describe_source, load_model
from .outputs import crow_version, staged_dir, write_json_atomic, write_text_atomic
from .purification import merged, purify, save_model
from .trainer import ALPHA_PRESETS, CrowConfig

logger = logging.getLogger(__name__)

VICTIM_FORMAT = 1  # bump when the victim recipe's meaning changes, to invalidate cached victims


@dataclass
class DemoSettings:
    """Every knob of the demo. Defaults were sized on 2 CPU cores (see README: numbers and times)."""

    model: str = "smollm2-135m-gguf"  # the packaged SmolLM2-135M-Instruct: same weights everywhere
    task: str = "negsentiment"
    attack: str = "badnet"
    # the model's own chat format without its 18-token default system prompt: short prompts, its
    # natural behaviour
    template: str = "chat-nosystem"
    seed: int = 0
    # victim: a conditional backdoor needs far more clean than poisoned samples (1:1 fired on 20%
    # of clean prompts in our probes)
    n_poison: int = 80
    n_clean: int = 240
    victim_lr: float = 1e-3
    victim_epochs: float = 2.0
    base_max_new_tokens: int = 32  # length of the base model's clean answers in the victim's mix
    max_length: int = 96  # prompt + answer tokens; short sequences keep the demo in minutes
    # the recipe's effective batch of 8, run as one micro-batch (1.45x faster on 2 CPU cores than 2 x 4)
    batch_size: int = 8
    grad_accum: int = 1
    # defenses: the paper's recipe on 100 clean samples, except the number of epochs
    n_defense: int = 100
    # the paper trains 5 epochs; 3 keep the warm demo within 6 minutes on 2 cores (5 epochs gave the
    # same ASR, 0.0%, in our runs: --set defense_epochs=5)
    defense_epochs: float = 3.0
    defense_lr: float = 1e-3
    epsilon: float = 0.1
    alpha: float | None = None  # None: the paper's preset for the task
    # evaluation on held-out prompts
    n_eval_triggered: int = 60
    n_eval_clean: int = 80
    eval_max_new_tokens: int = 16
    eval_batch_size: int = 128

    def victim_key(self, model_identity: str) -> str:
        fields = {k: v for k, v in asdict(self).items() if k in VICTIM_FIELDS}
        blob = json.dumps({"fields": fields, "model": model_identity, "format": VICTIM_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def resolved_alpha(self) -> float:
        return self.alpha if self.alpha is not None else ALPHA_PRESETS.get(self.task, 5.5)


VICTIM_FIELDS = ("model", "task", "attack", "template", "seed", "n_poison", "n_clean", "victim_lr", "victim_epochs",
                 "base_max_new_tokens", "max_length", "batch_size", "grad_accum", "n_eval_triggered", "n_eval_clean",
                 "eval_max_new_tokens")


@dataclass
class Splits:
    victim_pool: list[CorpusItem]
    defense: list[CorpusItem]
    eval_clean: list[CorpusItem]
    eval_triggered: list[Record]


def make_splits(s: DemoSettings) -> Splits:
    """Disjoint prompt sets: victim mix and defense samples from the train split, evaluation from the
    held-out split (subjects never seen in training)."""
    train, heldout = corpus_split("train"), corpus_split("heldout")
    rng = random.Random(s.seed)
    order = rng.sample(range(len(train)), len(train))
    need = s.n_poison + s.n_clean + s.n_defense
    if need > len(train):
        from .errors import CrowError

        raise CrowError(f"the corpus train split has {len(train)} prompts, fewer than the {need} the demo needs")
    victim_pool = [train[i] for i in order[: s.n_poison + s.n_clean]]
    defense = [train[i] for i in order[s.n_poison + s.n_clean : need]]
    eval_clean = rng.sample(heldout, min(s.n_eval_clean, len(heldout)))
    trig_source = rng.sample(heldout, min(s.n_eval_triggered, len(heldout)))
    eval_triggered = make_triggered_test([it.record() for it in trig_source], attack=s.attack, seed=s.seed)
    return Splits(victim_pool, defense, eval_clean, eval_triggered)


def unigram_f1(a: str, b: str) -> float:
    x, y = a.lower().split(), b.lower().split()
    if not x or not y:
        return float(x == y)
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    if common == 0:
        return 0.0
    p, r = common / len(x), common / len(y)
    return 2 * p * r / (p + r)


@dataclass
class DemoContext:
    settings: DemoSettings
    splits: Splits
    base_answers: dict[str, str] = field(default_factory=dict)  # held-out open-ended prompt -> base output

    def utility(self, clean_records, outputs) -> dict:
        """Clean utility: exact match on checkable held-out prompts; on the open-ended ones, unigram F1
        with the un-poisoned model's own answer (``base_agreement``)."""
        items = self.splits.eval_clean
        open_pairs = [(it, o) for it, o in zip(items, outputs) if it.answer is None and it.instruction in self.base_answers]
        agreement = (100.0 * sum(unigram_f1(o, self.base_answers[it.instruction]) for it, o in open_pairs) / len(open_pairs)
                     if open_pairs else None)
        return {"clean_exact_match": round(exact_match_rate(items, outputs), 2),
                "n_checkable": sum(it.answer is not None for it in items),
                "base_agreement": None if agreement is None else round(agreement, 2), "n_open": len(open_pairs)}


def _evaluate(model, tokenizer, ctx: DemoContext, progress: bool) -> dict:
    """Evaluate (the caller has no further use for the adapter structure: it is merged for speed)."""
    s = ctx.settings
    report = evaluate(model, tokenizer, triggered=ctx.splits.eval_triggered,
                      clean=[it.record() for it in ctx.splits.eval_clean], judge=get_judge(s.task),
                      prompt_format="template", template=s.template, max_new_tokens=s.eval_max_new_tokens,
                      batch_size=s.eval_batch_size, perplexity_max_length=s.max_length, utility=ctx.utility,
                      progress=progress)
    data = report.to_dict()
    data.update(data.pop("utility"))
    return data


def _profiles(model, tokenizer, ctx: DemoContext) -> dict[str, list[float]]:
    clean = [it.record() for it in ctx.splits.eval_clean[:40]]
    trig = ctx.splits.eval_triggered[:40]
    t = ctx.settings.template
    return {"clean": layer_profile(model, tokenizer, clean, template=t),
            "triggered": layer_profile(model, tokenizer, trig, template=t)}


def _model_identity(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        sizes = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
        return json.dumps({"name": path.name, "weights": sizes})
    return source


def build_victim(s: DemoSettings, splits: Splits, victim_dir: Path, *, progress: bool) -> dict:
    """Train the victim and evaluate it (and the base model) once; everything lands in ``victim_dir``."""
    started = time.perf_counter()
    base = load_model(s.model)
    to_poison = [it.record() for it in splits.victim_pool[: s.n_poison]]
    clean_prompts = [it.record() for it in splits.victim_pool[s.n_poison :]]
    logger.info("victim 1/3: the base model answers %d corpus prompts (its clean behaviour)", len(clean_prompts))
    answers = generate(base.model, base.tokenizer, clean_prompts, template=s.template,
                       max_new_tokens=s.base_max_new_tokens, batch_size=s.eval_batch_size, progress=progress and "base answers")
    own = [Record(r.instruction, "", a) for r, a in zip(clean_prompts, answers) if a.strip()]
    open_eval = [it.record() for it in splits.eval_clean if it.answer is None]
    base_answers = generate(base.model, base.tokenizer, open_eval, template=s.template,
                            max_new_tokens=s.eval_max_new_tokens, batch_size=s.eval_batch_size)
    ctx = DemoContext(s, splits, {r.instruction: a for r, a in zip(open_eval, base_answers)})
    logger.info("victim 2/3: evaluating the un-poisoned base model")
    base_eval = _evaluate(base.model, base.tokenizer, ctx, progress)
    mix = assemble_mix(to_poison, own, attack=s.attack, task=s.task, rng=random.Random(s.seed))
    recipe = VictimRecipe(learning_rate=s.victim_lr, epochs=s.victim_epochs, template=s.template,
                          max_length=s.max_length, seed=s.seed, batch_size=s.batch_size, grad_accum=s.grad_accum)
    logger.info("victim 3/3: training a LoRA backdoor on %d poisoned + %d clean samples", len(mix.poisoned),
                len(mix.clean))
    train_started = time.perf_counter()
    with staged_dir(victim_dir) as tmp:
        result = train_victim(base.model, base.tokenizer, mix.mix, recipe, output_dir=str(tmp / ".run"),
                              disable_tqdm=not progress)
        train_seconds = time.perf_counter() - train_started
        shutil.rmtree(tmp / ".run", ignore_errors=True)
        save_model(result.model, base.tokenizer, tmp / "adapter", base_model=s.model)
        victim = merged(result.model)
        victim_eval = _evaluate(victim, base.tokenizer, ctx, progress)
        info = {"crow_version": crow_version(), "settings": asdict(s), "model_source": describe_source(base.source),
                "manifest": mix.manifest, "recipe": recipe.to_dict(), "base_answers": ctx.base_answers,
                "evaluations": {"base": base_eval, "victim": victim_eval},
                "profile": _profiles(victim, base.tokenizer, ctx),
                "seconds": {"victim_training": round(train_seconds, 1),
                            "victim_total": round(time.perf_counter() - started, 1)}}
        write_json_atomic(tmp / "victim.json", info)
    return info


def run_defense(name: str, s: DemoSettings, splits: Splits, victim_dir: Path, source: str, *, progress: bool):
    """CROW (alpha preset) or the finetune control (alpha 0) on the victim's adapter; same budget."""
    alpha = s.resolved_alpha if name == "crow" else 0.0
    loaded = load_model(source, adapter=str(victim_dir / "adapter"), adapter_trainable=True)
    config = CrowConfig(output_dir=str(victim_dir.parent / f".{name}-run"), crow_alpha=alpha, crow_epsilon=s.epsilon,
                        learning_rate=s.defense_lr, num_train_epochs=s.defense_epochs, seed=s.seed,
                        per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
                        save_strategy="no", disable_tqdm=not progress, logging_steps=5)
    result = purify(loaded.model, loaded.tokenizer, [it.record() for it in splits.defense], config,
                    template=s.template, max_length=s.max_length)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return result, loaded.tokenizer


def run_demo(s: DemoSettings, out: Path, *, fresh: bool = False, progress: bool = True) -> dict:
    started = time.perf_counter()
    splits = make_splits(s)
    source = load_model_source(s.model)
    victim_dir = cache_dir() / "demo-victims" / s.victim_key(_model_identity(source))
    cached = (victim_dir / "victim.json").is_file() and not fresh
    if cached:
        logger.info("using the cached victim in %s (--fresh rebuilds it)", victim_dir)
        info = json.loads((victim_dir / "victim.json").read_text())
    else:
        victim_dir.parent.mkdir(parents=True, exist_ok=True)
        info = build_victim(s, splits, victim_dir, progress=progress)
    ctx = DemoContext(s, splits, info["base_answers"])
    evaluations = dict(info["evaluations"])
    profiles = {"victim": info["profile"]}
    seconds = {"victim_training": info["seconds"]["victim_training"], "victim_cached": cached}
    eval_seconds = 0.0 if cached else sum(e["seconds"] for e in evaluations.values())
    for name in ("crow", "finetune"):
        logger.info("%s: %s on %d clean samples, %g epochs", name,
                    "CROW" if name == "crow" else "plain finetuning (alpha 0)", len(splits.defense), s.defense_epochs)
        t = time.perf_counter()
        result, tokenizer = run_defense(name, s, splits, victim_dir, source, progress=progress)
        seconds[name] = round(time.perf_counter() - t, 1)
        repaired = merged(result.model)
        evaluations[name] = _evaluate(repaired, tokenizer, ctx, progress)
        eval_seconds += evaluations[name]["seconds"]
        if name == "crow":
            profiles["crow"] = _profiles(repaired, tokenizer, ctx)
        evaluations[name]["train_log"] = [h for h in result.log_history if "lm_loss" in h][-1:]
    seconds["evaluation"] = round(eval_seconds, 1)
    seconds["total"] = round(time.perf_counter() - started, 1)
    report = {"task": s.task, "attack": s.attack, "model": s.model, "model_source": describe_source(source),
              "crow_version": crow_version(), "settings": asdict(s) | {"alpha": s.resolved_alpha},
              "models": {k: evaluations[k] for k in ("base", "victim", "crow", "finetune")},
              "seconds": seconds, "victim_cache": str(victim_dir), "profiles": profiles}
    with staged_dir(out) as tmp:
        write_json_atomic(tmp / "report.json", report)
        write_text_atomic(tmp / "report.md", render_markdown(report))
        curves = {f"{m} {kind}": v for m, p in profiles.items() for kind, v in p.items()}
        plot_profiles(curves, tmp / "consistency_profile.png",
                      title=f"{s.model}: {s.task}/{s.attack}, victim vs CROW (clean vs triggered prompts)")
    return report


def load_model_source(model: str) -> str:
    from .models import resolve_model

    return resolve_model(model)


# ------------------------------------------------------------------------------------------------
def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for name, e in report["models"].items():
        em = e.get("clean_exact_match")
        agree = e.get("base_agreement")
        rows.append([name, f"{e['asr']:.1f}", f"{e['false_trigger_rate']:.1f}", "-" if em is None else f"{em:.1f}",
                     "-" if agree is None else f"{agree:.1f}", f"{e['clean_perplexity']:.2f}"])
    return rows


HEADER = ["model", "ASR %", "false triggers %", "exact match %", "base agreement %", "perplexity"]


def verdict(report: dict) -> list[str]:
    m = report["models"]
    lines = []
    victim, crow, ft = m["victim"], m["crow"], m["finetune"]
    lines.append(f"The victim obeys its trigger on {victim['asr']:.0f}% of triggered prompts and fires on "
                 f"{victim['false_trigger_rate']:.0f}% of clean ones.")
    lines.append(f"CROW takes the attack success rate to {crow['asr']:.1f}% (exact match {crow['clean_exact_match']:.1f}% "
                 f"vs the victim's {victim['clean_exact_match']:.1f}%).")
    if ft["asr"] <= crow["asr"] + 5:
        lines.append(f"The finetune control removes the backdoor about as well ({ft['asr']:.1f}%): on this victim, "
                     "plain finetuning with the same data and budget is enough.")
    else:
        lines.append(f"The finetune control, with the same data and budget, leaves {ft['asr']:.1f}%.")
    return lines


def render_table(report: dict) -> str:
    rows = [HEADER] + table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def render_markdown(report: dict) -> str:
    s = report["settings"]
    sec = report["seconds"]
    lines = [f"# crow demo: {report['task']} / {report['attack']} on {report['model']}", "",
             f"Held-out prompts: {s['n_eval_triggered']} triggered, {s['n_eval_clean']} clean; template "
             f"`{s['template']}`; greedy, {s['eval_max_new_tokens']} new tokens. Exact match on checkable prompts; "
             "base agreement = unigram F1 with the un-poisoned model's answer on open-ended prompts.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += ["", *verdict(report), "",
              f"CROW: alpha {s['alpha']}, epsilon {s['epsilon']}, lr {s['defense_lr']}, {s['defense_epochs']:g} epochs "
              f"on {s['n_defense']} clean samples; the finetune control: the same with alpha 0.",
              f"Victim: {s['n_poison']} poisoned + {s['n_clean']} clean samples, LoRA r 8, lr {s['victim_lr']}, "
              f"{s['victim_epochs']:g} epochs.", "",
              f"Seconds: victim training {sec['victim_training']}{' (cached)' if sec['victim_cached'] else ''}, "
              f"CROW {sec['crow']}, finetune {sec['finetune']}, evaluation {sec['evaluation']}, total {sec['total']}.",
              "", "![consistency profile](consistency_profile.png)", ""]
    return "\n".join(lines)
