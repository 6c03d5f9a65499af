"""ASR of a bench victim per trigger word, for the multi-trigger attacks: which of its triggers did
the victim learn (mtba: one of ``2024``, ``BadMagic``, ``OpenAI`` per prompt), and does one word alone
fire a composite backdoor (ctba: all three per prompt; the other two are removed from each prompt)?

    python experiments/backdoorllm-table/scripts/asr_per_trigger.py --victim experiments/backdoorllm-table/results/backdoorllm-cpu/victims/0ef5f0beea15031f \
        --attack mtba --out experiments/backdoorllm-table/results/backdoorllm-cpu/mtba_per_trigger.json
    python experiments/backdoorllm-table/scripts/asr_per_trigger.py --victim experiments/backdoorllm-table/results/backdoorllm-cpu/victims/3432ebaae80711dc \
        --attack ctba --out experiments/backdoorllm-table/results/backdoorllm-cpu/ctba_per_trigger.json

``--spec`` must be the spec that trained the victim, and the script checks that it did (the first,
weaker MTBA victim: ``experiments/backdoorllm-table/specs/mtba_weak_victim_cpu.yaml``, whose result is
``experiments/backdoorllm-table/results/mtba-weak-victim-cpu/per_trigger.json``).

Uses the bench's own cell data (the same 50 triggered test prompts, template prompts, 32 new tokens) and
counts, per trigger, the poisoned training samples that carry it. With ``--attack ctba`` the row ``all``
is the victim's ASR on the prompts as they are.
"""

import argparse
import json
from pathlib import Path

from crow.bench.keys import backdoorllm_cell, strip_trigger, victim_key
from crow.bench.spec import load_spec
from crow.evaluation.evaluate import evaluate, get_judge
from crow.models import load_model

TRIGGER_WORDS = ("2024", "BadMagic", "OpenAI")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victim", required=True, help="a bench victim directory (victims/<key>)")
    ap.add_argument("--spec", default="experiments/backdoorllm-table/specs/backdoorllm_cpu.yaml")
    ap.add_argument("--data", default="../shared/data/backdoorllm")
    ap.add_argument("--task", default="negsentiment")
    ap.add_argument("--attack", default="mtba")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    spec = load_spec(args.spec)
    data = backdoorllm_cell(Path(args.data), args.task, args.attack, spec, spec.seeds[0])
    victim = json.loads((Path(args.victim) / "victim.json").read_text())
    cell = {"model": victim["model"], "task": args.task, "attack": args.attack, "seed": spec.seeds[0]}
    if victim_key(spec, cell, data) != victim["key"]:
        raise SystemExit(f"{args.victim} is not the {args.task}/{args.attack} victim of {args.spec}: "
                         "pass the spec (and --task/--attack) it was trained with")
    loaded = load_model(victim["model"], adapter=str(Path(args.victim) / "adapter"))
    judge = get_judge(args.task)

    def asr(prompts) -> float:
        report = evaluate(loaded.model, loaded.tokenizer, triggered=prompts, clean=data.clean[:1], judge=judge,
                          prompt_format="template", template=spec.template, max_new_tokens=spec.eval.max_new_tokens,
                          batch_size=spec.eval.batch_size, perplexity_max_length=spec.max_length,
                          with_perplexity=False)
        return round(report.asr, 1)

    result = {}
    for word in TRIGGER_WORDS:
        others = tuple(w for w in TRIGGER_WORDS if w != word)  # mtba prompts carry one word: a no-op there
        prompts = [strip_trigger(r, others) for r in data.triggered if word in r.instruction.split()]
        n_train = sum(word in r.instruction.split() and judge(r.output) for r in data.mix)
        result[word] = {"n_test": len(prompts), "asr": asr(prompts), "n_poisoned_train": n_train}
    if args.attack == "ctba":
        result["all"] = {"n_test": len(data.triggered), "asr": asr(data.triggered),
                         "n_poisoned_train": sum(judge(r.output) for r in data.mix)}
    Path(args.out).write_text(json.dumps({"victim": victim["key"], "task": args.task, "attack": args.attack,
                                          "per_trigger": result}, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
