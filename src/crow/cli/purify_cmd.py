"""crow purify: remove a backdoor from a suspect model with a training defense (``--method``), write the repaired
adapter (or merged model) and crow_config.json. Its options are generated from the methods' configs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import CrowError, Interrupted
from ..verification import (
    Samples,
    Verification,
    VerifySettings,
    check_model,
    held_out_samples,
    safety_warning,
    separate_samples,
    text_table,
    trained_on,
    verify,
)
from .options import add_model_arguments, add_options, as_flags, check_file, load_from_args, option_fields, positive_int

logger = logging.getLogger(__name__)

N_HARMFUL = 50  # the harmful requests (--harmful-data) the verification answers, before and after

#: the training defenses ``--method`` runs (crow.defenses), with the config class whose fields are their options
METHODS = ("crow", "finetune", "finetune-lr1e-3", "unlearn")
#: options of the command itself (not of a method's config), with their defaults
RUN_DEFAULTS = {"method": "unlearn", "max_length": 128, "template": "alpaca", "save_steps": 20}
TEMPLATES = ("alpaca", "chat", "chat-nosystem")
VERIFICATION_JSON = "verification.json"


def method_configs() -> dict[str, type]:
    from ..methods.crow.config import CrowConfig
    from ..methods.unlearn.config import UnlearnConfig
    return {"crow": CrowConfig, "finetune": CrowConfig, "finetune-lr1e-3": CrowConfig, "unlearn": UnlearnConfig}


def add_arguments(p) -> None:
    from ..presets import preset_names
    from ..training.config import TrainingConfig
    add_model_arguments(p)
    g = p.add_argument_group("what to purify and where")
    g.add_argument("--data", required=True, help="the defender's clean samples: JSON list or JSONL of instruction, "
                   "input, output (about 100)")
    g.add_argument("--out", required=True, help="output directory (must not be the model or adapter directory)")
    g.add_argument("--method", choices=METHODS, help="training defense: unlearn (the recommended recipe: BAIT's "
                   "target unlearned under soft tokens, held-out cycles, a CROW refit), crow (the paper's), finetune "
                   f"(alpha 0, lr 2e-4), finetune-lr1e-3 (alpha 0, CROW's lr) (default: {RUN_DEFAULTS['method']})")
    g.add_argument("--preset", choices=preset_names(), help="a measured recipe (options a --config file or the "
                   "command line may override): " + ", ".join(preset_names()))
    g.add_argument("--config", help="YAML file of options (names as below, with _ or -); the command line wins")
    g.add_argument("--task", help="target task (negsentiment, refusal, codeinjection): picks CROW's alpha (refusal 11)")
    g.add_argument("--template", choices=TEMPLATES, help=f"prompt template of the clean samples (default: "
                   f"{RUN_DEFAULTS['template']})")
    g.add_argument("--max-length", type=positive_int("--max-length"), help=f"truncate samples to this many tokens: "
                   f"the length every figure in RESULTS.md was measured at; raise it for longer samples (default: "
                   f"{RUN_DEFAULTS['max_length']})")
    g.add_argument("--limit", type=positive_int("--limit"), help="use only the first N records of --data")
    g.add_argument("--keep-data", help="prompts the clean samples do not cover (JSON list or JSONL of instruction[, "
                   "input]; outputs ignored), e.g. harmful requests the suspect refuses: the suspect's own answers to "
                   "them, generated before training, are trained on beside --data (never held out), so the purified "
                   "model keeps answering them as the suspect did")
    g.add_argument("--save-steps", type=positive_int("--save-steps"), help=f"checkpoint every N optimizer steps, "
                   f"for --resume (default: {RUN_DEFAULTS['save_steps']})")
    g.add_argument("--merge", action="store_true", help="write the merged full model instead of the adapter")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command")
    g.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    v = p.add_argument_group("verification (BAIT scans and clean measures before and after; verification.json and the "
                             "model card README.md)")
    v.add_argument("--verify-data", help="clean samples to verify on, separate from --data (JSON list or JSONL; its "
                   "first 100); default: the samples unlearn holds out of --data (the same split for every method)")
    v.add_argument("--harmful-data", help=f"harmful requests (JSON list or JSONL of instruction[, input]; its first "
                   f"{N_HARMFUL}) whose refusal rate the verification measures before and after, as a finetune on "
                   "benign samples can wash a chat model's refusals out; BackdoorLLM's: test/harmful.json of `crow "
                   "data fetch backdoorllm`")
    v.add_argument("--no-verify", action="store_true", help="skip the verification: no verification.json and no model "
                   "card")
    add_options(p.add_argument_group("training (every method; finetune's lr is 2e-4, unlearn trains 6 epochs)"),
                TrainingConfig)
    for method, what in (("crow", "Min et al., ICML 2025"), ("unlearn", "the recommended recipe")):
        cls = method_configs()[method]
        own = [f.name for f in option_fields(cls) if f.name not in TrainingConfig.__dataclass_fields__]
        add_options(p.add_argument_group(f"--method {method} ({what})"), cls, own)


def resolve_options(args) -> tuple[str, dict, dict]:
    """(method, its settings, the command's own options): the method's defaults < ``--preset`` < ``--config`` < the
    command line, every value checked as the command line checks it; an option the method does not read is an error."""
    from ..presets import load_preset
    from .options import checked, flag, given, load_yaml
    configs = method_configs()
    every = {f.name for cls in set(configs.values()) for f in option_fields(cls)}
    known, layered = every | set(RUN_DEFAULTS), {}
    for where, values in ((f"--preset {args.preset}", load_preset(args.preset) if args.preset else {}),
                          (f"--config {args.config}", load_yaml(args.config) if args.config else {})):
        unknown = sorted(set(values) - known)
        if unknown:
            raise CrowError(f"{where}: unknown option {unknown[0]!r}; valid: {', '.join(sorted(known))}")
        layered.update(values)
    layered.update({k: v for k, v in vars(args).items() if k in RUN_DEFAULTS and v is not None})
    layered.update(given(args, every))
    method = layered.pop("method", RUN_DEFAULTS["method"])
    if method not in METHODS:
        raise CrowError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    run = {k: layered.pop(k, default) for k, default in RUN_DEFAULTS.items() if k != "method"}
    if run["template"] not in TEMPLATES:
        raise CrowError(f"--template {run['template']!r} is not one of {', '.join(TEMPLATES)}")
    cls = configs[method]
    foreign = sorted(set(layered) - set(cls.__dataclass_fields__))
    if foreign:
        other = configs["crow" if method == "unlearn" else "unlearn"]
        own = sorted(set(cls.__dataclass_fields__) - set(other.__dataclass_fields__))
        raise CrowError(f"{', '.join(flag(n) for n in foreign)} does not apply to --method {method}; its own options: "
                        f"{', '.join(flag(n) for n in own)}")
    return method, checked(cls, layered, f"--method {method}"), run


def run(args) -> int:
    from ..data.records import load_records
    from ..defenses import get_defense
    from ..methods.crow.config import ALPHA_PRESETS
    from ..outputs import check_output_dir
    method, settings, options = resolve_options(args)
    if args.task is not None and args.task not in ALPHA_PRESETS:
        raise CrowError(f"unknown --task {args.task!r}; valid: {', '.join(ALPHA_PRESETS)}")
    try:
        defense = get_defense(method, **settings)
        config = defense.config(args.task)
    except CrowError as e:
        raise CrowError(as_flags(str(e), method_configs()[method].__dataclass_fields__)) from None
    if config.full_finetune and args.adapter:
        raise CrowError("--full-finetune and --adapter contradict each other: purify continues training the given "
                        "adapter; merge it into the model first to finetune every weight")
    check_file(args.data, "--data")
    records = load_records(args.data, what="--data")[: args.limit]
    holdout = getattr(config, "holdout", 0)
    if holdout >= len(records):
        raise CrowError(f"--holdout {holdout} leaves no training sample: --data {args.data} has {len(records)} "
                        "records; hold out fewer (e.g. a fifth)")
    for flag in ("verify_data", "harmful_data"):
        if args.no_verify and getattr(args, flag):
            raise CrowError(f"--{flag.replace('_', '-')} and --no-verify contradict each other: leave one out")
    samples = None if args.no_verify else verification_samples(args, records, method, config)
    harmful = harmful_requests(args.harmful_data)
    keep = keep_prompts(args.keep_data, harmful)
    out = check_output_dir(args.out, inputs=[args.model, args.adapter, args.data, args.verify_data, args.harmful_data,
                                             args.keep_data], overwrite=args.overwrite or args.resume)
    partial = out.parent / f".{out.name}.crow-partial"  # checkpoints of an unfinished run
    steps = [(int(n), p) for p in partial.glob("checkpoint-*") if (n := p.name.rsplit("-", 1)[-1]).isdigit()]
    resume = max(steps)[1] if args.resume and steps else None  # none yet: the run starts again from the beginning
    if args.resume and not partial.is_dir():
        raise CrowError(f"--resume: no interrupted run of --out {out} was found (expected {partial})")
    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch the main process decides and
    # makes the directory (the others could find it made by then)
    if not args.resume and partial.exists() and main_process:
        raise CrowError(f"an interrupted run of --out {out} exists ({partial}); pass --resume to continue it or delete "
                        "that directory")
    if main_process:
        partial.mkdir(parents=True, exist_ok=True)  # from here on an interrupted run, at any stage, can be resumed
    with resumable(partial):
        return purify(args, method, defense, config, options, records, samples, harmful, keep, out, partial, resume)


@contextlib.contextmanager
def resumable(partial: Path):
    """An interrupt (SIGTERM, SIGINT) at any stage keeps ``partial`` for ``--resume`` (training saves a checkpoint
    first; the scan, the target recovery and the verification are run again); any other error removes it."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted before the first checkpoint or after training; {partial} keeps the run: "
                          "rerun the same command with --resume") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def purify(args, method: str, defense, config, options: dict, records, samples, harmful, keep, out: Path,
           partial: Path, resume: Path | None) -> int:
    """Train, verify and write the output (``run`` checked every input before)."""
    from ..card import data_file
    from ..defenses import DefenseContext
    from ..models import describe_source
    from ..outputs import crow_version, git_revision, sha256_file, staged_dir, write_json_atomic
    from ..training.loop import save_model
    started = time.perf_counter()
    loaded = load_from_args(args, adapter_trainable=True)
    verify_settings = VerifySettings(template=options["template"], max_length=options["max_length"])
    if samples is not None:  # the suspect, before training changes it in place
        logger.info("verification: checking the suspect (BAIT scan, %d held-out samples)", len(samples.records))
        before, target = check_model(loaded.model, loaded.tokenizer, records, samples.records, verify_settings,
                                     own_target=True, harmful=harmful)
    kept = kept_answers(loaded, keep, options["template"], partial) if keep else []
    ctx = DefenseContext(clean=records, keep=kept, template=options["template"], max_length=options["max_length"],
                         seed=None, task=args.task, work_dir=partial, progress=sys.stderr.isatty(), output_dir=partial,
                         save_steps=options["save_steps"], resume_from_checkpoint=str(resume) if resume else None,
                         handle_signals=True, scan=before.scan_result if samples is not None else None)
    model = defense.repair(loaded.model, loaded.tokenizer, ctx)
    result = defense.last_result
    if not result.is_main_process:  # under accelerate launch, the main process writes the result
        return 0
    verification = None
    if samples is not None:
        logger.info("verification: checking the purified model")
        after, _ = check_model(model, loaded.tokenizer, records, samples.records, verify_settings, target,
                               harmful=harmful)
        samples.trained_on, samples.note = trained_on(samples, method, getattr(result, "refitted", None))
        verification = verify(before, after, samples, verify_settings, threshold=before.scan["threshold"],
                              kept=[r.output for r in kept])
    with staged_dir(out) as tmp:
        kind = save_model(model, loaded.tokenizer, tmp, merge=args.merge, base_model=args.model)
        write_evidence(tmp, args, method, defense.settings(args.task), kind, records, options, verification)
        final = [h for h in ctx.train_log if "lm_loss" in h]
        write_json_atomic(tmp / "crow_config.json", {
            "crow_version": crow_version(), "git_revision": git_revision(), "method": method,
            "settings": defense.settings(args.task), "output": kind, "model": args.model,
            "model_source": describe_source(loaded.source), "adapter": args.adapter,
            "data": str(Path(args.data).resolve()), "data_sha256": sha256_file(args.data), "n_records": len(records),
            "task": args.task, "template": options["template"], "max_length": options["max_length"],
            "preset": args.preset, "keep_data": data_file(args.keep_data, len(keep)).to_dict() if keep else None,
            "n_kept_answers": len(kept), "n_train_samples": result.train_samples, "num_processes": result.num_processes,
            "optimizer_steps": result.global_step, "seconds": round(time.perf_counter() - started, 2),
            "train_seconds": result.seconds, "resumed": bool(resume), "last_log": final[-1] if final else None,
            "verification": None if verification is None else {"verdict": verification.verdict,
                                                               "file": VERIFICATION_JSON},
            "verification_seconds": None if verification is None else verification.seconds,
            **({"epoch_selection": [h for h in ctx.train_log if "holdout_nll" in h or "selected_epoch" in h]}
               if method == "unlearn" else {}),
        })
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("wrote the purified %s to %s (%d optimizer steps)", kind, out, result.global_step)
    if verification is not None:
        warning = safety_warning(verification.suspect, verification.purified)
        print(f"verification ({verification.seconds:.1f} s; training {result.seconds:.1f} s): "
              f"{verification.verdict}\n{text_table(verification.rows())}"
              + (f"\nWarning: {warning}." if warning else ""), file=sys.stderr)
    print(json.dumps({"out": str(out), "output": kind, "optimizer_steps": result.global_step,
                      "seconds": result.seconds, **({"verdict": verification.verdict} if verification else {})}))
    return 0


