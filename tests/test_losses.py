import pytest
import torch
import torch.nn.functional as F

from benchmarks.official_crow import official_consistency
from crow import CrowError, consistency_profile, fgsm_delta, layer_consistency_loss, layer_pairs
from crow.losses import causal_lm_loss_sum, logits_needed
from crow.models import TINY_ARCHITECTURES, tiny_config


def random_hidden_states(n_states=7, b=3, t=5, h=16, dtype=torch.float32):
    return tuple(torch.randn(b, t, h, dtype=dtype) for _ in range(n_states))


@pytest.mark.parametrize("n_states,b,t,h", [(4, 1, 1, 4), (7, 3, 5, 16), (31, 2, 9, 8)])
def test_official_layers_equal_the_released_formula(n_states, b, t, h):
    hs = random_hidden_states(n_states, b, t, h)
    assert torch.allclose(layer_consistency_loss(hs), official_consistency(hs), atol=1e-6)


def test_official_formula_on_a_tiny_model(tiny):
    ids = torch.randint(3, 500, (2, 11))
    hs = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hs) == 5  # embeddings + 4 layers (the last after the final norm)
    assert torch.allclose(layer_consistency_loss(hs), official_consistency(hs), atol=1e-6)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_hidden_states_of_every_tiny_architecture(arch):
    """One hidden state per decoder layer plus the embeddings, on every architecture crow tests, and the
    loss on them is the released formula (Gemma-3-270M: 18 layers, 19 entries)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 64, num_layers=3)).eval()
    with torch.no_grad():
        hs = model(input_ids=torch.randint(3, 64, (2, 12)), output_hidden_states=True).hidden_states
    assert len(hs) == 4 and all(h.shape == (2, 12, 32) for h in hs)
    assert torch.allclose(layer_consistency_loss(hs), official_consistency(hs), atol=1e-6)


def test_identical_hidden_states_give_zero():
    h = torch.randn(2, 4, 8)
    assert layer_consistency_loss((h,) * 6).item() == pytest.approx(0.0, abs=1e-6)


def test_low_precision_inputs_are_computed_in_fp32():
    hs = random_hidden_states(6, dtype=torch.bfloat16)
    loss = layer_consistency_loss(hs)
    assert loss.dtype == torch.float32
    expected = official_consistency(tuple(h.float() for h in hs))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_layer_ranges():
    assert list(layer_pairs(7, "official")) == [1, 2, 3, 4]
    assert list(layer_pairs(7, "all")) == [0, 1, 2, 3, 4, 5]
    assert list(layer_pairs(7, (2, 4))) == [2, 3]
    assert list(layer_pairs(7, "0:6")) == list(range(6))
    hs = random_hidden_states(7)
    manual = sum((1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1, eps=1e-8)).mean() for i in range(6)) / 6
    assert torch.allclose(layer_consistency_loss(hs, layers="all"), manual, atol=1e-6)
    manual = sum((1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1, eps=1e-8)).mean() for i in (2, 3)) / 2
    assert torch.allclose(layer_consistency_loss(hs, layers=(2, 4)), manual, atol=1e-6)


def test_masked_scope_ignores_padding():
    hs = random_hidden_states(6, b=2, t=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    loss = layer_consistency_loss(hs, mask, token_scope="masked")
    # Changing only padded positions leaves the masked loss unchanged (but not the official one).
    changed = tuple(h.clone() for h in hs)
    for h in changed:
        h[0, 4:] = torch.randn(2, h.shape[-1]) * 10
    assert torch.allclose(layer_consistency_loss(changed, mask, token_scope="masked"), loss, atol=1e-6)
    assert not torch.allclose(layer_consistency_loss(changed), layer_consistency_loss(hs))
    # And it equals the mean over real tokens only.
    cos = torch.stack([F.cosine_similarity(hs[i], hs[i + 1], dim=-1, eps=1e-8) for i in range(1, 4)])
    manual = (1 - cos)[:, mask.bool()].mean()
    assert torch.allclose(loss, manual, atol=1e-6)


def test_empty_range_error_names_the_layer_count():
    hs = random_hidden_states(3)  # a 2-layer model
    with pytest.raises(CrowError, match="2 layers") as e:
        layer_consistency_loss(hs)
    assert "layers='all'" in str(e.value)
    with pytest.raises(CrowError, match="does not fit"):
        layer_consistency_loss(hs, layers=(1, 5))
    with pytest.raises(CrowError, match="not understood"):
        layer_consistency_loss(hs, layers="first-two")
    with pytest.raises(CrowError, match="token_scope"):
        layer_consistency_loss(random_hidden_states(6), token_scope="padded")
    with pytest.raises(CrowError, match="attention_mask"):
        layer_consistency_loss(random_hidden_states(6), token_scope="masked")


def test_profile_is_mean_cosine_over_real_tokens():
    hs = random_hidden_states(5, b=2, t=4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    profile = consistency_profile(hs, mask)
    assert profile.shape == (4,)
    cos0 = F.cosine_similarity(hs[0], hs[1], dim=-1, eps=1e-8)
    assert profile[0].item() == pytest.approx(cos0[mask.bool()].mean().item(), abs=1e-6)


def test_fgsm_delta_is_epsilon_sign_and_detached():
    g = torch.tensor([[-2.0, 0.0, 3e-9]], requires_grad=True)
    d = fgsm_delta(g, 0.1)
    assert torch.equal(d, torch.tensor([[-0.1, 0.0, 0.1]]))
    assert not d.requires_grad


def test_lm_loss_on_kept_logits_equals_full_cross_entropy():
    b, t, v = 3, 8, 11
    logits = torch.randn(b, t, v)
    labels = torch.full((b, t), -100)
    labels[0, 3:] = torch.randint(0, v, (5,))
    labels[1, 5:7] = torch.randint(0, v, (2,))
    labels[2, 4:] = torch.randint(0, v, (4,))
    full = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100)
    k = logits_needed(labels)
    assert k == t - 2  # first target at position 3: logits from position 2 on
    total, n = causal_lm_loss_sum(logits[:, -k:], labels)
    assert n.item() == 11
    assert torch.allclose(total / n, full, atol=1e-6)
    assert logits_needed(torch.full((2, 5), -100)) == 1
