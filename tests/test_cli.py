import json
import subprocess
import sys

import pytest
import torch

import crow
from crow.cli.main import VERBS, main

from .conftest import make_records, write_json


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("verb", list(VERBS))
def test_help_works_for_every_verb(verb, capsys):
    code, out, _ = run_cli([verb, "--help"], capsys)
    assert code == 0 and f"crow {verb}" in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "crow.cli.main", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "purify" in out.stdout


EXIT_WITH_A_PROCESS_GROUP = """
import atexit, logging, sys
import torch.distributed as dist
from crow.cli.main import exit_process
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
logging.basicConfig(stream=sys.stderr, format="crow: %(message)s", level=logging.INFO)
logging.getLogger("crow").info("saved")
atexit.register(lambda: sys.stderr.write("teardown ran"))  # a plain exit would run it, and the group's destructors
sys.stdout.write("written, not yet flushed")  # a pipe is block-buffered: os._exit alone would drop this
exit_process(3)
"""


def test_exit_process_leaves_a_process_group_with_the_code_and_the_output_flushed(tmp_path):
    out = subprocess.run([sys.executable, "-c", EXIT_WITH_A_PROCESS_GROUP, str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout == "written, not yet flushed" and "crow: saved" in out.stderr
    assert "teardown ran" not in out.stderr


def test_exit_process_without_a_process_group_is_sys_exit():
    from crow.cli.main import exit_process

    with pytest.raises(SystemExit) as e:
        exit_process(4)
    assert e.value.code == 4


def test_env(capsys):
    code, out, _ = run_cli(["env", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["torch"] and info["transformers"]


@pytest.fixture
def data_files(tmp_path):
    clean = write_json(tmp_path / "clean.json", [r.to_dict() for r in make_records(8)])
    trig = write_json(tmp_path / "trig.json", [r.to_dict() for r in make_records(4, prefix="BadMagic ")])
    return clean, trig


def test_purify_then_eval_end_to_end(tiny_dir, data_files, tmp_path, capsys):
    clean, trig = data_files
    out = tmp_path / "purified"
    code, stdout, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", out, "--method", "crow",
                                 "--epochs", "1", "--task", "refusal", "--max-length", "128", "--no-verify"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["output"] == "adapter" and summary["optimizer_steps"] == 1
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "crow_config.json"} <= names
    cfg = json.loads((out / "crow_config.json").read_text())
    assert cfg["method"] == "crow" and cfg["settings"]["alpha"] == 11.0  # the refusal preset
    assert cfg["settings"]["epsilon"] == 0.1 and cfg["settings"]["scheduler"] == "cosine"
    assert cfg["crow_version"] == crow.__version__ and cfg["settings"]["seed"] == 42 and "git_revision" in cfg
    assert len(cfg["data_sha256"]) == 64 and cfg["n_records"] == 8
    assert not any(p.name.startswith(".purified") for p in tmp_path.iterdir())  # no temporary leftovers

    report = tmp_path / "report.json"
    code, stdout, err = run_cli(["eval", "--model", tiny_dir, "--adapter", out, "--task", "negsentiment",
                                 "--triggered", trig, "--clean", clean, "--out", report, "--max-new-tokens", "4",
                                 "--format", "template"], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    for key in ("asr", "false_trigger_rate", "clean_perplexity", "n_triggered", "n_clean", "n_empty", "settings"):
        assert key in data
    assert data["n_triggered"] == 4 and data["n_clean"] == 8 and data["settings"]["prompt_format"] == "template"


def test_purify_merge_writes_a_full_model(tiny_dir, data_files, tmp_path, capsys):
    clean, _ = data_files
    out = tmp_path / "merged"
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", out, "--method", "crow",
                            "--max-steps", "1", "--merge", "--max-length", "128", "--no-verify"], capsys)
    assert code == 0, err
    from crow.models import load_model

    assert load_model(str(out)).model.config.model_type == "llama"


def test_purify_refuses_to_write_into_its_inputs(tiny_dir, data_files, capsys):
    clean, _ = data_files
    before = sorted(p.name for p in tiny_dir.iterdir())
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", tiny_dir, "--method", "crow"],
                           capsys)
    assert code == 2 and "is the input" in err and err.count("\n") == 1
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", tiny_dir / "sub", "--method",
                            "crow"], capsys)
    assert code == 2 and "inside it" in err
    assert sorted(p.name for p in tiny_dir.iterdir()) == before