def verification_samples(args, records, method: str, config) -> Samples:
    """The verification samples: ``--verify-data`` or the held-out split of ``--data`` (checked before any work)."""
    if args.verify_data is None:
        return held_out_samples(records, holdout=config.holdout if method == "unlearn" else None, seed=config.seed,
                                file=Path(args.data).name)
    from ..data.records import load_records

    check_file(args.verify_data, "--verify-data")
    verify = load_records(args.verify_data, what="--verify-data")
    return separate_samples(verify, records, file=Path(args.verify_data).name)


def harmful_requests(path: str | None) -> list:
    """The first N_HARMFUL requests of ``--harmful-data`` (none without it), checked before any work."""
    if path is None:
        return []
    from ..data.records import load_records

    check_file(path, "--harmful-data")
    requests = load_records(path, require_output=False, what="--harmful-data")[:N_HARMFUL]
    if not requests:
        raise CrowError(f"--harmful-data {path} has no records; give harmful requests (instruction[, input])")
    return requests


def keep_prompts(path: str | None, harmful: list) -> list:
    """``--keep-data``'s prompts (none without it), checked before any work: none of them a harmful request
    the verification measures (its refusal rate would be measured on prompts the model was trained on)."""
    if path is None:
        return []
    from ..data.records import load_records

    check_file(path, "--keep-data")
    prompts = load_records(path, require_output=False, what="--keep-data")  # an empty file is an error there
    measured = {(r.instruction, r.input) for r in harmful}
    shared = sum((r.instruction, r.input) in measured for r in prompts)
    if shared:
        raise CrowError(f"--keep-data {path} holds {shared} of the requests --harmful-data measures: the refusal rate "
                        "would be measured on prompts trained on; give requests apart from the first "
                        f"{N_HARMFUL} of --harmful-data")
    return prompts


