"""The resumable bench runner: one JSON per cell, keyed by a hash of its resolved config.

Layout of an output directory::

    victims/<victim-key>/      the victim (LoRA adapter, or a full tiny model) + victim.json
                               (``--victims DIR`` shares them between specs)
    cells/<cell-key>.json      one (model, task, attack, defense, seed) result, with every generated answer;
                               a reference cell (``references: [base]``) has no victim and is keyed by the
                               model, the prompts and the eval settings only
    results.json, results.md, asr_by_defense.png, consistency_<task>_<attack>.png

Finished cells are skipped; a victim is trained only when one of its cells is missing, and then
shared by all its defenses. Interrupt at any time and run the same command again to resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..analysis.profile import layer_profile
from ..attacks.victim import VictimRecipe, train_victim
from ..defenses import DefenseContext, get_defense
from ..errors import CrowError
from ..evaluation.evaluate import evaluate
from ..evaluation.judges import get_judge
from ..models import build_tiny_model, default_device, device_label, load_model
from ..outputs import crow_version, staged_dir, write_json_atomic
from ..purification import format_duration, merged, purify, save_model
from ..trainer import CrowConfig
from .data import CellData, backdoorllm_cell, tiny_cell
from .spec import BenchSpec, VictimSpec, config_hash

logger = logging.getLogger(__name__)

RESULT_FORMAT = 2  # bump when a cell's meaning changes: old cells are then recomputed (2: prompts stripped)


def plan(spec: BenchSpec) -> list[dict]:
    """Every cell of the spec, in run order (grouped by victim; a cell's reference rows first)."""
    entries = spec.defense_entries()
    for entry in entries:  # validate names, settings and the victim form before any work
        get_defense(entry.name, **entry.settings).check_victim(spec.defended_form())
    clash = sorted(set(spec.references) & {e.label for e in entries})
    if clash:
        raise CrowError(f"defense label {clash[0]!r} is also a reference of this spec; give the defense another label")
    cells = []
    for model in spec.models:
        for task, attacks in spec.cells.items():
            for attack in attacks:
                for seed in spec.seeds:
                    for ref in spec.references:
                        cells.append({"model": model, "task": task, "attack": attack, "seed": seed, "defense": ref,
                                      "method": ref, "reference": True, "defense_settings": {}, "n_defense": 0})
                    for entry in entries:
                        cells.append({"model": model, "task": task, "attack": attack, "seed": seed,
                                      "defense": entry.label, "method": entry.name,
                                      "defense_settings": dict(entry.settings), "n_defense": entry.n_clean})
    return cells


def victim_config(spec: BenchSpec, cell: dict, data: CellData) -> dict:
    return {"suite": spec.suite, "model": cell["model"], "task": cell["task"], "attack": cell["attack"],
            "seed": cell["seed"], "victim": asdict(spec.victim_for(cell["task"], cell["attack"])), "template": spec.template,
            "max_length": spec.max_length, "data": data.provenance, "n_mix": len(data.mix), "format": RESULT_FORMAT}


def cell_config(spec: BenchSpec, cell: dict, victim_key: str) -> dict:
    config = {"victim": victim_key, "defense": cell["method"], "defense_settings": cell["defense_settings"],
              "eval": asdict(spec.eval), "n_defense": cell["n_defense"], "profile_prompts": spec.profile_prompts,
              "format": RESULT_FORMAT}
    if spec.victim_form != "adapter":  # only when not the default: the adapter specs' cells keep their keys
        config["victim_form"] = spec.victim_form
    return config


def prompts_hash(data: CellData) -> str:
    """A hash of a cell's evaluation records (triggered and clean, with their reference outputs)."""
    records = {"triggered": [r.to_dict() for r in data.triggered], "clean": [r.to_dict() for r in data.clean]}
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


def reference_config(spec: BenchSpec, cell: dict, data: CellData) -> dict:
    """What a reference cell depends on: the model, the prompts and how they are evaluated; not the victim
    recipe, the defenses or where the data lies, so every spec with the same prompts has the same cell."""
    return {"reference": cell["method"], "model": cell["model"], "task": cell["task"], "attack": cell["attack"],
            "seed": cell["seed"], "template": spec.template, "max_length": spec.max_length, "eval": asdict(spec.eval),
            "prompts": prompts_hash(data), "format": RESULT_FORMAT}


def victim_key(spec: BenchSpec, cell: dict, data: CellData) -> str:
    """The name of a cell's victim directory (``cell`` needs model, task, attack and seed)."""
    return config_hash(victim_config(spec, cell, data))


def cell_keys(spec: BenchSpec, cell: dict, data: CellData) -> tuple[str | None, str]:
    """(victim key, cell key) of a planned cell: its victim's directory (None for a reference cell) and its
    JSON file's name."""
    if cell.get("reference"):
        return None, config_hash(reference_config(spec, cell, data))
    vkey = victim_key(spec, cell, data)
    return vkey, config_hash(cell_config(spec, cell, vkey))


def load_cell_data(spec: BenchSpec, data_dir: Path | None, task: str, attack: str, seed: int) -> CellData:
    if spec.suite == "tiny":
        return tiny_cell(task, attack, spec, seed)
    return backdoorllm_cell(data_dir, task, attack, spec, seed)


TRAIN_LOG_KEYS = ("loss", "lm_loss", "consistency_clean", "consistency_perturbed", "lm_loss_adv", "kl_loss",
                  "kl_loss_adv", "unlikelihood", "target_nll_adv", "delta_norm", "grad_norm", "learning_rate",
                  "holdout_nll", "holdout_rougeL", "selected_epoch", "selected_holdout_nll",
                  "selected_holdout_rougeL", "holdout_gain", "refit")


def train_log_summary(log_history: list[dict]) -> list[dict]:
    """The per-logging-step training metrics of a defense, for the cell's JSON: step, epoch and the
    losses (the trainer's final summary row, which has no step metrics, is dropped), and the training stage
    when a defense trains in two (unlearn's refit: ``"stage": "refit"``, its steps and epochs counted anew)."""
    rows = []
    for entry in log_history:
        kept = {k: entry[k] if isinstance(entry[k], bool) else round(float(entry[k]), 6)  # a decision stays a bool
                for k in TRAIN_LOG_KEYS if k in entry}
        if kept:
            stage = {"stage": entry["stage"]} if "stage" in entry else {}
            rows.append({"step": entry.get("step"), "epoch": round(float(entry.get("epoch", 0.0)), 3), **stage, **kept})
    return rows


def cell_seconds(row: dict) -> float:
    """Wall time of a finished cell without its victim: the defense plus the evaluation."""
    return float(row.get("seconds", 0.0)) + float(row.get("eval_seconds", 0.0))


def estimate_seconds_left(pending: list[str], measured: dict[str, list[float]], victims_left: int,
                          victim_seconds: list[float]) -> float:
    """Seconds that the ``pending`` cells (their defense labels) and ``victims_left`` victims should take.

    A cell costs the median measured time of its defense (defenses differ a hundredfold: a quantization
    takes seconds, CROW minutes), a defense not measured yet the median of every measured cell, a victim
    the median measured victim. Medians, so that one run slowed by a concurrent job does not skew it."""
    everything = [s for times in measured.values() for s in times]
    fallback = statistics.median(everything) if everything else 0.0
    cells = sum(statistics.median(measured[label]) if measured.get(label) else fallback for label in pending)
    return cells + (statistics.median(victim_seconds) * victims_left if victim_seconds else 0.0)


VICTIM_DTYPE = torch.float16  # LoRA factors are small and well inside fp16's range: half the bytes, ~1e-3 relative error


def compact_adapter(adapter_dir: Path, model_name: str, dtype: torch.dtype = VICTIM_DTYPE) -> None:
    """Make a saved victim adapter small and portable, so results directories can carry their victims:
    its weights stored in ``dtype`` (PEFT casts them back to the model's dtype when it loads them), no
    tokenizer files (a bench victim is always loaded on its base model, whose tokenizer is used), and
    ``base_model_name_or_path`` set to the model as the spec names it (an alias or hub id) instead of
    the cache directory it was loaded from."""
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, weights,
              metadata={"format": "pt"})
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = model_name
    write_json_atomic(config_path, config)
    for path in adapter_dir.iterdir():
        if path.name not in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
            path.unlink()
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub, with a cache path in it


