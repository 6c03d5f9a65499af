"""Runs at the tag v0.1.0 (`git checkout v0.1.0`): it uses options crow 0.2 retired.

What more finetuning cycles do to an unlearned victim: a diagnostic for a development cell.

``unlearn`` with held-out finetuning cycles (``--finetune-cycles``, ``--cycle-epochs``, ``--holdout``) stops at the
first cycle end whose held-out score does not improve, so a bench cell shows one point of the curve. This script
trains the same defense on one bench cell for ``--epochs`` epochs without stopping and evaluates the weights of every
cycle end as the bench evaluates a cell (templated prompts: ASR, false triggers, clean perplexity, clean ROUGE-L),
beside the held-out scores the defender sees at that point (NLL and ROUGE-L of the held-out answers). It reads the
test prompts, so it is a development-cell tool: what it shows may choose a setting only on the cell it ran on, and
that cell is then reported apart. The cell's victim must be committed (``--victims``); nothing is written but
``--out``.

    python experiments/unlearn/scripts/cycle_curve.py --spec experiments/unlearn/specs/unlearn_finetune_cycles_cpu.yaml --cell negsentiment/badnet \
        --epochs 10 --data ../shared/data/backdoorllm --victims experiments/backdoorllm-table/results/backdoorllm-cpu/victims \
        --out experiments/unlearn/results/cycle-curve-cpu/negsentiment-badnet.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from crow.unlearn import UnlearnTrainer

from crow.bench.runner import BenchRunner, cell_keys, plan
from crow.bench.spec import load_spec
from crow.cli.bench_cmd import TINY
from crow.defenses import DefenseContext, get_defense
from crow.errors import CrowError
from crow.outputs import write_json_atomic


def cycle_curve(spec_path: Path, cell_name: str, epochs: int, data_dir: Path | None, victims: Path) -> dict:
    """The cycle-end rows (held-out scores and the cell's evaluation) of ``epochs`` epochs of the spec's unlearn
    defense on ``cell_name`` (task/attack), plus what the defense itself would have kept."""
    spec = load_spec(spec_path)
    if spec.suite == "tiny":  # as crow bench --suite tiny reads it: the tiny preset below the file
        spec = load_spec(spec_path, base=dict(TINY))
    task, _, attack = cell_name.partition("/")
    cells = [c for c in plan(spec) if (c["task"], c["attack"]) == (task, attack) and c["method"] == "unlearn"]
    if not cells:
        raise CrowError(f"{spec_path}: no unlearn cell {cell_name!r}; name a task/attack of its cells")
    cell = cells[0]
    settings = {**cell["defense_settings"], "epochs": epochs}
    if not (settings.get("holdout") and settings.get("cycle_epochs")):
        raise CrowError(f"{spec_path}: the unlearn defense needs holdout and cycle_epochs (its cycle ends are the "
                        "curve); use a held-out finetuning-cycles spec")
    one_format = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, formats=["template"]))
    with tempfile.TemporaryDirectory() as tmp:
        runner = BenchRunner(one_format, Path(tmp), data_dir=data_dir, victims=victims, progress=False)
        data = runner.cell_data(cell)
        vkey, _ = cell_keys(spec, cell, data)
        victim_file = victims / vkey / "victim.json"
        if not victim_file.is_file():
            raise CrowError(f"{victim_file}: the cell's victim is not there; run crow bench on the cell first")
        loaded = runner.load_victim(json.loads(victim_file.read_text()))
        points: dict[float, dict] = {}
        select_epoch = UnlearnTrainer.select_epoch

        def every_cycle(trainer: UnlearnTrainer) -> bool:
            select_epoch(trainer)  # logs and keeps as the defense would; the stop it asks for is ignored
            entry = dict(trainer.state.log_history[-1])
            epoch, cycle = entry["epoch"], trainer.args.unlearn_cycle_epochs
            if epoch > 0 and abs(epoch / cycle - round(epoch / cycle)) < 1e-6:
                entry.setdefault("holdout_rougeL", round(trainer.holdout_rouge_l(), 6))
                weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
                points[epoch] = {"held_out": entry, "weights": weights}
            return False

        UnlearnTrainer.select_epoch = every_cycle
        started = time.perf_counter()
        try:
            defense = get_defense("unlearn", **settings)
            ctx = DefenseContext(clean=data.defense_clean[: cell["n_defense"]], template=spec.template,
                                 max_length=spec.max_length, seed=cell["seed"], task=task, work_dir=Path(tmp) / "work",
                                 progress=False)
            model = defense.repair(loaded.model, loaded.tokenizer, ctx)
        finally:
            UnlearnTrainer.select_epoch = select_epoch
        seconds = time.perf_counter() - started
        rows = []
        for epoch, point in sorted(points.items()):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in point["weights"]:
                        p.copy_(point["weights"][name])
            report = runner.evaluate_formats(model, loaded.tokenizer, data, task)["template"]
            rows.append({"epoch": epoch, "holdout_nll": point["held_out"]["holdout_nll"],
                         "holdout_rougeL": point["held_out"]["holdout_rougeL"], "asr": report["asr"],
                         "false_trigger_rate": report["false_trigger_rate"],
                         "clean_perplexity": round(report["clean_perplexity"], 4),
                         "clean_rougeL": round(report["quality"]["clean_rougeL"], 6)})
    return {"spec": os.path.relpath(spec_path), "cell": cell_name, "victim_key": vkey, "defense_settings": settings,
            "defense_seconds": round(seconds, 1), "selected_by_defense": next(
                (e for e in ctx.train_log if "selected_epoch" in e), None), "cycle_ends": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, required=True, help="a bench spec with one unlearn defense")
    parser.add_argument("--cell", required=True, help="task/attack, say negsentiment/badnet")
    parser.add_argument("--epochs", type=int, default=10, help="epochs to train, no early stop (default 10)")
    parser.add_argument("--data", type=Path, help="the BackdoorLLM data directory (none for --suite tiny specs)")
    parser.add_argument("--victims", type=Path, required=True, help="the committed victims directory")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result = cycle_curve(args.spec, args.cell, args.epochs, args.data, args.victims)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    for row in result["cycle_ends"]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