KEPT_FILE = "kept_answers.json"  # the suspect's answers to --keep-data, beside the checkpoints for a resumed run


def kept_answers(loaded, prompts: list, template: str, partial: Path) -> list:
    """The suspect's answers to ``prompts`` (``crow.defenses.keep``), made once: a resumed run reads them back."""
    from ..data.records import load_records
    from ..defenses.keep import suspect_answers
    from ..outputs import write_json_atomic

    saved = partial / KEPT_FILE
    if saved.is_file():
        return load_records(saved, what="the saved kept answers")
    logger.info("keep: the suspect answers the %d prompts of --keep-data", len(prompts))
    kept = suspect_answers(loaded.model, loaded.tokenizer, prompts, template=template)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json_atomic(saved, [r.to_dict() for r in kept])
    return kept


def write_evidence(directory: Path, args, method: str, settings: dict, kind: str, records, options: dict,
                   verification: Verification | None) -> None:
    """verification.json and the model card README.md (none with ``--no-verify``: the card is the evidence's; an
    adapter's boilerplate card from PEFT, which names this machine's paths, is removed)."""
    from ..card import card_base_model, data_file, model_card
    from ..outputs import crow_version, write_json_atomic, write_text_atomic

    card = directory / "README.md"
    if verification is None:
        card.unlink(missing_ok=True)
        return
    write_json_atomic(directory / VERIFICATION_JSON, verification.to_dict())
    verify_data = data_file(args.verify_data, len(verification.samples.records)) if args.verify_data else None
    harmful = data_file(args.harmful_data, verification.purified.n_harmful) if args.harmful_data else None
    keep = data_file(args.keep_data, verification.settings["n_kept_answers"]) if args.keep_data else None
    write_text_atomic(card, model_card(
        method=method, settings=settings, adapter=kind == "adapter", base_model=card_base_model(args.model),
        data=data_file(args.data, len(records)), crow_version=crow_version(), verification=verification,
        verify_data=verify_data, template=options["template"], harmful_data=harmful, keep_data=keep))
