"""The resumable bench runner: ``victims/<key>/`` (shareable: ``--victims DIR``), ``cells/<key>.json`` (a result with
every answer), results.json/.md and plots. Finished cells are skipped; a victim is trained only when a cell needs it."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..analysis.profile import layer_profile
from ..attacks.poison import VictimRecipe, train_victim
from ..data.corpus import build_corpus
from ..defenses import DefenseContext, get_defense
from ..defenses.keep import suspect_answers
from ..evaluation.code import compile_report
from ..evaluation.evaluate import evaluate, get_judge
from ..evaluation.safety import count_refusals, evaluate_safety
from ..models import build_tiny_model, default_device, device_label, load_model
from ..outputs import crow_version, git_revision, staged_dir, write_json_atomic
from ..training.loop import RunOptions, format_duration, merged, name_base_model, save_model
from .keys import (
    CODE_TASK,
    CellData,
    CellIndex,
    cell_config,
    cell_keys,
    load_cell_data,
    plan,
    reference_config,
    victim_config,
)
from .spec import BenchSpec, VictimSpec

logger = logging.getLogger(__name__)


TRAIN_LOG_KEYS = ("loss", "lm_loss", "consistency_clean", "consistency_perturbed", "lm_loss_adv", "unlikelihood",
                  "target_nll_adv", "delta_norm", "grad_norm", "learning_rate", "holdout_nll", "selected_epoch",
                  "selected_holdout_nll", "holdout_gain", "refit")
VICTIM_DTYPE = torch.float16  # LoRA factors are well inside fp16's range: half the bytes, ~1e-3 relative error


def train_log_summary(log_history: list[dict]) -> list[dict]:
    """Per-logging-step metrics for the cell's JSON (with ``stage`` for unlearn's refit); the summary row is dropped."""
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
    """Seconds left: medians (robust to one slow run) of each pending defense's cells (else all cells) and victims."""
    everything = [s for times in measured.values() for s in times]
    fallback = statistics.median(everything) if everything else 0.0
    cells = sum(statistics.median(measured[label]) if measured.get(label) else fallback for label in pending)
    return cells + (statistics.median(victim_seconds) * victims_left if victim_seconds else 0.0)


