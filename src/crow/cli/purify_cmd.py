"""crow purify: CROW (or another training defense, ``--method``) on clean samples -> a PEFT adapter (or
merged model) + crow_config.json."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from ..detection.scan import STOP_RULES
from ..errors import CrowError, Interrupted
from .common import add_model_arguments, check_file, load_from_args, load_yaml_config, nonneg_float, positive_int

logger = logging.getLogger(__name__)


def _layers(text: str) -> str:
    from ..losses import parse_layer_range

    if text not in ("official", "all"):
        try:
            parse_layer_range(text)
        except CrowError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _choice(*valid: str):
    def parse(text: str) -> str:
        if text not in valid:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(valid)}")
        return text
    return parse


def nonneg_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {value}")
        return value
    return parse


def _bool(text) -> bool:
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


#: crow.unlearn.RETAIN_CHOICES, spelled out: importing crow.unlearn here would load transformers for every command
RETAIN_CHOICES = ("references", "suspect", "both")
#: crow.unlearn.ADVERSARIES, spelled out for the same reason
ADVERSARIES = ("residual", "tokens")
#: the registered training defenses ``--method`` runs (crow.defenses); each sets its own lr and alpha defaults
METHODS = ("crow", "finetune", "finetune-lr1e-3", "unlearn")
#: options that only one method reads; giving one to another method is an error, not silently ignored
CROW_OPTIONS = {"alpha", "epsilon", "layers", "token_scope"}
UNLEARN_OPTIONS = {"target", "unlearn_layer", "radius", "pgd_steps", "beta", "gamma", "target_tokens", "scan_stop_rule",
                   "retain", "retain_topk", "adversary", "soft_tokens", "token_radius", "token_step",
                   "token_init", "holdout", "select_from", "select_by", "cycle_epochs", "finetune_cycles",
                   "refit_gain", "refit_epochs", "refit_alpha", "refit_order", "refit_teacher", "teacher_only"}
METHOD_OPTIONS = {"crow": CROW_OPTIONS, "finetune": set(), "finetune-lr1e-3": set(), "unlearn": UNLEARN_OPTIONS}

# name: (parser, default, help). Defaults are the official CROW recipe. Each can be set on the
# command line (--name-with-dashes) or in --config YAML (name: value); the command line wins.
OPTIONS = {
    "method": (_choice(*METHODS), "crow", "training defense: crow, finetune (alpha 0, lr 2e-4), finetune-lr1e-3, "
               "or unlearn (BAIT-recovered target + universal adversary + unlikelihood)"),
    "alpha": (nonneg_float("--alpha"), None, "consistency weight; default 5.5, or the --task preset (refusal: 11)"),
    "epsilon": (nonneg_float("--epsilon"), 0.1, "FGSM step on the input embeddings (paper: 0.1; 0 = no perturbation)"),
    "layers": (_layers, "official", "layer pairs: official (hs[1:-2] vs hs[2:-1]), all, or START:STOP"),
    "token_scope": (_choice("all", "masked"), "all", "average over all positions (official) or real tokens only"),
    "lr": (nonneg_float("--lr"), 1e-3, "learning rate (paper: 1e-3; --method finetune: 2e-4)"),
    "epochs": (nonneg_float("--epochs"), 5.0, "epochs over the clean set (paper: 5)"),
    "max_steps": (int, -1, "stop after this many optimizer steps (-1: use --epochs)"),
    "batch_size": (positive_int("--batch-size"), 2, "per-device batch size (paper: 2)"),
    "grad_accum": (positive_int("--grad-accum"), 4, "gradient accumulation steps (paper: 4)"),
    "warmup": (nonneg_float("--warmup"), 0.1, "warmup: a ratio if < 1, else steps (paper: 0.1)"),
    "scheduler": (str, "cosine", "learning-rate schedule (paper: cosine)"),
    "max_length": (positive_int("--max-length"), 512, "truncate samples to this many tokens"),
    "template": (_choice("alpaca", "chat", "chat-nosystem"), "alpaca", "prompt template of the clean samples"),
    "limit": (positive_int("--limit"), None, "use only the first N records of --data (paper: 100 samples)"),
    "lora_r": (positive_int("--lora-r"), 8, "LoRA rank of a new adapter (paper: 8)"),
    "lora_alpha": (positive_int("--lora-alpha"), 16, "LoRA alpha of a new adapter (paper: 16)"),
    "lora_dropout": (nonneg_float("--lora-dropout"), 0.0, "LoRA dropout of a new adapter (paper: 0)"),
    "seed": (int, 42, "random seed"),
    "save_steps": (positive_int("--save-steps"), 20, "checkpoint every N optimizer steps (for --resume)"),
    "logging_steps": (positive_int("--logging-steps"), 5, "log CROW's metrics every N optimizer steps"),
    "gradient_checkpointing": (_bool, False, "non-reentrant activation checkpointing (saves memory)"),
    "bf16": (_bool, False, "bf16 mixed precision (GPU)"),
    "full_finetune": (_bool, False, "train all weights instead of a LoRA adapter"),
    "merge": (_bool, False, "write the merged full model instead of the adapter"),
    "target": (str, None, "unlearn: the target text to unlearn, an oracle experiment (a defender knows no target); "
               "default: recovered by BAIT from --data"),
    "unlearn_layer": (nonneg_int("--unlearn-layer"), None, "unlearn: decoder layer of the adversary "
                      "(default: num_hidden_layers // 4)"),
    "radius": (nonneg_float("--radius"), 0.5, "unlearn: ||delta|| budget, a fraction of the mean prompt hidden norm"),
    "pgd_steps": (nonneg_int("--pgd-steps"), 2, "unlearn: PGD steps on delta per micro-step"),
    "beta": (nonneg_float("--beta"), 1.0, "unlearn: weight of LM(clean | delta)"),
    "gamma": (nonneg_float("--gamma"), 1.0, "unlearn: weight of the target's unlikelihood under delta"),
    "target_tokens": (positive_int("--target-tokens"), 8, "unlearn: first target tokens unlearned"),
    "scan_stop_rule": (_choice(*STOP_RULES), "entropy", "unlearn: BAIT's stop rule when it recovers the "
                       "target (crow scan --stop-rule): entropy, or official (the official code's)"),
    "retain": (_choice(*RETAIN_CHOICES), "references", "unlearn: what keeps the clean answers: references (LM on "
               "--data's answers), suspect (KL to the input model's own answer distributions) or both"),
    "adversary": (_choice(*ADVERSARIES), "residual", "unlearn: where the adversary acts: residual (one vector added "
                  "to --unlearn-layer's output at every prompt position, BEEAR) or tokens (--soft-tokens free "
                  "embeddings inserted at a random point of each prompt, SANDE)"),
    "soft_tokens": (positive_int("--soft-tokens"), 6, "unlearn --adversary tokens: how many soft tokens"),
    "token_radius": (nonneg_float("--token-radius"), 1.0, "unlearn --adversary tokens: each soft token's norm "
                     "budget, a fraction of the mean token-embedding norm of the prompts"),
    "token_step": (nonneg_float("--token-step"), 0.1, "unlearn --adversary tokens: PGD step, a fraction of that budget"),
    "token_init": (_choice("prompt", "zeros"), "prompt", "unlearn --adversary tokens: the soft tokens' start: "
                   "prompt (embeddings of clean-prompt tokens) or zeros (SANDE's)"),
    "holdout": (nonneg_int("--holdout"), 0, "unlearn: clean samples held out of training to choose the epoch whose "
                "weights are kept (best --select-by score; 0: the last epoch)"),
    "select_from": (nonneg_float("--select-from"), 2.0, "unlearn --holdout: the first epoch that may be kept"),
    "select_by": (_choice("nll", "rougeL"), "nll", "unlearn --holdout: what scores the held-out samples: nll (of "
                  "their answers) or rougeL (of the model's greedy answers against theirs, the answer-quality score)"),
    "finetune_cycles": (_bool, False, "unlearn --cycle-epochs: the cycles after the first are plain finetuning on "
                        "the clean samples (no adversary), kept only while they improve the held-out answers"),
    "cycle_epochs": (nonneg_int("--cycle-epochs"), 0, "unlearn --holdout: restart the lr schedule every N epochs, "
                     "keep the best cycle end, stop at the first that does not improve (0: one schedule)"),
    "refit_gain": (nonneg_float("--refit-gain"), 0.0, "unlearn --finetune-cycles: when the unlearning cycle lowered "
                   "the held-out perplexity below the input model's by more than this fraction, finetune on every "
                   "sample of --data for --refit-epochs instead of the finetuning cycles (0: never)"),
    "refit_epochs": (nonneg_float("--refit-epochs"), 5.0, "unlearn --refit-gain: epochs of that finetuning (the "
                     "recipe's 5)"),
    "refit_alpha": (nonneg_float("--refit-alpha"), 0.0, "unlearn --refit-gain: CROW's consistency weight in that "
                    "finetuning (0: plain finetuning, as finetune-lr1e-3; 5.5: CROW's)"),
    "refit_order": (_choice("after", "before"), "after", "unlearn --refit-gain: after (finetune the unlearned "
                    "weights) or before (finetune the input model's weights, then unlearn again from them, keeping "
                    "their answers)"),
    "refit_teacher": (_bool, False, "unlearn --refit-gain: refit the input model's weights into a teacher first, "
                      "then finetune the unlearned weights towards the clean samples and the teacher's answers"),
    "teacher_only": (_bool, False, "unlearn --refit-teacher: the unlearned weights learn from the teacher's answers "
                     "alone, not the clean samples' references too"),
    "retain_topk": (positive_int("--retain-topk"), 32, "unlearn: tokens of the input model's distribution kept per "
                    "answer position for --retain suspect / both"),
}
FLAGS = {"gradient_checkpointing", "bf16", "full_finetune", "merge", "finetune_cycles", "refit_teacher", "teacher_only"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="clean samples: JSON list or JSONL of instruction/input/output")
    p.add_argument("--out", required=True, help="output directory (must not be the model or adapter directory)")
    p.add_argument("--task", help="target task (negsentiment, refusal, codeinjection): picks the paper's alpha")
    p.add_argument("--config", help="YAML file of options (names as below, with _); the command line wins")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    g = p.add_argument_group("CROW and training (defaults: the official recipe)")
    for name, (parse, default, text) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if name in FLAGS:
            g.add_argument(flag, action="store_const", const=True, default=None, help=f"{text}")
        else:
            g.add_argument(flag, type=parse, default=None, help=f"{text} (default: {default})")


def resolve_options(args) -> dict:
    """defaults < the method's defaults < --config YAML < command line, every value checked by the option's
    own parser; an option that the chosen ``--method`` does not read is an error."""
    values = {name: default for name, (_, default, _) in OPTIONS.items()}
    given = {}
    for name, raw in load_yaml_config(args.config, set(OPTIONS)).items():
        parse = OPTIONS[name][0]
        try:
            given[name] = raw if raw is None else parse(raw if isinstance(raw, bool) and name in FLAGS else str(raw))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise CrowError(f"--config {args.config}: {name}: {e}") from None
    for name in OPTIONS:
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    method = given.get("method") or values["method"]
    values.update(method_defaults(method))
    values.update(given)
    foreign = sorted(n for n in given if n in (CROW_OPTIONS | UNLEARN_OPTIONS) - METHOD_OPTIONS[method])
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        raise CrowError(f"{flags} does not apply to --method {method}; its own options: "
                        f"{', '.join('--' + n.replace('_', '-') for n in sorted(METHOD_OPTIONS[method])) or 'none'}")
    return values


def method_defaults(method: str) -> dict:
    """The registered defense's own defaults: finetune's alpha 0 and lr 2e-4, unlearn's lr."""
    from ..defenses import get_defense

    defense = get_defense(method)
    out = {"lr": defense.learning_rate}
    if method in ("finetune", "finetune-lr1e-3"):
        out["alpha"] = defense.alpha
    return out


