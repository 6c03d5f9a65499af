"""Bad input, faults and untrusted weights: every failure is one clear line and leaves nothing behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crow import CrowError
from crow.cli.main import main
from crow.data.records import load_records

from .conftest import make_records, write_json

FUZZ_COUNTS = {"dataset files": 0, "option combinations": 0}


def assert_one_clean_line(code, err):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("crow") and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# Fuzzing: malformed dataset files and option combinations
# ---------------------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(json_scalars,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)
bad_record = st.one_of(
    json_values.filter(lambda v: not isinstance(v, dict)),  # not an object
    st.fixed_dictionaries({"output": st.text(max_size=5)}),  # no instruction
    st.fixed_dictionaries({"instruction": st.text(max_size=5).filter(lambda s: s.strip())}),  # no output
    st.fixed_dictionaries({"instruction": json_scalars.filter(lambda v: not isinstance(v, str) and v is not None),
                           "output": st.text(max_size=5)}),  # wrong type
    st.fixed_dictionaries({"instruction": st.sampled_from(["", "  ", "\n"]), "output": st.text(max_size=5)}),
    st.fixed_dictionaries({"instruction": st.text(min_size=1, max_size=5).filter(lambda s: s.strip()),
                           "output": st.text(max_size=3), "input": st.integers()}),  # input of the wrong type
)
good_record = st.fixed_dictionaries({"instruction": st.text(min_size=1, max_size=12).filter(lambda s: s.strip()),
                                     "output": st.text(max_size=12)})


@st.composite
def malformed_dataset(draw) -> bytes:
    kind = draw(st.sampled_from(["list", "jsonl", "truncated", "text", "bytes", "scalar", "empty"]))
    records = draw(st.lists(good_record, max_size=3))
    records.insert(draw(st.integers(0, len(records))), draw(bad_record))
    if kind == "list":
        return json.dumps(records).encode()
    if kind == "jsonl":
        return "\n".join(json.dumps(r) for r in records).encode()
    if kind == "truncated":
        text = json.dumps(records)
        return text[: draw(st.integers(1, max(1, len(text) - 1)))].encode()
    if kind == "text":
        return draw(st.text(min_size=1, max_size=30).filter(lambda s: s.strip()[:1] not in "[{")).encode()
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=30))
    if kind == "scalar":
        return json.dumps(draw(json_scalars)).encode()
    return draw(st.sampled_from([b"", b"  \n", b"[]", b"\n\n"]))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=malformed_dataset())
def test_fuzz_malformed_dataset_files(tmp_path_factory, content):
    FUZZ_COUNTS["dataset files"] += 1
    path = tmp_path_factory.mktemp("fuzz") / "data.json"
    path.write_bytes(content)
    try:
        load_records(path)
    except CrowError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        pytest.fail(f"accepted a malformed file: {content[:80]!r}")


BAD_OPTIONS = [
    ["--alpha", "-1"], ["--alpha", "abc"], ["--epsilon", "nan"], ["--epsilon", "-0.1"], ["--learning-rate", "x"],
    ["--epochs", "-2"], ["--batch-size", "0"], ["--grad-accum", "1.5"], ["--max-length", "0"],
    ["--layers", "3-5"], ["--layers", "first"], ["--token-scope", "some"], ["--template", "vicuna"],
    ["--task", "jailbreak"], ["--lora-r", "0"], ["--lora-dropout", "-1"], ["--limit", "-3"], ["--frobnicate"],
    ["--full-finetune", "--adapter", "ADAPTER"], ["--resume"], ["--dtype", "float7"], ["--seed", "one"],
    ["--save-steps", "0"], ["--warmup", "inf"], ["--scheduler", "sideways"],
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.lists(st.sampled_from(BAD_OPTIONS), min_size=1, max_size=3),
       good=st.lists(st.sampled_from([["--alpha", "5.5"], ["--epsilon", "0.1"], ["--epochs", "1"], ["--lora-r", "4"],
                                      ["--token-scope", "masked"], ["--layers", "1:3"]]), max_size=2),
       data_kind=st.sampled_from(["good", "missing", "malformed"]))
def test_fuzz_cli_option_combinations(tiny_dir, tmp_path_factory, capsys, bad, good, data_kind):
    FUZZ_COUNTS["option combinations"] += 1
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data.json"
    if data_kind == "good":
        write_json(data, [r.to_dict() for r in make_records(4)])
    elif data_kind == "malformed":
        data.write_text('[{"instruction": "x"}')
    adapter = tmp / "adapter"
    args = ["purify", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp / "out"), "--method", "crow"]
    for option in good + bad:
        args += [str(adapter) if a == "ADAPTER" else a for a in option]
    code = main(args)
    _, err = capsys.readouterr()
    assert_one_clean_line(code, err)
    assert not (tmp / "out").exists() and sorted(p.name for p in tmp.iterdir()) == sorted(
        p.name for p in [data] if p.exists())


def test_fuzz_counts_reported():
    # Runs after the fuzz tests in file order (when they ran in this session); the note quotes these numbers.
    if all(FUZZ_COUNTS.values()):
        assert FUZZ_COUNTS["dataset files"] >= 200 and FUZZ_COUNTS["option combinations"] >= 100, FUZZ_COUNTS
        print(f"\nfuzzed {FUZZ_COUNTS}")


# ---------------------------------------------------------------------------------------------
# Each verb's bad inputs
# ---------------------------------------------------------------------------------------------
def test_eval_bad_inputs(tiny_dir, tmp_path, capsys):
    clean = write_json(tmp_path / "c.json", [r.to_dict() for r in make_records(2)])
    cases = [
        (["--task", "negsentiment", "--clean", tmp_path / "none.json"], "does not exist"),
        (["--task", "sentiment", "--clean", clean], "unknown task 'sentiment'"),
        (["--clean", clean], "name a task"),
        (["--task", "refusal"], "give --triggered and/or --clean"),
        (["--task", "refusal", "--clean", clean, "--format", "chatty"], "invalid choice"),
        (["--task", "refusal", "--clean", clean, "--max-new-tokens", "0"], "must be >= 1"),
    ]
    for extra, match in cases:
        code = main(["eval", "--model", str(tiny_dir), "--out", str(tmp_path / "r.json"), *map(str, extra)])
        _, err = capsys.readouterr()
        assert_one_clean_line(code, err)
        assert match in err, (extra, err)
        assert not (tmp_path / "r.json").exists()


def test_model_with_too_few_layers_for_the_layer_range(tmp_path, capsys):
    from crow.models import build_tiny_model

    from .conftest import corpus

    two = build_tiny_model(tmp_path / "two", corpus(40), num_layers=2, vocab_size=300)
    data = write_json(tmp_path / "d.json", [r.to_dict() for r in make_records(4)])
    code = main(["purify", "--model", str(two), "--data", str(data), "--out", str(tmp_path / "o"), "--max-steps", "1",
                 "--max-length", "128", "--method", "crow", "--no-verify"])
    _, err = capsys.readouterr()
    assert_one_clean_line(code, err)
    assert "2 layers" in err and "layers='all'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "two"]  # no output, no partial run


def test_untrusted_pickle_model_is_refused_on_the_command_line(tiny_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    data = write_json(tmp_path / "d.json", [r.to_dict() for r in make_records(2)])
    code = main(["purify", "--model", str(pickled), "--data", str(data), "--out", str(tmp_path / "o"), "--method",
                 "crow"])
    _, err = capsys.readouterr()
    assert_one_clean_line(code, err)
    assert "pytorch_model.bin" in err and "--allow-pickle" in err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Faults: NaN, interruption and resume
# ---------------------------------------------------------------------------------------------
def test_nan_loss_stops_training_and_writes_nothing(tiny_dir, tmp_path, capsys):
    data = write_json(tmp_path / "d.json", [r.to_dict() for r in make_records(8)])
    code = main(["purify", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--full-finetune", "--learning-rate", "1e30", "--warmup", "0", "--scheduler", "constant",
                 "--max-steps", "6", "--batch-size", "2", "--grad-accum", "1", "--max-length", "128", "--method",
                 "crow", "--no-verify"])
    _, err = capsys.readouterr()
    # stderr is no terminal here: progress comes as "training step" lines, then the one-line error
    *progress, error = err.splitlines()
    assert code == 3 and all(line.startswith("crow: training step ") for line in progress), err
    assert "training stopped: the loss was" in error and "at optimizer step" in error and "last finite losses" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def _purify_cmd(tiny_dir, data, out, *extra):
    return [sys.executable, "-m", "crow.cli.main", "purify", "--model", str(tiny_dir), "--data", str(data),
            "--out", str(out), "--max-steps", "12", "--batch-size", "2", "--grad-accum", "2", "--save-steps", "1",
            "--max-length", "128", "--seed", "7", "--method", "crow", "--no-verify", *extra]


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def test_kill_and_resume_gives_the_same_adapter(tiny_dir, tmp_path):
    data = write_json(tmp_path / "d.json", [r.to_dict() for r in make_records(24)])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = subprocess.run(_purify_cmd(tiny_dir, data, tmp_path / "ref"), capture_output=True, text=True, env=env,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "run"
    partial = tmp_path / ".run.crow-partial"
    proc = subprocess.Popen(_purify_cmd(tiny_dir, data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 300
    while not list(partial.glob("checkpoint-3")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command with --resume" in err and not out.exists()
    steps = sorted(int(p.name.split("-")[1]) for p in partial.glob("checkpoint-*"))
    assert steps and steps[-1] < 12

    # Without --resume the interrupted run is not silently thrown away.
    blocked = subprocess.run(_purify_cmd(tiny_dir, data, out), capture_output=True, text=True, env=env, timeout=600)
    assert blocked.returncode == 2 and "pass --resume" in blocked.stderr

    resumed = subprocess.run(_purify_cmd(tiny_dir, data, out, "--resume"), capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partial.exists()
    assert json.loads((out / "crow_config.json").read_text())["resumed"] is True
    a, b = _adapter(tmp_path / "ref"), _adapter(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_outputs_get_the_modes_of_ordinary_files_under_the_umask(tmp_path):
    import stat

    from safetensors.torch import save_file

    from crow.outputs import staged_dir, write_json_atomic

    old = os.umask(0o027)
    try:
        out = tmp_path / "adapter"
        with staged_dir(out) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))  # safetensors' writer: 0600
            (tmp / "sub").mkdir()
            write_json_atomic(tmp / "sub" / "crow_config.json", {"a": 1})
        modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in (out, *out.rglob("*"))}
        assert modes == {"adapter": 0o750, "adapter/adapter_model.safetensors": 0o640, "adapter/sub": 0o750,
                         "adapter/sub/crow_config.json": 0o640}
        report = tmp_path / "report.json"
        write_json_atomic(report, {})
        assert stat.S_IMODE(report.stat().st_mode) == 0o640
        os.chmod(report, 0o600)  # a mode the user gave the file survives a rewrite
        write_json_atomic(report, {"b": 2})
        assert stat.S_IMODE(report.stat().st_mode) == 0o600 and json.loads(report.read_text()) == {"b": 2}
    finally:
        os.umask(old)