class BenchRunner:
    def __init__(self, spec: BenchSpec, out: Path, data_dir: Path | None = None, progress: bool = True,
                 victims: Path | None = None):
        self.spec, self.out, self.data_dir, self.progress = spec, Path(out), data_dir, progress
        self.victims = Path(victims) if victims else self.out / "victims"  # shareable between specs
        self._data: dict[tuple, CellData] = {}
        self._base = None  # the last base model loaded for reference cells (they run one after another)
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        self.victims.mkdir(parents=True, exist_ok=True)

    def cell_data(self, cell: dict) -> CellData:
        key = (cell["task"], cell["attack"], cell["seed"])
        if key not in self._data:
            self._data[key] = load_cell_data(self.spec, self.data_dir, *key)
        return self._data[key]

    def run(self, only: set[tuple[str, str]] | None = None) -> list[dict]:
        """Run the missing cells (only the (task, attack) pairs in ``only`` when given) and return the
        rows of every finished cell of the spec."""
        cells = [c for c in plan(self.spec) if only is None or (c["task"], c["attack"]) in only]
        write_json_atomic(self.out / "spec.json", self.spec.to_dict())
        bar = tqdm(total=len(cells), desc="bench cells", disable=not self.progress, unit="cell")
        groups: dict[str, list[tuple[dict, str]]] = {}
        references: list[tuple[dict, str]] = []
        for cell in cells:
            vkey, ckey = cell_keys(self.spec, cell, self.cell_data(cell))
            if (self.out / "cells" / f"{ckey}.json").is_file():
                bar.update(1)
                continue
            if vkey is None:
                references.append((cell, ckey))
            else:
                groups.setdefault(vkey, []).append((cell, ckey))
        measured, victim_times = self.measured_seconds()  # finished cells on this device: the ETA's prior
        queue = [cell["defense"] for cell, _ in references]
        queue += [cell["defense"] for pending in groups.values() for cell, _ in pending]
        started, done = time.perf_counter(), 0
        for cell, ckey in references:  # no victim: the base model on the cell's prompts
            bar.set_postfix_str(f"{cell['task']}/{cell['attack']}/{cell['defense']}")
            row = self.run_reference(cell, ckey, self.cell_data(cell))
            write_json_atomic(self.out / "cells" / f"{ckey}.json", row)
            bar.update(1)
            done += 1
            measured.setdefault(cell["defense"], []).append(cell_seconds(row))
            if not self.progress:
                victims_left = sum(not (self.victims / k / "victim.json").is_file() for k in groups)
                left = estimate_seconds_left(queue[done:], measured, victims_left, victim_times)
                logger.info("cell %d/%d done: %s/%s/%s (reference), ASR %.1f%%; %s spent, about %s left", done,
                            len(queue), cell["task"], cell["attack"], cell["defense"], row["asr"],
                            format_duration(time.perf_counter() - started), format_duration(left))
        self._base = None
        for i, (vkey, pending) in enumerate(groups.items()):
            first = pending[0][0]
            data = self.cell_data(first)
            trained, t0 = not (self.victims / vkey / "victim.json").is_file(), time.perf_counter()
            victim = self.ensure_victim(vkey, first, data)
            if trained:
                victim_times.append(time.perf_counter() - t0)
            for cell, ckey in pending:
                name = f"{cell['task']}/{cell['attack']}/{cell['defense']}"
                bar.set_postfix_str(name)
                row = self.run_cell(cell, ckey, vkey, victim, data)
                write_json_atomic(self.out / "cells" / f"{ckey}.json", row)
                bar.update(1)
                done += 1
                measured.setdefault(cell["defense"], []).append(cell_seconds(row))
                if not self.progress:  # no bar to show the ETA (stderr is a file): say it in the log
                    victims_left = sum(not (self.victims / k / "victim.json").is_file() for k in list(groups)[i + 1:])
                    left = estimate_seconds_left(queue[done:], measured, victims_left, victim_times)
                    logger.info("cell %d/%d done: %s, ASR %.1f%%, defense %s; %s spent, about %s left", done,
                                len(queue), name, row["asr"], format_duration(row["seconds"]),
                                format_duration(time.perf_counter() - started), format_duration(left))
        bar.close()
        return self.collect()

    def measured_seconds(self) -> tuple[dict[str, list[float]], list[float]]:
        """Wall times of the cells already in the output directory that ran on this run's device, by
        defense label, and of their victims' training (once per victim)."""
        device, by_defense, victims = device_label(default_device()), {}, {}
        for path in sorted((self.out / "cells").glob("*.json")):
            try:
                row = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # cells are written atomically; a hand-edited one must not stop a run over an ETA
            if row.get("device") != device:
                continue
            by_defense.setdefault(row.get("defense"), []).append(cell_seconds(row))
            if row.get("victim_seconds"):
                victims[row.get("victim_key")] = float(row["victim_seconds"])
        return by_defense, list(victims.values())

    # --------------------------------------------------------------------------------------------
    def ensure_victim(self, vkey: str, cell: dict, data: CellData) -> dict:
        vdir = self.victims / vkey
        if (vdir / "victim.json").is_file():
            return json.loads((vdir / "victim.json").read_text())
        logger.info("training the victim for %s/%s (%d samples)", cell["task"], cell["attack"], len(data.mix))
        spec, v = self.spec, self.spec.victim_for(cell["task"], cell["attack"])
        started = time.perf_counter()
        with staged_dir(vdir) as tmp:
            if spec.suite == "tiny":
                model, tokenizer = self._tiny_victim(tmp, data, cell["seed"], v)
                kind = "model"
            else:
                base = load_model(cell["model"], device="auto")
                recipe = VictimRecipe(lora_r=v.lora_r, lora_alpha=2 * v.lora_r, learning_rate=v.learning_rate,
                                      epochs=v.epochs, batch_size=v.batch_size, grad_accum=v.grad_accum,
                                      max_length=spec.max_length, template=spec.template, seed=cell["seed"])
                result = train_victim(base.model, base.tokenizer, data.mix, recipe, output_dir=str(tmp / ".run"),
                                      disable_tqdm=not self.progress)
                model, tokenizer, kind = result.model, base.tokenizer, "adapter"
                save_model(model, tokenizer, tmp / "adapter", base_model=cell["model"])
                compact_adapter(tmp / "adapter", cell["model"])
            shutil.rmtree(tmp / ".run", ignore_errors=True)
            info = {"key": vkey, "kind": kind, "task": cell["task"], "attack": cell["attack"], "model": cell["model"],
                    "seed": cell["seed"], "seconds": round(time.perf_counter() - started, 1),
                    "device": device_label(default_device()),
                    "config": victim_config(spec, cell, data), "crow_version": crow_version()}
            write_json_atomic(tmp / "victim.json", info)
        return info

    def _tiny_victim(self, tmp: Path, data: CellData, seed: int, v: VictimSpec):
        """Tiny suite: a Llama trained from scratch on the poisoned mix (all weights)."""
        from ..data.corpus import build_corpus

        texts = [f"{it.instruction} {it.output}" for it in build_corpus()] + [r.instruction for r in data.mix]
        path = build_tiny_model(tmp / "init", texts, vocab_size=1024, hidden_size=64, num_layers=4, seed=seed)
        loaded = load_model(str(path), device="auto")
        config = CrowConfig(output_dir=str(tmp / ".run"), crow_alpha=0.0, learning_rate=v.learning_rate,
                            num_train_epochs=v.epochs, per_device_train_batch_size=v.batch_size,
                            gradient_accumulation_steps=v.grad_accum, seed=seed, save_strategy="no",
                            disable_tqdm=not self.progress, logging_steps=10)
        result = purify(loaded.model, loaded.tokenizer, data.mix, config, template=self.spec.template,
                        max_length=self.spec.max_length, full_finetune=True)
        save_model(result.model, loaded.tokenizer, tmp / "model")
        shutil.rmtree(tmp / "init")
        return result.model, loaded.tokenizer

    def load_victim(self, victim: dict):
        """The victim as the defenses get it: a full model, the base model + trainable suspect adapter, or
        (``victim_form: merged``) the adapter merged into the base weights at load time."""
        vdir = self.victims / victim["key"]
        if victim["kind"] == "model":
            return load_model(str(vdir / "model"), device="auto")
        if self.spec.victim_form == "merged":
            loaded = load_model(victim["model"], adapter=str(vdir / "adapter"), device="auto")
            return dataclasses.replace(loaded, model=merged(loaded.model), adapter=None)
        return load_model(victim["model"], adapter=str(vdir / "adapter"), adapter_trainable=True, device="auto")

    def evaluate_formats(self, model, tokenizer, data: CellData, task: str) -> dict:
        """The evaluation of every prompt format of the spec, with every generated answer."""
        spec, judge, by_format = self.spec, get_judge(task), {}
        for fmt in spec.eval.formats:
            report = evaluate(model, tokenizer, triggered=data.triggered, clean=data.clean, judge=judge,
                              prompt_format=fmt, template=spec.template, max_new_tokens=spec.eval.max_new_tokens,
                              batch_size=spec.eval.batch_size, perplexity_max_length=spec.max_length)
            by_format[fmt] = {k: v for k, v in report.to_dict(with_outputs=True).items() if k not in ("settings",)}
        return by_format

    def run_reference(self, cell: dict, ckey: str, data: CellData) -> dict:
        """A reference cell: the un-poisoned base model (``cell["model"]``) on the cell's prompts."""
        if self._base is None or self._base[0] != cell["model"]:
            self._base = (cell["model"], load_model(cell["model"], device="auto"))
        loaded = self._base[1]
        by_format = self.evaluate_formats(loaded.model, loaded.tokenizer, data, cell["task"])
        main = by_format[self.spec.eval.formats[0]]
        return {
            "key": ckey, "victim_key": None, "reference": True, "model": cell["model"], "task": cell["task"],
            "attack": cell["attack"], "defense": cell["defense"], "method": cell["method"], "seed": cell["seed"],
            "defense_settings": {}, "n_defense": 0, "asr": main["asr"], "false_trigger_rate": main["false_trigger_rate"],
            "clean_perplexity": main["clean_perplexity"], "format": self.spec.eval.formats[0], "by_format": by_format,
            "seconds": 0.0, "eval_seconds": round(sum(f["seconds"] for f in by_format.values()), 1),
            "n_triggered": main["n_triggered"], "n_clean": main["n_clean"], "eval": asdict(self.spec.eval),
            "profiles": {}, "train_log": [], "crow_version": crow_version(), "suite": self.spec.suite,
            "device": device_label(next(loaded.model.parameters()).device),
        }

    def run_cell(self, cell: dict, ckey: str, vkey: str, victim: dict, data: CellData) -> dict:
        spec = self.spec
        defense = get_defense(cell["method"], **cell["defense_settings"])
        loaded = self.load_victim(victim)
        work = self.out / "cells" / f".{ckey}-work"
        started = time.perf_counter()
        ctx = DefenseContext(clean=data.defense_clean[: cell["n_defense"]], template=spec.template,
                             max_length=spec.max_length, seed=cell["seed"], task=cell["task"], work_dir=work,
                             progress=self.progress)
        try:
            model = defense.repair(loaded.model, loaded.tokenizer, ctx)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        defense_seconds = time.perf_counter() - started
        model = merged(model)  # faster generation; the adapter structure is not needed any more
        by_format = self.evaluate_formats(model, loaded.tokenizer, data, cell["task"])
        profiles = {}
        if spec.profile_prompts and cell["method"] in ("none", "crow"):  # the victim and every CROW variant
            n = spec.profile_prompts
            profiles = {"clean": layer_profile(model, loaded.tokenizer, data.clean[:n], template=spec.template),
                        "triggered": layer_profile(model, loaded.tokenizer, data.triggered[:n], template=spec.template)}
        main = by_format[spec.eval.formats[0]]
        return {
            "key": ckey, "victim_key": vkey, "model": cell["model"], "task": cell["task"], "attack": cell["attack"],
            "defense": cell["defense"], "method": cell["method"], "seed": cell["seed"],
            "defense_settings": defense.settings(), "n_defense": len(ctx.clean),
            "asr": main["asr"], "false_trigger_rate": main["false_trigger_rate"],
            "clean_perplexity": main["clean_perplexity"], "format": spec.eval.formats[0], "by_format": by_format,
            "seconds": round(defense_seconds, 1), "eval_seconds": round(sum(f["seconds"] for f in by_format.values()), 1),
            "victim_seconds": victim["seconds"], "n_triggered": main["n_triggered"], "n_clean": main["n_clean"],
            "eval": asdict(spec.eval), "profiles": profiles, "train_log": train_log_summary(ctx.train_log),
            "crow_version": crow_version(), "suite": spec.suite, "victim_form": spec.defended_form(),
            "device": device_label(next(model.parameters()).device),
        }

    def collect(self) -> list[dict]:
        """The rows of this spec's cells (other specs' cells in the same directory are ignored)."""
        rows = []
        for cell in plan(self.spec):
            path = self.out / "cells" / f"{cell_keys(self.spec, cell, self.cell_data(cell))[1]}.json"
            if path.is_file():
                rows.append(json.loads(path.read_text()))
        return rows