def run(args) -> int:
    from ..data.records import load_records
    from ..outputs import check_output_dir, crow_version, git_revision, sha256_file, staged_dir, write_json_atomic
    from ..trainer import ALPHA_PRESETS

    opts = resolve_options(args)
    method = opts["method"]
    if args.task is not None and args.task not in ALPHA_PRESETS:
        raise CrowError(f"unknown task {args.task!r}; valid: {', '.join(ALPHA_PRESETS)}")
    if method == "unlearn":
        for name in CROW_OPTIONS:
            opts.pop(name)
    else:
        for name in UNLEARN_OPTIONS:
            opts.pop(name)
        if opts["alpha"] is None:
            opts["alpha"] = ALPHA_PRESETS.get(args.task, 5.5)
    if opts["full_finetune"] and args.adapter:
        raise CrowError("--full-finetune and --adapter contradict each other: CROW continues training the given "
                        "adapter; merge it into the model first to finetune all weights")
    if opts["merge"] and opts["full_finetune"]:
        logger.info("--merge has no effect with --full-finetune: the full model is written anyway")
    check_file(args.data, "--data")
    records = load_records(args.data, what="--data")
    if opts["limit"]:
        records = records[: opts["limit"]]
    if opts.get("holdout") and opts["holdout"] >= len(records):
        raise CrowError(f"--holdout {opts['holdout']} leaves no training sample: --data {args.data} has {len(records)} "
                        "records; hold out fewer (e.g. a fifth)")
    out = check_output_dir(args.out, inputs=[args.model, args.adapter, args.data],
                           overwrite=args.overwrite or args.resume)
    partial = out.parent / f".{out.name}.crow-partial"  # checkpoints of an unfinished run
    resume = _find_checkpoint(partial) if args.resume else None
    if args.resume and resume is None:
        raise CrowError(f"--resume: no interrupted run of --out {out} was found (expected checkpoints in {partial})")
    if not args.resume and partial.exists():
        raise CrowError(f"an interrupted run of --out {out} exists ({partial}); pass --resume to continue it "
                        "or delete that directory")

    config = _crow_config(opts, partial)
    started = time.perf_counter()
    loaded = load_from_args(args, adapter_trainable=True)
    from ..models import describe_source
    from ..purification import LoraSettings, purify, save_model, settings_dict

    lora = LoraSettings(r=opts["lora_r"], alpha=opts["lora_alpha"], dropout=opts["lora_dropout"])
    trainer = {}
    target = None
    try:
        if method == "unlearn":
            from ..unlearn import UnlearnTrainer

            target = _unlearn_target(loaded, records, opts, partial, resume)
            trainer = {"trainer_cls": UnlearnTrainer, "trainer_kwargs": {"target_ids": target["token_ids"],
                                                                       "processing_class": loaded.tokenizer}}
        result = purify(loaded.model, loaded.tokenizer, records, config, template=opts["template"],
                        max_length=opts["max_length"], full_finetune=opts["full_finetune"], lora=lora,
                        resume_from_checkpoint=str(resume) if resume else None, handle_signals=True, **trainer)
    except Interrupted:
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # only an interrupt leaves a resumable run behind
        raise
    if not result.is_main_process:  # under accelerate launch, the main process writes the result
        return 0
    with staged_dir(out) as tmp:
        kind = save_model(result.model, loaded.tokenizer, tmp, merge=opts["merge"], base_model=args.model)
        final = [h for h in result.log_history if "lm_loss" in h]
        selection = [h for h in result.log_history if "holdout_nll" in h or "selected_epoch" in h]  # --holdout
        write_json_atomic(tmp / "crow_config.json", {
            "crow_version": crow_version(), "git_revision": git_revision(), "method": method, "seed": opts["seed"],
            "paper": PAPERS["unlearn" if method == "unlearn" else "crow"],
            **({"target": target} if target is not None else {}),
            "output": kind, "model": args.model, "model_source": describe_source(loaded.source), "adapter": args.adapter,
            "data": str(Path(args.data).resolve()), "data_sha256": sha256_file(args.data), "n_records": len(records),
            "n_train_samples": result.train_samples, "task": args.task, "options": opts,
            "training_arguments": settings_dict(config), "optimizer_steps": result.global_step,
            "num_processes": result.num_processes,
            "seconds": round(time.perf_counter() - started, 2), "train_seconds": result.seconds,
            "resumed": bool(resume), "last_log": final[-1] if final else None,
            **({"epoch_selection": selection} if selection else {}),
        })
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("wrote the purified %s to %s (%d optimizer steps, %.0f s)", kind, out, result.global_step,
                result.seconds)
    print(json.dumps({"out": str(out), "output": kind, "optimizer_steps": result.global_step,
                      "seconds": result.seconds}))
    return 0


