"""``crow demo``: a backdoor goes into a real LLM and comes out, on a CPU, offline. The victim: a LoRA backdoor trained
on a poisoned mix of the embedded corpus plus the un-poisoned model's own answers (cached, keyed by its config). CROW on
100 clean corpus samples continues the victim's adapter, as the official code does; the ``finetune`` control is the
same with alpha 0. Each model is evaluated on held-out prompts."""

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
from .attacks.poison import VictimRecipe, assemble_mix, make_triggered_test, train_victim
from .data.corpus import CorpusItem, corpus_split, exact_match_rate
from .data.records import Record
from .errors import CrowError
from .evaluation.evaluate import evaluate, generate, get_judge
from .methods import crow
from .methods.crow.config import ALPHA_PRESETS
from .models import cache_dir, describe_source, load_model, resolve_model
from .outputs import crow_version, staged_dir, write_json_atomic, write_text_atomic
from .training.loop import RunOptions, merged, save_model

logger = logging.getLogger(__name__)

VICTIM_FORMAT = 1  # bump when the victim recipe's meaning changes, to invalidate cached victims


@dataclass
class DemoSettings:
    """Every knob of the demo, sized for 2 CPU cores."""

    model: str = "smollm2-135m-gguf"  # the packaged SmolLM2-135M-Instruct: same weights everywhere
    task: str = "negsentiment"
    attack: str = "badnet"
    template: str = "chat-nosystem"  # the model's own chat format without its default system prompt
    seed: int = 0
    # victim: a conditional backdoor needs far more clean than poisoned samples
    n_poison: int = 80
    n_clean: int = 240
    victim_lr: float = 1e-3
    victim_epochs: float = 2.0
    base_max_new_tokens: int = 32  # length of the base model's clean answers in the victim's mix
    max_length: int = 96  # prompt + answer tokens; short sequences keep the demo in minutes
    batch_size: int = 8  # the recipe's effective batch of 8, as one micro-batch
    grad_accum: int = 1
    # defenses: the paper's recipe on 100 clean samples, but 3 epochs instead of 5 to keep the demo in minutes
    n_defense: int = 100
    defense_epochs: float = 3.0
    defense_lr: float = 1e-3
    epsilon: float = 0.1
    alpha: float | None = None  # None: the paper's preset for the task
    # evaluation on held-out prompts
    n_eval_triggered: int = 60
    n_eval_clean: int = 80
    eval_max_new_tokens: int = 16
    eval_batch_size: int = 128

    def victim_key(self, source: str) -> str:
        """A hash of the victim's settings and of the model at ``source`` (a directory: its name and weight sizes)."""
        fields = {k: v for k, v in asdict(self).items() if k in VICTIM_FIELDS}
        path = Path(source)
        weights = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
        model = json.dumps({"name": path.name, "weights": weights}) if path.is_dir() else source
        blob = json.dumps({"fields": fields, "model": model, "format": VICTIM_FORMAT}, sort_keys=True)
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
    """Disjoint prompt sets: victim mix and defense samples from the train split, evaluation from the held-out one."""
    train, heldout = corpus_split("train"), corpus_split("heldout")
    rng = random.Random(s.seed)
    order = rng.sample(range(len(train)), len(train))
    need = s.n_poison + s.n_clean + s.n_defense
    if need > len(train):
        raise CrowError(f"the corpus train split has {len(train)} prompts, fewer than the {need} the demo needs")
    chosen = [train[i] for i in order[:need]]
    eval_clean = rng.sample(heldout, min(s.n_eval_clean, len(heldout)))
    trig_source = rng.sample(heldout, min(s.n_eval_triggered, len(heldout)))
    return Splits(chosen[: s.n_poison + s.n_clean], chosen[s.n_poison + s.n_clean :], eval_clean,
                  make_triggered_test([it.record() for it in trig_source], attack=s.attack, seed=s.seed))


def unigram_f1(a: str, b: str) -> float:
    x, y = a.lower().split(), b.lower().split()
    if not x or not y:
        return float(x == y)
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    p, r = common / len(x), common / len(y)
    return 2 * p * r / (p + r) if common else 0.0