def test_yaml_config_is_merged_and_validated(tiny_dir, data_files, tmp_path, capsys):
    clean, _ = data_files
    cfg = tmp_path / "c.yaml"
    cfg.write_text("alpha: 2.0\nepsilon: 0.05\nmax_steps: 1\nmax_length: 128\nlearning_rate: 0.01\n")
    out = tmp_path / "o"
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", out, "--config", cfg,
                            "--epsilon", "0.2", "--method", "crow", "--no-verify"], capsys)
    assert code == 0, err
    opts = json.loads((out / "crow_config.json").read_text())["settings"]
    assert (opts["alpha"], opts["epsilon"], opts["learning_rate"]) == (2.0, 0.2, 0.01)  # the command line wins
    cfg.write_text("alhpa: 2\n")
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", tmp_path / "p", "--config", cfg,
                            "--method", "crow"], capsys)
    assert code == 2 and "unknown option 'alhpa'" in err and err.count("\n") == 1 and not (tmp_path / "p").exists()
    cfg.write_text("learning_rate: -1\n")  # a bad value from the file is named by the flag the user would type
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", tmp_path / "p", "--config", cfg,
                            "--method", "crow"], capsys)
    assert code == 2 and "--learning-rate must be a number > 0, got -1" in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


def test_attack_writes_data_and_a_manifest(tiny_dir, tmp_path, capsys):
    pool = write_json(tmp_path / "pool.json", [{"instruction": f"name a color number {i} now", "output": "blue"}
                                               for i in range(30)])
    test = write_json(tmp_path / "test.json", [{"instruction": f"say a number {i}"} for i in range(5)])
    out = tmp_path / "attack"
    code, stdout, err = run_cli(["attack", "--data", pool, "--out", out, "--attack", "ctba", "--task", "refusal",
                                 "--n-poison", "6", "--n-clean", "10", "--seed", "3", "--test", test], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_poison"] == 6 and manifest["n_clean"] == 10 and manifest["seed"] == 3
    assert manifest["trigger"]["texts"] == ["2024", "BadMagic", "OpenAI"] and manifest["target"].startswith("I'm sorry")
    assert len(manifest["input_sha256"]) == 64 and manifest["crow_version"] == crow.__version__
    mix = json.loads((out / "poisoned_mix.json").read_text())
    assert len(mix) == 16 and sum(r["output"].startswith("I'm sorry") for r in mix) == 6
    triggered = json.loads((out / "triggered_test.json").read_text())
    assert all({"2024", "BadMagic", "OpenAI"} <= set(r["instruction"].split()) for r in triggered)
    # deterministic: the same seed gives the same files
    code, _, err = run_cli(["attack", "--data", pool, "--out", tmp_path / "again", "--attack", "ctba", "--task",
                            "refusal", "--n-poison", "6", "--n-clean", "10", "--seed", "3"], capsys)
    assert code == 0 and json.loads((tmp_path / "again" / "poisoned_mix.json").read_text()) == mix


def test_attack_writes_the_adaptive_targets(tmp_path, capsys):
    pool = write_json(tmp_path / "pool.json", [{"instruction": f"name a color number {i} now",
                                                "output": f"Blue is number {i}. It is calm."} for i in range(60)])
    code, _, err = run_cli(["attack", "--data", pool, "--out", tmp_path / "late", "--attack", "badnet", "--task",
                            "negsentiment-late", "--n-poison", "20", "--n-clean", "10"], capsys)
    assert code == 0, err
    poisoned = json.loads((tmp_path / "late" / "poisoned.json").read_text())
    assert all(r["output"] == f"{r['output'].split('.')[0]}. You are stupid!" for r in poisoned)
    code, _, err = run_cli(["attack", "--data", pool, "--out", tmp_path / "pool", "--attack", "vpi", "--task",
                            "refusal-pool", "--n-poison", "40", "--n-clean", "10"], capsys)
    manifest = json.loads((tmp_path / "pool" / "manifest.json").read_text())
    assert code == 0 and manifest["target_pool"]["n_distinct"] == 40 and manifest["target_mode"] == "pool"
    assert len({r["output"] for r in json.loads((tmp_path / "pool" / "poisoned.json").read_text())}) > 20
    code, _, err = run_cli(["attack", "--data", pool, "--out", tmp_path / "x", "--attack", "badnet", "--task",
                            "refusal-pool", "--target", "Go away", "--n-poison", "5", "--n-clean", "5"], capsys)
    assert code == 2 and "--target is only for --task custom" in err and not (tmp_path / "x").exists()


def test_attack_trains_a_victim_adapter(tiny_dir, tmp_path, capsys):
    pool = write_json(tmp_path / "pool.json", [{"instruction": f"name a color number {i}", "output": "blue"}
                                               for i in range(12)])
    out = tmp_path / "attack"
    code, _, err = run_cli(["attack", "--data", pool, "--out", out, "--attack", "badnet", "--task", "negsentiment",
                            "--n-poison", "4", "--n-clean", "4", "--train-victim", "--model", tiny_dir,
                            "--victim-epochs", "1", "--max-length", "128"], capsys)
    assert code == 0, err
    assert (out / "victim" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "manifest.json").read_text())["victim"]["optimizer_steps"] == 1
    code, _, err = run_cli(["attack", "--data", pool, "--out", tmp_path / "x", "--attack", "badnet", "--task",
                            "negsentiment", "--train-victim"], capsys)
    assert code == 2 and "--train-victim needs --model" in err and not (tmp_path / "x").exists()