PAPERS = {
    "crow": "Min, Pham, Li, Sun. CROW: Eliminating Backdoors from LLMs via Internal Consistency Regularization. "
            "ICML 2025 (arXiv 2411.12768)",
    "unlearn": "target-inverted adversarial unlearning: BAIT (Shen et al., IEEE S&P 2025) target inversion, a BEEAR-style "
               "universal residual-stream adversary (Zeng et al. 2024), unlikelihood (Welleck et al., ICLR 2020)",
}


def _unlearn_target(loaded, records, opts: dict, partial: Path, resume) -> dict:
    """The target ``--method unlearn`` unlearns: --target (an oracle), else BAIT's on --data. Kept beside the
    checkpoints, so a resumed run unlearns the same target without scanning again."""
    from dataclasses import asdict

    from ..defenses.registry import recover_target
    from ..detection.scan import BaitSettings
    from ..outputs import write_json_atomic

    saved = partial / "unlearn_target.json"
    if resume and saved.is_file():
        return json.loads(saved.read_text(encoding="utf-8"))
    recovered = asdict(recover_target(loaded.model, loaded.tokenizer, records, template=opts["template"],
                                      target=opts["target"], target_tokens=opts["target_tokens"],
                                      scan_settings=BaitSettings(stop_rule=opts["scan_stop_rule"])))
    recovered["oracle"] = recovered["source"] == "oracle"
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, recovered)
    return recovered