@dataclass
class DemoContext:
    settings: DemoSettings
    splits: Splits
    base_answers: dict[str, str] = field(default_factory=dict)  # held-out open-ended prompt -> base output

    def utility(self, clean_records, outputs) -> dict:
        """Clean utility: exact match on checkable held-out prompts; on the open-ended ones, unigram F1
        with the un-poisoned model's own answer (``base_agreement``)."""
        items, base = self.splits.eval_clean, self.base_answers
        open_pairs = [(it, o) for it, o in zip(items, outputs) if it.answer is None and it.instruction in base]
        agreement = (100.0 * sum(unigram_f1(o, base[it.instruction]) for it, o in open_pairs) / len(open_pairs)
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
    t = ctx.settings.template
    return {"clean": layer_profile(model, tokenizer, [it.record() for it in ctx.splits.eval_clean[:40]], template=t),
            "triggered": layer_profile(model, tokenizer, ctx.splits.eval_triggered[:40], template=t)}


def build_victim(s: DemoSettings, splits: Splits, victim_dir: Path, *, progress: bool) -> dict:
    """Train the victim and evaluate it (and the base model) once; everything lands in ``victim_dir``."""
    started = time.perf_counter()
    base = load_model(s.model)
    to_poison = [it.record() for it in splits.victim_pool[: s.n_poison]]
    clean_prompts = [it.record() for it in splits.victim_pool[s.n_poison :]]
    logger.info("victim 1/3: the base model answers %d corpus prompts (its clean behaviour)", len(clean_prompts))
    answers = generate(base.model, base.tokenizer, clean_prompts, template=s.template, batch_size=s.eval_batch_size,
                       max_new_tokens=s.base_max_new_tokens, progress=progress and "base answers")
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


def run_demo(s: DemoSettings, out: Path, *, fresh: bool = False, progress: bool = True) -> dict:
    started = time.perf_counter()
    splits = make_splits(s)
    source = resolve_model(s.model)
    victim_dir = cache_dir() / "demo-victims" / s.victim_key(source)
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
    for name in ("crow", "finetune"):  # CROW (alpha preset) or the control (alpha 0) on the victim's adapter
        logger.info("%s: %s on %d clean samples, %g epochs", name,
                    "CROW" if name == "crow" else "plain finetuning (alpha 0)", len(splits.defense), s.defense_epochs)
        t = time.perf_counter()
        loaded = load_model(source, adapter=str(victim_dir / "adapter"), adapter_trainable=True)
        config = crow.CrowConfig(alpha=s.resolved_alpha if name == "crow" else 0.0, epsilon=s.epsilon,
                                 learning_rate=s.defense_lr, epochs=s.defense_epochs, seed=s.seed,
                                 batch_size=s.batch_size, grad_accum=s.grad_accum)
        run = RunOptions(output_dir=str(victim_dir.parent / f".{name}-run"), template=s.template,
                         max_length=s.max_length, progress=progress)
        result = crow.run(loaded.model, loaded.tokenizer, [it.record() for it in splits.defense], config, run)
        shutil.rmtree(run.output_dir, ignore_errors=True)
        seconds[name] = round(time.perf_counter() - t, 1)
        repaired = merged(result.model)
        evaluations[name] = _evaluate(repaired, loaded.tokenizer, ctx, progress)
        eval_seconds += evaluations[name]["seconds"]
        if name == "crow":
            profiles["crow"] = _profiles(repaired, loaded.tokenizer, ctx)
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


def table_rows(report: dict) -> list[list[str]]:
    return [[name, f"{e['asr']:.1f}", f"{e['false_trigger_rate']:.1f}",
             *("-" if e.get(k) is None else f"{e[k]:.1f}" for k in ("clean_exact_match", "base_agreement")),
             f"{e['clean_perplexity']:.2f}"] for name, e in report["models"].items()]


HEADER = ["model", "ASR %", "false triggers %", "exact match %", "base agreement %", "perplexity"]


def verdict(report: dict) -> list[str]:
    victim, crow, ft = (report["models"][k] for k in ("victim", "crow", "finetune"))
    lines = [f"The victim obeys its trigger on {victim['asr']:.0f}% of triggered prompts and fires on "
             f"{victim['false_trigger_rate']:.0f}% of clean ones.",
             f"CROW takes the attack success rate to {crow['asr']:.1f}% (exact match {crow['clean_exact_match']:.1f}% "
             f"vs the victim's {victim['clean_exact_match']:.1f}%)."]
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
    s, sec = report["settings"], report["seconds"]
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
