import pytest
import torch

from crow import CrowError
from crow.defenses import DefenseContext, get_defense
from crow.defenses.weights import (
    NF4_CODE,
    input_feature_norms,
    int8_roundtrip,
    mlp_down_projections,
    nf4_roundtrip,
    prunable_linears,
)
from crow.methods.crow import CrowConfig
from crow.models import load_model
from crow.training import is_peft_model, make_trainable

from .conftest import make_records


@pytest.fixture
def victim(tiny_dir):
    """The tiny model with a (random, non-zero) LoRA adapter standing in for a suspect adapter."""
    loaded = load_model(str(tiny_dir))
    torch.manual_seed(0)
    model = make_trainable(loaded.model, CrowConfig())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, loaded.tokenizer


def ctx(tmp_path, n=8):
    return DefenseContext(clean=make_records(n), template="alpaca", max_length=128, work_dir=tmp_path,
                          task="negsentiment")


def test_registry_errors_list_the_valid_choices():
    with pytest.raises(CrowError, match="unknown defense 'pruning'; valid: none, unlearn, crow, finetune"):
        get_defense("pruning")
    with pytest.raises(CrowError, match="has no setting 'sparsty'; valid: sparsity"):
        get_defense("prune-wanda", sparsty=0.5)
    assert get_defense("finetune").config().learning_rate == 2e-4 and get_defense("finetune").config().alpha == 0.0
    assert get_defense("finetune-lr1e-3").config().learning_rate == 1e-3
    assert get_defense("crow").config("refusal").alpha == 11.0 and get_defense("crow").config(None).alpha == 5.5


def test_wanda_prunes_the_lowest_weight_times_activation_norm_per_row(victim, tmp_path):
    model, tok = victim
    merged_reference = model.merge_and_unload()  # what wanda sees
    linears = prunable_linears(merged_reference)
    norms = input_feature_norms(merged_reference, tok, ctx(tmp_path), linears)
    name = "model.layers.1.mlp.down_proj"
    weight = linears[name].weight.detach().clone()
    head = merged_reference.get_output_embeddings().weight.detach().clone()
    expected_score = weight.abs() * norms[name][None, :]

    repaired = get_defense("prune-wanda", sparsity=0.35).repair(merged_reference, tok, ctx(tmp_path))
    pruned = dict(prunable_linears(repaired))[name].weight
    k = int(weight.shape[1] * 0.35)
    assert ((pruned == 0).sum(dim=1) == k).all()
    lowest = torch.topk(expected_score, k, dim=1, largest=False).indices
    assert (pruned.gather(1, lowest) == 0).all()
    assert all((m.weight == 0).float().mean() > 0.3 for m in prunable_linears(repaired).values())
    assert torch.equal(repaired.get_output_embeddings().weight, head)  # the head is left alone


def test_magnitude_prunes_each_matrix(victim, tmp_path):
    model, tok = victim
    repaired = get_defense("prune-magnitude", sparsity=0.5).repair(model, tok, ctx(tmp_path))
    assert not is_peft_model(repaired)
    for m in prunable_linears(repaired).values():
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_int8_and_nf4_roundtrips():
    w = torch.randn(16, 256)
    q8 = int8_roundtrip(w)
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q8 - w).abs() <= scale / 2 + 1e-6).all()
    assert all(len(torch.unique(row)) <= 255 for row in q8)
    q4 = nf4_roundtrip(w)
    for block in q4.flatten().view(-1, 64):
        assert len(torch.unique(block)) <= 16
    absmax = w.flatten().view(-1, 64).abs().amax(dim=1)
    codes = q4.flatten().view(-1, 64) / absmax[:, None]
    assert torch.isclose(codes[..., None], NF4_CODE).any(-1).all()  # every value is a code level times absmax


def test_quantize_defenses_change_weights(victim, tmp_path):
    model, tok = victim
    repaired = get_defense("quantize").repair(model, tok, ctx(tmp_path))
    for m in prunable_linears(repaired).values():
        assert len(torch.unique(m.weight[0])) <= 255
    assert "simulated" in get_defense("quantize-nf4").settings()["implementation"]


def test_fineprune_zeroes_the_least_active_neurons_then_finetunes(victim, tmp_path):
    model, tok = victim
    assert len(mlp_down_projections(model.merge_and_unload())) == 4
    defense = get_defense("fineprune", prune_ratio=0.25, layer_fraction=0.5, epochs=1.0)
    repaired = defense.repair(model, tok, ctx(tmp_path))
    assert is_peft_model(repaired)  # a new LoRA was trained on the pruned model
    downs = [m for n, m in repaired.named_modules() if n.endswith("mlp.down_proj")]
    assert len(downs) == 4
    dead = [m.base_layer.weight.eq(0).all(dim=0).sum().item() for m in downs]
    assert dead[-2:] == [16, 16] and dead[:2] == [0, 0]  # 25% of 64 neurons in the last half of 4 layers