def _find_checkpoint(partial: Path) -> Path | None:
    checkpoints = sorted(partial.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    return checkpoints[-1] if checkpoints else None


def _crow_config(opts: dict, partial: Path):
    from ..trainer import CrowConfig

    try:
        if opts["method"] == "unlearn":
            return _build_unlearn_config(opts, partial)
        return _build_config(CrowConfig, opts, partial)
    except CrowError:
        raise
    except ValueError as e:  # TrainingArguments' own checks (e.g. bf16 without a GPU, unknown scheduler)
        raise CrowError(f"invalid training options: {str(e).strip().splitlines()[0]}") from None


def _recipe(opts: dict, partial: Path) -> dict:
    """The Trainer fields every method shares."""
    return dict(
        output_dir=str(partial), learning_rate=opts["lr"], num_train_epochs=opts["epochs"],
        max_steps=opts["max_steps"], per_device_train_batch_size=opts["batch_size"],
        gradient_accumulation_steps=opts["grad_accum"], warmup_steps=opts["warmup"], lr_scheduler_type=opts["scheduler"],
        seed=opts["seed"], save_strategy="steps", save_steps=opts["save_steps"], save_total_limit=1,
        logging_steps=opts["logging_steps"], gradient_checkpointing=opts["gradient_checkpointing"], bf16=opts["bf16"],
    )


def _build_config(CrowConfig, opts: dict, partial: Path):
    return CrowConfig(crow_alpha=opts["alpha"], crow_epsilon=opts["epsilon"], crow_layers=opts["layers"],
                      crow_token_scope=opts["token_scope"], **_recipe(opts, partial))


def _build_unlearn_config(opts: dict, partial: Path):
    from ..unlearn import UnlearnConfig

    return UnlearnConfig(unlearn_layer=opts["unlearn_layer"], unlearn_radius=opts["radius"],
                         unlearn_pgd_steps=opts["pgd_steps"], unlearn_beta=opts["beta"], unlearn_gamma=opts["gamma"],
                         unlearn_target_tokens=opts["target_tokens"], unlearn_retain=opts["retain"],
                         unlearn_retain_topk=opts["retain_topk"], unlearn_adversary=opts["adversary"],
                         unlearn_soft_tokens=opts["soft_tokens"], unlearn_token_radius=opts["token_radius"],
                         unlearn_token_step=opts["token_step"], unlearn_token_init=opts["token_init"],
                         unlearn_holdout=opts["holdout"], unlearn_select_from=opts["select_from"],
                         unlearn_cycle_epochs=opts["cycle_epochs"],
                         unlearn_finetune_cycles=opts["finetune_cycles"], unlearn_select_by=opts["select_by"],
                         unlearn_refit_gain=opts["refit_gain"], unlearn_refit_epochs=opts["refit_epochs"],
                         unlearn_refit_alpha=opts["refit_alpha"], unlearn_refit_order=opts["refit_order"],
                         unlearn_refit_teacher=opts["refit_teacher"], unlearn_teacher_only=opts["teacher_only"],
                         **_recipe(opts, partial))
