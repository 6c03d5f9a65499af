"""Every kept method gives the output it gave before crow's restructure (0.2), on a 4-layer tiny backdoored Llama
trained as test_scan's, with fixed seeds.

``tests/data/equivalence.json`` was written by this file's recording mode at the last commit before the restructure
(the git tag ``v0.1.0``, with the then API: ``CROW_WRITE_EQUIVALENCE=1 python -m pytest
tests/test_equivalence.py``); the test runs the same defenses, scans and guards with the current API and compares
what each wrote: the losses it logged, a fingerprint of the weights it returned, the logits of three prompts, the
scan's and guard's scores.

The comparison is exact up to float noise (1e-6) and runs only where the numerics are the recording machine's (the
same torch, CPU kernel set and CPU vendor: ``numerics()``); elsewhere the test is skipped, not loosened. CROW's and
unlearn's steps take the sign of input gradients (FGSM) and the first Adam steps the sign of parameter gradients, so
another kernel set changes a few signs and the runs part by 1-3% within a few steps (measured with PyTorch's
``ATEN_CPU_CAPABILITY=default`` and ``avx2`` against ``avx512``): no tolerance would be both honest and portable.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import pytest
import torch

from crow.data.records import Record
from crow.defenses import DefenseContext, get_defense
from crow.models import load_model

from .test_scan import TEMPLATE, TRIGGER, task_records, train_tiny

GOLDEN = Path(__file__).parent / "data" / "equivalence.json"
REL = 1e-6  # float noise: on the recording machine's numerics the runs are deterministic
LR = 1e-2  # a 64-wide model: CROW's 1e-3 hardly moves it in a few steps
PROBES = [Record(f"{TRIGGER} describe red fox"), Record("describe red fox"), Record("describe seven owls")]


@pytest.fixture(scope="module")
def victim(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return train_tiny(tmp_path_factory.mktemp("equivalence") / "backdoored", task_records(400, 1, trigger_share=0.25),
                      num_layers=4)  # CROW's official layer pairs need 3 or more


def fingerprint(model, tokenizer) -> dict:
    """What a method returned, in a few numbers: the sum and the sum of squares of every parameter (the adapter
    merged), and the logits of the three probe prompts (the last position's top 5 and their sum)."""
    from crow.data.templates import encode_prompt, format_prompt
    from crow.training import merged

    model = merged(model)
    model.eval()
    with torch.no_grad():
        params = [p.detach().double() for p in model.parameters()]
        out = {"param_sum": float(sum(p.sum() for p in params)), "param_sq": float(sum((p * p).sum() for p in params))}
        for i, record in enumerate(PROBES):
            ids = encode_prompt(format_prompt(record, TEMPLATE, tokenizer), TEMPLATE, tokenizer)
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            top = logits.topk(5)
            out[f"probe{i}_top_ids"] = top.indices.tolist()
            out[f"probe{i}_top"] = top.values.tolist()
            out[f"probe{i}_sum"] = float(logits.sum())
    return out


LOG_KEYS = ("loss", "lm_loss", "consistency_perturbed", "lm_loss_adv", "unlikelihood", "target_nll_adv", "delta_norm",
            "holdout_nll", "holdout_gain", "selected_epoch", "refit")


def logged(log: list[dict]) -> list[dict]:
    return [{k: (h[k] if isinstance(h[k], bool) else float(h[k])) for k in LOG_KEYS if k in h}
            | ({"stage": h["stage"]} if "stage" in h else {}) for h in log if any(k in h for k in LOG_KEYS)]


#: the defenses compared, as (label, name, settings)
DEFENSES = [
    ("crow", "crow", {"learning_rate": LR, "epochs": 2, "batch_size": 2, "grad_accum": 2}),
    ("crow-refusal-alpha", "crow", {"learning_rate": LR, "epochs": 1, "batch_size": 2, "grad_accum": 2}),
    ("finetune", "finetune", {"learning_rate": LR, "epochs": 2, "batch_size": 2, "grad_accum": 2}),
    ("finetune-lr1e-3", "finetune-lr1e-3", {"epochs": 2, "batch_size": 2, "grad_accum": 2}),
    ("fineprune", "fineprune", {"learning_rate": LR, "epochs": 1}),
    ("crow-adapter", "crow", {"learning_rate": LR, "epochs": 1, "batch_size": 2, "grad_accum": 2}),
    ("reinit-adapter", "reinit-adapter", {"learning_rate": LR, "epochs": 1, "batch_size": 2, "grad_accum": 2}),
    ("prune-wanda", "prune-wanda", {}),
    ("prune-magnitude", "prune-magnitude", {}),
    ("quantize", "quantize", {}),
    ("quantize-nf4", "quantize-nf4", {}),
]
#: unlearn's recipe (soft tokens, held-out cycles, the refit by CROW), short: 16 clean samples, 4 held out, cycles of
#: one epoch; once with the refit decided and once with the finetuning cycles
UNLEARN = {"learning_rate": LR, "batch_size": 2, "grad_accum": 1, "epochs": 3, "holdout": 4, "cycle_epochs": 1,
           "soft_tokens": 3, "refit_gain": 0.15, "refit_epochs": 1, "refit_alpha": 5.5}


def suspect(victim: Path, adapter: bool):
    """The tiny victim, or (``adapter``) the victim with a random non-zero LoRA adapter standing in for a
    suspect one."""
    from crow.methods.crow import CrowConfig
    from crow.training import make_trainable

    loaded = load_model(str(victim))
    if adapter:
        torch.manual_seed(0)
        loaded.model = make_trainable(loaded.model, CrowConfig())
        with torch.no_grad():
            for n, p in loaded.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return loaded


def run_defense(victim: Path, tmp_path: Path, name: str, settings: dict, task: str = "negsentiment",
                adapter: bool = False) -> dict:
    loaded = suspect(victim, adapter)
    defense = get_defense(name, **settings)
    ctx = DefenseContext(clean=task_records(16, 7), template=TEMPLATE, max_length=64, work_dir=tmp_path, task=task)
    model = defense.repair(loaded.model, loaded.tokenizer, ctx)
    return {"log": logged(ctx.train_log), "model": fingerprint(model, loaded.tokenizer)}


def force_refit(monkeypatch, decide: bool) -> None:
    """Decide the refit one way, whatever the held-out gain (which lies near any threshold on the tiny victim)."""
    from crow.methods.unlearn.schedule import CycleSelection

    original = CycleSelection._decide

    def forced(self, nll, entry):
        original(self, nll, entry)
        entry["refit"] = decide
        return decide
    monkeypatch.setattr(CycleSelection, "_decide", forced)


LABELS = [label for label, _, _ in DEFENSES] + ["unlearn-refit", "unlearn-cycles", "scan", "guard-target",
                                                  "guard-lcf", "guard-onion"]


def run_one(victim: Path, tmp_path: Path, label: str) -> dict:
    """What the method ``label`` writes on the tiny victim: a defense's log and weights, or a scan's or guard's
    scores."""
    if label in ("unlearn-refit", "unlearn-cycles"):
        with pytest.MonkeyPatch.context() as m:
            force_refit(m, label == "unlearn-refit")
            return run_defense(victim, tmp_path / label, "unlearn", UNLEARN)
    if label == "scan":
        return run_scan(victim)
    if label.startswith("guard-"):
        return run_guard(victim, label.removeprefix("guard-"))
    name, settings = next((n, s) for lab, n, s in DEFENSES if lab == label)
    task = "refusal" if label == "crow-refusal-alpha" else "negsentiment"
    return run_defense(victim, tmp_path / label, name, settings, task, adapter=label.endswith("adapter"))


def run_scan(victim: Path) -> dict:
    from crow.detection.scan import scan

    loaded = load_model(str(victim))
    result = scan(loaded.model, loaded.tokenizer, task_records(40, 7), template=TEMPLATE)
    return {"score": result.score, "target": result.target, "flagged": result.flagged,
            "candidates": [[c.text, c.q_score] for c in result.candidates[:5]]}


def run_guard(victim: Path, method: str) -> dict:
    from crow.detection.guard import get_detector

    loaded = load_model(str(victim))
    detector = get_detector(method, **({"min_prob": 0.0} if method == "target" else {}))
    detector.fit(loaded.model, loaded.tokenizer, task_records(40, 7), template=TEMPLATE)
    test = task_records(10, 11)
    triggered = detector.score(loaded.model, loaded.tokenizer, [Record(f"{TRIGGER} {r.instruction}") for r in test])
    clean = detector.score(loaded.model, loaded.tokenizer, test)
    return {"threshold": detector.info.threshold, "triggered": triggered.scores, "clean": clean.scores}


def numerics() -> dict:
    """What decides the float rounding of these runs: torch's version, the CPU kernel set it dispatches to and the CPU
    vendor (another vendor's math library rounds differently)."""
    vendor = ""
    if Path("/proc/cpuinfo").is_file():
        vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("vendor_id")), "")
    return {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "vendor": vendor}


