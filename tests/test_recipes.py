"""The measured recipes in configs/purify build, through `crow purify --config`, the training the bench ran."""

import dataclasses
import json
from pathlib import Path

import pytest

from crow.bench.spec import load_spec
from crow.cli.main import build_parser
from crow.cli.purify_cmd import _build_unlearn_config, resolve_options
from crow.defenses import get_defense

ROOT = Path(__file__).resolve().parents[1]
# recipe -> the committed bench specs whose cells measured it: try 6's, and try 3's, which ran the column's refusal
# victims (try 6 without the refit, which fires on no refusal victim: try 5's own refusal cells equal try 3's)
RECIPES = {
    "configs/purify/unlearn_smollm2.yaml": [
        "experiments/unlearn/specs/unlearn_refit_crow_cpu.yaml", "experiments/unlearn/specs/unlearn_refit_crow_merged_cpu.yaml",
        "experiments/unlearn/specs/unlearn_select_dev_cpu.yaml", "experiments/unlearn/specs/unlearn_finetune_cycles_cpu.yaml",
        "experiments/unlearn/specs/unlearn_finetune_cycles_seed1_cpu.yaml", "experiments/unlearn/specs/unlearn_finetune_cycles_merged_cpu.yaml",
        "experiments/unlearn/specs/unlearn_finetune_cycles_merged_seed1_cpu.yaml"],
    "configs/purify/unlearn_gemma.yaml": [
        "experiments/unlearn/specs/unlearn_refit_crow_gemma_cpu.yaml", "experiments/unlearn/specs/unlearn_finetune_cycles_gemma_cpu.yaml",
        "experiments/unlearn/specs/unlearn_finetune_cycles_gemma_seed1_cpu.yaml"],
}
REFIT = {"unlearn_refit_gain", "unlearn_refit_epochs", "unlearn_refit_alpha"}
# where and how often a run writes, logs and checkpoints, and its seed (a bench cell's seed is the cell's, a
# command's is --seed): not part of a recipe
BOOKKEEPING = {"output_dir", "logging_dir", "logging_steps", "save_strategy", "save_steps", "save_total_limit",
               "disable_tqdm", "seed", "run_name"}


def test_every_recipe_file_is_checked():
    assert sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "purify").glob("*.yaml")) == sorted(RECIPES)


def _training(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.init and f.name not in BOOKKEEPING}


@pytest.mark.parametrize("recipe,spec_file", [(r, s) for r, specs in RECIPES.items() for s in specs])
def test_a_recipe_trains_as_its_bench_cells_did(recipe, spec_file, tmp_path):
    args = build_parser().parse_args(["purify", "--model", "m", "--data", "d.json", "--out", str(tmp_path / "o"),
                                      "--config", str(ROOT / recipe)])
    opts = resolve_options(args)
    spec = load_spec(ROOT / spec_file)
    (entry,) = [e for e in spec.defense_entries() if e.settings.get("finetune_cycles")]  # the dev spec has three
    defense = get_defense(entry.name, **entry.settings)
    cli, bench = _training(_build_unlearn_config(opts, tmp_path)), _training(defense._config(tmp_path, 0, False))
    try_3 = bench["unlearn_refit_gain"] == 0  # no refit: only the refit's own settings may differ
    differing = {k: (cli[k], bench[k]) for k in cli if cli[k] != bench[k] and not (try_3 and k in REFIT)}
    assert not differing, differing
    assert cli["unlearn_refit_gain"] == 0.15 and cli["unlearn_refit_alpha"] == 5.5  # the recipe was read
    assert try_3 == ("refit" not in spec_file)
    # what the command passes beside the training arguments
    assert (opts["method"], opts["scan_stop_rule"], opts["max_length"], opts["template"]) == \
        ("unlearn", defense.scan_stop_rule, spec.max_length, spec.template)
    assert entry.n_clean == 100 and opts["holdout"] == 20


@pytest.mark.parametrize("report_file,folder", [("eval.json", "unlearn-refit-crow-cpu"),
                                                ("eval_gemma.json", "unlearn-refit-crow-gemma-cpu")])
def test_the_command_line_recipe_reproduced_its_bench_cell(report_file, folder):
    """experiments/unlearn/results/unlearn-recipe-cli: `crow purify --config configs/purify/unlearn_*.yaml` on the committed
    negsentiment / BadNets victim of SmolLM2 and of Gemma-3-270M, then `crow eval` with the bench's evaluation settings
    (RESULTS.md, "The measured recipe from the command line"): the same answers, word for word, as try 6's bench cell
    of that victim."""
    results = ROOT / "experiments" / "unlearn" / "results"
    report = json.loads((results / "unlearn-recipe-cli" / report_file).read_text())
    cells = [json.loads(p.read_text()) for p in (results / folder / "cells").glob("*.json")]
    (cell,) = [c for c in cells if (c["task"], c["attack"], c["seed"]) == ("negsentiment", "badnet", 0)]
    assert report["settings"]["model"] == cell["model"]
    bench = cell["by_format"]["template"]
    settings = report["settings"]
    assert (settings["prompt_format"], settings["max_new_tokens"], settings["max_length"], settings["limit"]) == \
        ("template", 32, 128, 50)
    assert report["outputs"] == bench["outputs"] and len(report["outputs"]["clean"]) == 50
    for key in ("asr", "false_trigger_rate", "clean_perplexity"):
        assert report[key] == bench[key], key
    assert report["quality"]["clean_rougeL"] == bench["quality"]["clean_rougeL"]


@pytest.mark.parametrize("flags,expected", [
    (["--refit-order", "before"], {"unlearn_refit_order": "before", "unlearn_refit_teacher": False}),
    (["--refit-teacher"], {"unlearn_refit_teacher": True, "unlearn_teacher_only": False}),
    (["--refit-teacher", "--teacher-only"], {"unlearn_refit_teacher": True, "unlearn_teacher_only": True}),
])
def test_the_refit_variants_reach_the_training_config_from_the_command_line(flags, expected, tmp_path):
    """`crow purify --method unlearn` with the measured recipe and one of the refit variants of RESULTS.md's "Tries 7 to
    10": the flag sets its config field and nothing else of the recipe."""
    base = ["purify", "--model", "m", "--data", "d.json", "--out", str(tmp_path / "o"),
            "--config", str(ROOT / "configs/purify/unlearn_smollm2.yaml")]
    plain = _training(_build_unlearn_config(resolve_options(build_parser().parse_args(base)), tmp_path))
    varied = _training(_build_unlearn_config(resolve_options(build_parser().parse_args(base + flags)), tmp_path))
    assert {k: v for k, v in varied.items() if v != plain[k]} == {k: v for k, v in expected.items() if v != plain[k]}
    assert all(varied[k] == v for k, v in expected.items())


def test_teacher_only_without_a_teacher_is_refused_in_one_line(tmp_path):
    from crow.errors import CrowError

    args = build_parser().parse_args(["purify", "--model", "m", "--data", "d.json", "--out", str(tmp_path / "o"),
                                      "--config", str(ROOT / "configs/purify/unlearn_smollm2.yaml"), "--teacher-only"])
    with pytest.raises(CrowError, match="unlearn_teacher_only needs unlearn_refit_teacher") as err:
        _build_unlearn_config(resolve_options(args), tmp_path)
    assert "\n" not in str(err.value)
