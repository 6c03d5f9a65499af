"""A reduced demo, end to end, on a tiny model: checks the plumbing, not CROW's effect."""

import json

from crow.cli.main import main

TINY = ["n_poison=6", "n_clean=10", "victim_epochs=1", "n_defense=8", "defense_epochs=1", "n_eval_triggered=4",
        "n_eval_clean=6", "eval_max_new_tokens=4", "base_max_new_tokens=6", "max_length=128"]


def test_reduced_demo_end_to_end(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CROW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--model", str(tiny_dir), "--out", str(out)] + [a for kv in TINY for a in ("--set", kv)]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "victim" in stdout and "crow" in stdout and "finetune" in stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"base", "victim", "crow", "finetune"}
    for e in report["models"].values():
        for key in ("asr", "false_trigger_rate", "clean_exact_match", "clean_perplexity", "n_triggered", "n_clean",
                    "n_empty"):
            assert key in e
        assert e["n_triggered"] == 4 and e["n_clean"] == 6
    assert set(report["seconds"]) >= {"victim_training", "crow", "finetune", "evaluation", "total"}
    assert report["seconds"]["victim_cached"] is False
    assert (out / "report.md").read_text().startswith("# crow demo")
    assert (out / "consistency_profile.png").stat().st_size > 1000
    assert len(report["profiles"]["victim"]["clean"]) == 4  # 4 layers: 4 consecutive pairs

    # Warm: the victim comes from the cache, and its numbers are the same.
    out2 = tmp_path / "demo2"
    assert main(["demo", "--model", str(tiny_dir), "--out", str(out2)] + [a for kv in TINY for a in ("--set", kv)]) == 0
    warm = json.loads((out2 / "report.json").read_text())
    assert warm["seconds"]["victim_cached"] is True
    assert warm["models"]["victim"] == report["models"]["victim"]


def test_demo_rejects_bad_settings(tiny_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(tiny_dir), "--out", str(tmp_path / "d"), "--set", "n_poison=many"]) == 2
    assert "n_poison must be of type int" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--attack", "trojan"]) == 2
    assert "unknown attack 'trojan'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