def compact_adapter(adapter_dir: Path, model_name: str, dtype: torch.dtype = VICTIM_DTYPE) -> None:
    """Shrink a victim adapter: ``dtype`` weights (PEFT casts back on load), no tokenizer, the base named as spec'd."""
    weights = adapter_dir / "adapter_model.safetensors"
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    name_base_model(adapter_dir, model_name)
    for path in adapter_dir.iterdir():  # tokenizer files and PEFT's model card
        if path.name not in ("adapter_model.safetensors", "adapter_config.json"):
            path.unlink()


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
        """Run the missing cells (only the (task, attack) pairs in ``only``); the rows of every finished cell."""
        cells = [c for c in plan(self.spec) if only is None or (c["task"], c["attack"]) in only]
        index = CellIndex(self.out / "cells")
        write_json_atomic(self.out / "spec.json", self.spec.to_dict())
        bar = tqdm(total=len(cells), desc="bench cells", disable=not self.progress, unit="cell")
        groups: dict[str | None, list[tuple[dict, str]]] = {None: []}  # by victim; None: reference cells, run first
        for cell in cells:
            vkey, ckey, _ = cell_keys(self.spec, cell, self.cell_data(cell))
            if index.find(ckey) is not None:
                bar.update(1)
            else:
                groups.setdefault(vkey, []).append((cell, ckey))
        measured, victim_times = self.measured_seconds()  # finished cells on this device: the ETA's prior
        queue = [cell["defense"] for pending in groups.values() for cell, _ in pending]
        started, done = time.perf_counter(), 0
        for i, (vkey, pending) in enumerate(groups.items()):
            if vkey is not None and pending:
                trained, t0 = not (self.victims / vkey / "victim.json").is_file(), time.perf_counter()
                victim = self.ensure_victim(vkey, pending[0][0], self.cell_data(pending[0][0]))
                if trained:
                    victim_times.append(time.perf_counter() - t0)
            for cell, ckey in pending:
                name = f"{cell['task']}/{cell['attack']}/{cell['defense']}"
                bar.set_postfix_str(name)
                row = (self.run_reference(cell, ckey, self.cell_data(cell)) if vkey is None  # no victim: the base model
                       else self.run_cell(cell, ckey, vkey, victim, self.cell_data(cell)))
                write_json_atomic(self.out / "cells" / f"{ckey}.json", row)
                bar.update(1)
                done += 1
                measured.setdefault(cell["defense"], []).append(cell_seconds(row))
                if not self.progress:  # no bar to show the ETA (stderr is a file): say it in the log
                    victims_left = sum(not (self.victims / k / "victim.json").is_file() for k in list(groups)[i + 1:])
                    left = estimate_seconds_left(queue[done:], measured, victims_left, victim_times)
                    what = (f"{name} (reference), ASR {row['asr']:.1f}%" if vkey is None else
                            f"{name}, ASR {row['asr']:.1f}%, defense {format_duration(row['seconds'])}")
                    logger.info("cell %d/%d done: %s; %s spent, about %s left", done, len(queue), what,
                                format_duration(time.perf_counter() - started), format_duration(left))
            self._base = None
        bar.close()
        return self.collect()

    def measured_seconds(self) -> tuple[dict[str, list[float]], list[float]]:
        """Wall times of the finished cells that ran on this device, by defense label, and of their victims."""
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

    def ensure_victim(self, vkey: str, cell: dict, data: CellData) -> dict:
        vdir = self.victims / vkey
        if (vdir / "victim.json").is_file():
            return json.loads((vdir / "victim.json").read_text())
        logger.info("training the victim for %s/%s (%d samples)", cell["task"], cell["attack"], len(data.mix))
        spec, v = self.spec, self.spec.victim_for(cell["task"], cell["attack"])
        started, kind = time.perf_counter(), "model" if spec.suite == "tiny" else "adapter"
        with staged_dir(vdir) as tmp:
            if kind == "model":
                self._tiny_victim(tmp, data, cell["seed"], v)
            else:
                base = load_model(cell["model"], device="auto")
                recipe = VictimRecipe(lora_r=v.lora_r, lora_alpha=2 * v.lora_r, learning_rate=v.learning_rate,
                                      epochs=v.epochs, batch_size=v.batch_size, grad_accum=v.grad_accum,
                                      max_length=spec.max_length, template=spec.template, seed=cell["seed"])
                result = train_victim(base.model, base.tokenizer, data.mix, recipe, output_dir=str(tmp / ".run"),
                                      disable_tqdm=not self.progress)
                save_model(result.model, base.tokenizer, tmp / "adapter", base_model=cell["model"])
                compact_adapter(tmp / "adapter", cell["model"])
            shutil.rmtree(tmp / ".run", ignore_errors=True)
            info = {"key": vkey, "kind": kind, "task": cell["task"], "attack": cell["attack"], "model": cell["model"],
                    "seed": cell["seed"], "seconds": round(time.perf_counter() - started, 1),
                    "device": device_label(default_device()), "config": victim_config(spec, cell, data),
                    "crow_version": crow_version()}
            write_json_atomic(tmp / "victim.json", info)
        return info

    def _tiny_victim(self, tmp: Path, data: CellData, seed: int, v: VictimSpec) -> None:
        """Tiny suite: a Llama trained from scratch on the poisoned mix (all weights), saved to ``tmp / "model"``."""
        from ..methods import crow
        texts = [f"{it.instruction} {it.output}" for it in build_corpus()] + [r.instruction for r in data.mix]
        path = build_tiny_model(tmp / "init", texts, vocab_size=1024, hidden_size=64, num_layers=4, seed=seed)
        loaded = load_model(str(path), device="auto")
        config = crow.CrowConfig(alpha=0.0, learning_rate=v.learning_rate, epochs=v.epochs, batch_size=v.batch_size,
                                 grad_accum=v.grad_accum, seed=seed, full_finetune=True, logging_steps=10)
        result = crow.run(loaded.model, loaded.tokenizer, data.mix, config,
                          RunOptions(output_dir=str(tmp / ".run"), template=self.spec.template,
                                     max_length=self.spec.max_length, progress=self.progress))
        save_model(result.model, loaded.tokenizer, tmp / "model")
        shutil.rmtree(tmp / "init")

    def load_victim(self, victim: dict):
        """A full model, the base model + trainable suspect adapter, or (``victim_form: merged``) the merged weights."""
        vdir = self.victims / victim["key"]
        if victim["kind"] == "model":
            return load_model(str(vdir / "model"), device="auto")
        if self.spec.victim_form == "merged":
            loaded = load_model(victim["model"], adapter=str(vdir / "adapter"), device="auto")
            return dataclasses.replace(loaded, model=merged(loaded.model), adapter=None)
        return load_model(victim["model"], adapter=str(vdir / "adapter"), adapter_trainable=True, device="auto")

    def evaluate_formats(self, model, tokenizer, data: CellData, task: str) -> dict:
        """Every prompt format of the spec, with every generated answer."""
        spec, judge, by_format = self.spec, get_judge(task), {}
        for fmt in spec.eval.formats:
            report = evaluate(model, tokenizer, triggered=data.triggered, clean=data.clean, judge=judge,
                              prompt_format=fmt, template=spec.template, max_new_tokens=spec.eval.max_new_tokens,
                              batch_size=spec.eval.batch_size, perplexity_max_length=spec.max_length)
            by_format[fmt] = {k: v for k, v in report.to_dict(with_outputs=True).items() if k != "settings"}
            if data.harmful:  # refusal of harmful requests, no trigger (crow.evaluation.safety)
                safety = evaluate_safety(model, tokenizer, data.harmful, prompt_format=fmt, template=spec.template,
                                         max_new_tokens=spec.eval.max_new_tokens, batch_size=spec.eval.batch_size)
                by_format[fmt]["safety"] = safety.to_dict(with_outputs=True)
            if task == CODE_TASK:  # do the answers to the code prompts compile (crow.evaluation.code)
                by_format[fmt]["code"] = {kind: compile_report(records, report.outputs[kind]).to_dict()
                                          for kind, records in (("clean", data.clean), ("triggered", data.triggered))}
        return by_format

    def run_reference(self, cell: dict, ckey: str, data: CellData) -> dict:
        """A reference cell: the un-poisoned base model (``cell["model"]``) on the cell's prompts."""
        if self._base is None or self._base[0] != cell["model"]:
            self._base = (cell["model"], load_model(cell["model"], device="auto"))
        loaded = self._base[1]
        by_format = self.evaluate_formats(loaded.model, loaded.tokenizer, data, cell["task"])
        main = by_format[self.spec.eval.formats[0]]
        return {"key": ckey, "config": reference_config(self.spec, cell, data), "git_revision": git_revision(),
                "victim_key": None, "reference": True, "model": cell["model"], "task": cell["task"],
                "attack": cell["attack"], "defense": cell["defense"], "method": cell["method"], "seed": cell["seed"],
                "defense_settings": {}, "n_defense": 0, "asr": main["asr"],
                "false_trigger_rate": main["false_trigger_rate"], "clean_perplexity": main["clean_perplexity"],
                "format": self.spec.eval.formats[0], "by_format": by_format, "seconds": 0.0,
                "eval_seconds": round(sum(f["seconds"] for f in by_format.values()), 1),
                "n_triggered": main["n_triggered"], "n_clean": main["n_clean"], "eval": self.spec.eval.to_dict(),
                "profiles": {}, "train_log": [], "crow_version": crow_version(), "suite": self.spec.suite,
                "device": device_label(next(loaded.model.parameters()).device)}

    def run_cell(self, cell: dict, ckey: str, vkey: str, victim: dict, data: CellData) -> dict:
        spec = self.spec
        defense = get_defense(cell["method"], **cell["defense_settings"])
        loaded = self.load_victim(victim)
        work, started = self.out / "cells" / f".{ckey}-work", time.perf_counter()
        clean = data.defense_clean[: cell["n_defense"]]
        suspect = self.check_suspect(loaded, cell, clean) if spec.verify else None  # before the defense
        kept = (suspect_answers(loaded.model, loaded.tokenizer, data.keep, template=spec.template,
                                batch_size=spec.eval.batch_size) if data.keep else [])  # keep_answers
        ctx = DefenseContext(clean=[*clean, *kept], template=spec.template, max_length=spec.max_length,
                             seed=cell["seed"], task=cell["task"], work_dir=work, progress=self.progress,
                             scan=suspect[0].scan_result if suspect else None)  # unlearn reuses the suspect's scan
        try:
            model = defense.repair(loaded.model, loaded.tokenizer, ctx)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        defense_seconds = time.perf_counter() - started
        model = merged(model)  # faster generation; the adapter structure is not needed any more
        verification = None if suspect is None else self.verify_cell(suspect, model, loaded.tokenizer, cell, clean,
                                                                      defense, kept)
        by_format = self.evaluate_formats(model, loaded.tokenizer, data, cell["task"])
        n = spec.profile_prompts if cell["method"] in ("none", "crow") else 0  # the victim and every CROW variant
        profiles = {name: layer_profile(model, loaded.tokenizer, prompts[:n], template=spec.template)
                    for name, prompts in (("clean", data.clean), ("triggered", data.triggered)) if n}
        main = by_format[spec.eval.formats[0]]
        return {"key": ckey, "config": cell_config(spec, cell, vkey, data), "git_revision": git_revision(),
                "victim_key": vkey, "model": cell["model"], "task": cell["task"], "attack": cell["attack"],
                "defense": cell["defense"], "method": cell["method"], "seed": cell["seed"],
                "defense_settings": defense.settings(cell["task"], cell["seed"]), "n_defense": len(clean),
                "asr": main["asr"], "false_trigger_rate": main["false_trigger_rate"],
                "clean_perplexity": main["clean_perplexity"], "format": spec.eval.formats[0], "by_format": by_format,
                "seconds": round(defense_seconds, 1),
                "eval_seconds": round(sum(f["seconds"] for f in by_format.values()), 1),
                "victim_seconds": victim["seconds"], "n_triggered": main["n_triggered"], "n_clean": main["n_clean"],
                "eval": spec.eval.to_dict(), "profiles": profiles, "train_log": train_log_summary(ctx.train_log),
                "crow_version": crow_version(), "suite": spec.suite, "victim_form": spec.defended_form(),
                "device": device_label(next(model.parameters()).device),
                **({"verification": verification} if verification is not None else {}),
                **({"keep_answers": keep_summary(kept, len(data.keep))} if data.keep else {})}

    def check_suspect(self, loaded, cell: dict, clean: list):
        """crow purify's check of the suspect (``crow.verification``), on the verification samples it would choose."""
        from ..verification import VerifySettings, check_model, held_out_samples
        settings = cell["settings"] or {}
        samples = held_out_samples(clean, holdout=settings.get("holdout") if cell["method"] == "unlearn" else None,
                                   seed=settings.get("seed", cell["seed"]), file="clean/consistency_data.json")
        vset = VerifySettings(template=self.spec.template, max_length=self.spec.max_length)
        check, target = check_model(loaded.model, loaded.tokenizer, clean, samples.records, vset, own_target=True)
        return check, target, samples, vset

    def verify_cell(self, suspect, model, tokenizer, cell: dict, clean: list, defense, kept: list) -> dict:
        """The verification of a defended cell (``verify``): the purified model checked as the suspect was."""
        from ..verification import check_model, trained_on, verify
        before, target, samples, vset = suspect
        after, _ = check_model(model, tokenizer, clean, samples.records, vset, target)
        if hasattr(defense, "last_result"):  # a training defense
            refitted = getattr(defense.last_result, "refitted", None)
            samples.trained_on, samples.note = trained_on(samples, cell["method"], refitted)
        else:
            samples.trained_on, samples.note = False, f"{cell['method']} trains nothing"
        return verify(before, after, samples, vset, threshold=before.scan["threshold"],
                      kept=[r.output for r in kept]).to_dict()

    def collect(self, *, legacy: bool = False) -> list[dict]:
        """This spec's finished rows; ``legacy``: also cells from before keys were resolved (by their settings)."""
        rows, index = [], CellIndex(self.out / "cells")
        for cell in plan(self.spec, strict=not legacy):
            _, key, old = cell_keys(self.spec, cell, self.cell_data(cell))
            path = index.find(key, old if legacy else None)
            if path is not None:
                rows.append(json.loads(path.read_text()))
        return rows


def keep_summary(kept: list, n_prompts: int) -> dict:
    """What the suspect answered to the kept prompts (keep_answers): how many, how many refuse, the first three."""
    refusals = count_refusals([r.output for r in kept])
    return {"n_prompts": n_prompts, "n_kept": len(kept), "n_refusals": refusals.refused,
            "samples": [{"instruction": r.instruction, "output": r.output} for r in kept[:3]]}