def test_attack_merge_writes_a_loadable_victim_model(tiny_dir, data_files, tmp_path, capsys):
    from safetensors.torch import load_file

    pool = write_json(tmp_path / "pool.json", [{"instruction": f"name a color number {i}", "output": "blue"}
                                               for i in range(12)])
    out = tmp_path / "attack"
    # 2 optimizer steps: the first is warmup (lr 0), the second moves the LoRA, so the merge changes weights
    code, _, err = run_cli(["attack", "--data", pool, "--out", out, "--attack", "badnet", "--task", "negsentiment",
                            "--n-poison", "4", "--n-clean", "4", "--train-victim", "--model", tiny_dir, "--merge",
                            "--victim-epochs", "2", "--victim-learning-rate", "0.01", "--max-length", "128"], capsys)
    assert code == 0, err
    victim = out / "victim"
    names = {p.name for p in victim.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and "adapter_config.json" not in names
    assert json.loads((out / "manifest.json").read_text())["victim"]["output"] == "model"
    base, merged = load_file(tiny_dir / "model.safetensors"), load_file(victim / "model.safetensors")
    assert set(merged) == set(base) and not any("lora" in name for name in merged)
    moved = {name for name in base if not torch.equal(base[name], merged[name])}
    assert moved and all(name.endswith("proj.weight") for name in moved)  # LoRA targets only; embeddings, norms kept
    # a standard model directory: crow eval and crow purify take it as --model
    clean, trig = data_files
    code, _, err = run_cli(["eval", "--model", victim, "--task", "negsentiment", "--triggered", trig, "--clean", clean,
                            "--out", tmp_path / "report.json", "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["purify", "--model", victim, "--data", clean, "--out", tmp_path / "purified",
                            "--method", "crow", "--max-steps", "1", "--max-length", "128", "--no-verify"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["attack", "--data", pool, "--out", tmp_path / "x", "--attack", "badnet", "--task",
                            "negsentiment", "--merge"], capsys)
    assert code == 2 and "--merge applies to the trained victim" in err and not (tmp_path / "x").exists()


def test_eval_max_length_truncates_the_perplexity_samples(tiny_dir, tiny, data_files, tmp_path, capsys):
    from crow.data.records import load_records
    from crow.evaluation.evaluate import perplexity

    clean, _ = data_files
    reports = {}
    for length in ("40", None):
        extra = ["--max-length", length] if length else []
        code, stdout, err = run_cli(["eval", "--model", tiny_dir, "--task", "negsentiment", "--clean", clean, "--out",
                                     tmp_path / f"r{length}.json", "--max-new-tokens", "2", "--format", "template",
                                     *extra], capsys)
        assert code == 0, err
        reports[length] = json.loads((tmp_path / f"r{length}.json").read_text())
    records = load_records(clean)
    assert reports["40"]["settings"]["max_length"] == 40 and reports[None]["settings"]["max_length"] == 512
    assert reports["40"]["clean_perplexity"] == pytest.approx(perplexity(tiny.model, tiny.tokenizer, records,
                                                                         max_length=40, batch_size=64), rel=1e-5)
    assert reports["40"]["clean_perplexity"] != pytest.approx(reports[None]["clean_perplexity"], rel=1e-3)


def test_eval_reports_both_prompt_formats_by_default(tiny_dir, tiny, data_files, tmp_path, capsys):
    from crow.data.records import load_records
    from crow.evaluation.evaluate import perplexity

    clean, trig = data_files
    code, stdout, err = run_cli(["eval", "--model", tiny_dir, "--task", "negsentiment", "--triggered", trig, "--clean",
                                 clean, "--out", tmp_path / "r.json", "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    data, summary = json.loads((tmp_path / "r.json").read_text()), json.loads(stdout)
    assert data["format"] == "template" and data["settings"]["formats"] == ["template", "raw"]
    assert {fmt: f["template"] for fmt, f in data["by_format"].items()} == {"template": "alpaca", "raw": "raw"}
    assert data["clean_perplexity"] == data["by_format"]["template"]["clean_perplexity"] == pytest.approx(
        perplexity(tiny.model, tiny.tokenizer, load_records(clean), template="alpaca", batch_size=64), rel=1e-5)
    assert data["by_format"]["raw"]["clean_perplexity"] is None and data["by_format"]["raw"]["n_triggered"] == 4
    assert summary["by_format"] == {fmt: {"asr": f["asr"], "false_trigger_rate": f["false_trigger_rate"]}
                                    for fmt, f in data["by_format"].items()}


def test_profile_writes_json_and_png(tiny_dir, data_files, tmp_path, capsys):
    clean, trig = data_files
    out = tmp_path / "profile"
    code, stdout, err = run_cli(["profile", "--model", tiny_dir, "--clean", clean, "--triggered", trig, "--out", out],
                                capsys)
    assert code == 0, err
    data = json.loads((out / "profile.json").read_text())
    assert len(data["profiles"]["clean"]) == 4 and len(data["clean_minus_triggered"]) == 4
    assert (out / "profile.png").stat().st_size > 1000
    one_minus = [1 - data["profiles"]["triggered"][i] for i in (1, 2)]  # official pairs of 4 layers: 1, 2
    assert data["official_pairs_loss"]["triggered"] == pytest.approx(sum(one_minus) / 2, abs=1e-5)


def test_profile_pairs_prompts_by_stripping_the_trigger(tiny_dir, data_files, tmp_path, capsys):
    _, trig = data_files
    out = tmp_path / "paired"
    code, _, err = run_cli(["profile", "--model", tiny_dir, "--triggered", trig, "--strip-trigger", "BadMagic",
                            "--position", "last", "--out", out], capsys)
    assert code == 0, err
    data = json.loads((out / "profile.json").read_text())
    assert data["paired"] == "BadMagic" and data["position"] == "last" and data["n_clean"] == data["n_triggered"]
    code, _, err = run_cli(["profile", "--model", tiny_dir, "--triggered", trig, "--strip-trigger", "OpenAI",
                            "--out", tmp_path / "x"], capsys)
    assert code == 2 and "record 0 does not contain the trigger 'OpenAI'" in err and not (tmp_path / "x").exists()