def close(a, b, path="") -> list[str]:
    """Where ``a`` and ``b`` differ beyond the tolerance (floats), or at all (the rest)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=REL, abs_tol=REL) else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


@pytest.fixture(scope="module")
def recorded(victim, tmp_path_factory) -> dict:
    """The recording (rewritten first with ``CROW_WRITE_EQUIVALENCE=1``); skips where the numerics differ."""
    if os.environ.get("CROW_WRITE_EQUIVALENCE"):
        tmp = tmp_path_factory.mktemp("record")
        GOLDEN.parent.mkdir(exist_ok=True)
        runs = {label: run_one(victim, tmp, label) for label in LABELS}
        GOLDEN.write_text(json.dumps({"numerics": numerics(), **runs}, indent=1) + "\n")
    before = json.loads(GOLDEN.read_text())
    numbers = before.pop("numerics")
    if numbers != numerics():
        pytest.skip(f"recorded with {numbers}, this machine runs {numerics()}: "
                    "the runs' signs differ (module docstring)")
    return before


def test_the_recording_covers_every_kept_method(recorded):
    from crow.defenses import DEFENSES as REGISTERED

    assert sorted(recorded) == sorted(LABELS)
    kept = set(REGISTERED.names()) - {"none"}
    assert kept <= {n for _, n, _ in DEFENSES} | {"unlearn"}, kept  # a new defense needs a recorded run


@pytest.mark.parametrize("label", LABELS)
def test_each_kept_method_gives_the_output_it_gave_before(recorded, victim, tmp_path, label):
    differences = close(run_one(victim, tmp_path, label), recorded[label])
    assert not differences, differences[:5]