def test_training_defenses_continue_the_suspect_adapter(victim, tmp_path):
    model, tok = victim
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    repaired = get_defense("crow", epochs=1.0).repair(model, tok, ctx(tmp_path, n=16))
    after = dict(repaired.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert set(before) == {n for n in after if "lora_" in n}  # the same adapter, no new one


def test_a_defense_seed_overrides_the_cells_seed(victim, tmp_path, monkeypatch):
    """``seed`` repeats a training defense on the same victim with another seed; unset, the cell's seed rules."""
    import types

    import crow.methods.crow
    import crow.methods.unlearn

    seen = []

    def fake_run(model, tokenizer, clean, config, run_options=None, **kwargs):  # records the seed, trains nothing
        seen.append(config.seed)
        return types.SimpleNamespace(model=model, log_history=[])

    # a training defense runs its method's run(): crow's, and unlearn's whole recipe (target recovery included)
    monkeypatch.setattr(crow.methods.crow, "run", fake_run)
    monkeypatch.setattr(crow.methods.unlearn, "run", fake_run)
    model, tok = victim
    context = DefenseContext(clean=make_records(4), work_dir=tmp_path, seed=7)
    for name in ("crow", "finetune-lr1e-3", "unlearn"):
        get_defense(name).repair(model, tok, context)
        get_defense(name, seed=1).repair(model, tok, context)
    assert seen == [7, 1, 7, 1, 7, 1]


def test_reinit_adapter_drops_the_suspect_adapter_and_trains_a_fresh_one(victim, tiny_dir, tmp_path):
    model, tok = victim
    clean = load_model(str(tiny_dir)).model  # the base weights, without any adapter
    suspect = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    defense = get_defense("reinit-adapter", epochs=1.0)
    assert defense.reference and defense.config().learning_rate == 1e-3 and defense.config().alpha == 0.0
    repaired = defense.repair(model, tok, ctx(tmp_path, n=16))
    assert is_peft_model(repaired) and list(repaired.peft_config) == ["default"]  # one adapter: the new one
    assert repaired.peft_config["default"].r == 8 and repaired.peft_config["default"].lora_alpha == 16
    new = {n: p for n, p in repaired.named_parameters() if "lora_B" in n}
    assert set(new) == set(suspect)  # every linear layer has the new adapter
    assert all(p.requires_grad for p in new.values())
    # trained from zero for two steps at lr 1e-3 (|B| ~ 2e-3), not continued from the suspect's B (std 0.05)
    assert max(p.abs().max().item() for p in new.values()) < 0.01
    assert any(p.abs().max().item() > 0 for p in new.values())
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    with torch.no_grad(), repaired.disable_adapter():  # the base weights are the clean ones: nothing was merged
        assert torch.equal(repaired(input_ids=ids).logits, clean(input_ids=ids).logits)
    with pytest.raises(CrowError, match="'reinit-adapter' needs an adapter victim .* got a LlamaForCausalLM"):
        defense.repair(clean, tok, ctx(tmp_path))
    with pytest.raises(CrowError, match="'reinit-adapter' needs an adapter victim .* victims are 'merged'"):
        defense.check_victim("merged")
    with pytest.raises(CrowError, match="full_finetune: true contradicts it"):
        get_defense("reinit-adapter", full_finetune=True)


def test_crow_on_a_merged_victim_trains_a_new_lora_or_every_weight(victim, tiny_dir, tmp_path):
    model, tok = victim
    weights = model.merge_and_unload()  # a merged victim: the suspect adapter is in the weights, no adapter
    before = {n: p.detach().clone() for n, p in weights.named_parameters()}
    repaired = get_defense("crow", epochs=1.0).repair(weights, tok, ctx(tmp_path, n=16))
    assert is_peft_model(repaired) and repaired.peft_config["default"].r == 8  # a new LoRA (purify adds it)
    after = {n.replace(".base_layer", ""): p for n, p in repaired.get_base_model().named_parameters()
             if "lora_" not in n}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert any(p.abs().max() > 0 for n, p in repaired.named_parameters() if "lora_B" in n)

    defense = get_defense("crow", epochs=1.0, full_finetune=True)
    with pytest.raises(CrowError, match="full_finetune: true needs a victim without an adapter"):
        defense.check_victim("adapter")
    defense.check_victim("merged")
    plain = load_model(str(tiny_dir)).model
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    repaired = defense.repair(plain, tok, ctx(tmp_path, n=16))
    assert not is_peft_model(repaired)
    changed = [n for n, p in repaired.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.mlp.down_proj.weight" in changed and "model.layers.3.self_attn.q_proj.weight" in changed


def test_the_interface_does_not_import_the_registry():
    """base.py is the interface and registry.py imports it: no import runs the other way (no circle)."""
    import ast
    from pathlib import Path

    import crow.defenses.base as base

    tree = ast.parse(Path(base.__file__).read_text())
    imported = {f"{node.module or ''}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert not any("registry" in name for name in imported), imported
    from crow.defenses import DEFENSES, get_defense

    assert "crow" in DEFENSES and get_defense("none").name == "none"


@pytest.mark.parametrize("name, setting", [("prune-wanda", "sparsity"), ("prune-magnitude", "sparsity"),
                                           ("fineprune", "prune_ratio")])
def test_a_fraction_out_of_range_is_refused_when_the_defense_is_built(name, setting):
    """Before any model is loaded (``get_defense`` is what ``crow bench`` validates a spec with)."""
    with pytest.raises(CrowError, match=rf"{setting} must be in \[0, 1\), got 1.0"):
        get_defense(name, **{setting: 1.0})
