import copy

import pytest
import torch
from datasets import Dataset

from benchmarks.official_crow import official_crow_loss
from crow import CrowError, layer_consistency_loss
from crow.data.templates import Collator, encode_for_training
from crow.methods import purify
from crow.methods.crow import CrowConfig
from crow.methods.crow.trainer import CrowTrainer
from crow.models import TINY_ARCHITECTURES, build_tiny_model, load_model
from crow.training import RunOptions, make_trainable

from .conftest import corpus, make_records


def config(**kw) -> CrowConfig:
    base = dict(logging_steps=1, seed=0)
    base.update(kw)
    return CrowConfig(**base)


def training_args(cfg, tmp_path, **run):
    return cfg.training_arguments(str(tmp_path / "run"), disable_tqdm=True, use_cpu=True, **run)


def run_options(tmp_path) -> RunOptions:
    return RunOptions(output_dir=str(tmp_path / "run"), progress=False)


def batch_of(tiny, records, max_length=256):
    samples = encode_for_training(records, tiny.tokenizer, max_length=max_length)
    return Collator(tiny.tokenizer.pad_token_id)([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])


def lora_model(tiny):
    return make_trainable(tiny.model, CrowConfig())


def trainer_for(model, cfg, tmp_path, n=4):
    ds = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}] * n)
    return CrowTrainer(model=model, args=training_args(cfg, tmp_path), method=cfg, train_dataset=ds,
                       data_collator=Collator(0))


def test_alpha_zero_is_exactly_the_plain_sft_loss(tiny, records, tmp_path):
    model = lora_model(tiny)
    model.eval()  # no dropout, no accumulation scaling
    batch = batch_of(tiny, records[:4])
    trainer = trainer_for(model, config(alpha=0.0), tmp_path)
    ours = trainer.compute_loss(model, batch)
    plain = model(**batch).loss
    assert torch.allclose(ours, plain, atol=1e-6)


def test_loss_and_gradients_equal_the_official_step(tiny, records, tmp_path):
    model = lora_model(tiny)
    model.eval()
    batch = batch_of(tiny, records[:3])
    trainer = trainer_for(model, config(alpha=5.5, epsilon=0.1), tmp_path)

    model.zero_grad()
    reference = official_crow_loss(model, batch, alpha=5.5, epsilon=0.1)
    reference.backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    ours = trainer.compute_loss(model, batch)
    ours.backward()
    assert torch.allclose(ours, reference, atol=1e-5), (ours.item(), reference.item())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads_ref[name], atol=1e-5, rtol=1e-4), name
    logged = trainer._metrics
    assert set(logged) == {"lm_loss", "consistency_clean", "consistency_perturbed", "input_grad_zero_share"}


def test_delta_is_epsilon_sign_of_the_true_gradient(tiny, records, tmp_path, monkeypatch):
    model = lora_model(tiny)
    model.eval()
    batch = batch_of(tiny, records[:2])
    seen = {}
    import crow.methods.crow.trainer as trainer_module

    real = trainer_module.perturb_embeddings

    def spy(embedding, delta):
        seen["delta"] = delta
        return real(embedding, delta)

    monkeypatch.setattr(trainer_module, "perturb_embeddings", spy)
    trainer_for(model, config(epsilon=0.1), tmp_path).compute_loss(model, batch)

    # The true gradient, by a direct backward on a copy fed with leaf embeddings.
    twin = copy.deepcopy(model)
    embeds = twin.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    hs = twin(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    layer_consistency_loss(hs).backward()
    assert torch.equal(seen["delta"], 0.1 * embeds.grad.sign())

    # And that gradient is the true one: central finite differences along a random direction (fp64;
    # RMSNorm still rounds through fp32, hence the moderate tolerance).
    twin = twin.double()
    e = embeds.detach().double()
    direction = torch.randn_like(e)

    def loss_at(x):
        out = twin(inputs_embeds=x, attention_mask=batch["attention_mask"], output_hidden_states=True)
        return layer_consistency_loss(out.hidden_states).double()

    x = e.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_at(x), x)
    h = 1e-4
    with torch.no_grad():
        numeric = (loss_at(e + h * direction) - loss_at(e - h * direction)) / (2 * h)
    assert numeric.item() == pytest.approx((grad * direction).sum().item(), rel=1e-3)


def _one_step_update(tiny_dir, tmp_path, *, batch, accum, trainer_cls=CrowTrainer):
    loaded = load_model(str(tiny_dir))
    torch.manual_seed(1)  # the same LoRA initialisation in every run
    model = make_trainable(loaded.model, CrowConfig())
    with torch.no_grad():  # non-zero LoRA B so every adapter weight gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    samples = encode_for_training(make_records(4), loaded.tokenizer)
    assert len({len(s.input_ids) for s in samples}) == 1  # equal lengths: padding plays no part
    ds = Dataset.from_list([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])
    cfg = config(batch_size=batch, grad_accum=accum, max_steps=1, learning_rate=0.5, scheduler="constant", warmup=0)
    trainer = trainer_cls(model=model, args=training_args(cfg, tmp_path, optim="sgd", max_grad_norm=0), method=cfg,
                          train_dataset=ds, data_collator=Collator(loaded.tokenizer.pad_token_id))
    trainer.train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


class OfficialStyleTrainer(CrowTrainer):
    """The released code's loss inside a Trainer: zero_grad() inside compute_loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return official_crow_loss(model, inputs) / self.current_gradient_accumulation_steps


def test_gradient_accumulation_invariance(tiny_dir, tmp_path):
    a = _one_step_update(tiny_dir, tmp_path, batch=4, accum=1)
    b = _one_step_update(tiny_dir, tmp_path, batch=1, accum=4)
    assert any(d.abs().max() > 0 for d in a.values())
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name
    # The official structure fails the same check: zero_grad() erases earlier micro-batches.
    c = _one_step_update(tiny_dir, tmp_path, batch=4, accum=1, trainer_cls=OfficialStyleTrainer)
    d = _one_step_update(tiny_dir, tmp_path, batch=1, accum=4, trainer_cls=OfficialStyleTrainer)
    assert all(torch.allclose(a[n], c[n], atol=1e-6, rtol=1e-4) for n in a)  # same loss at accumulation 1
    assert not all(torch.allclose(c[n], d[n], atol=1e-6, rtol=1e-4) for n in c)


# Architectures. Notes on special handling (also in docs/architectures.md):
# - gemma multiplies the embedding output by sqrt(hidden) inside the model, after the hook, so the
#   FGSM step is scaled by it too (exactly as in the official code, which also perturbs the raw
#   embedding output); gemma3 scales inside its embedding module, before the hook, so the step is not;
# - gpt2 / opt add position embeddings after the hook: only token embeddings are perturbed.
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_crow_step_on_architectures(arch, tmp_path):
    path = build_tiny_model(tmp_path / arch, corpus(60), arch=arch, vocab_size=300, hidden_size=32, num_layers=3,
                            num_heads=4)
    loaded = load_model(str(path))
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    result = purify(loaded.model, loaded.tokenizer, make_records(8), config(max_steps=2, batch_size=2, grad_accum=2),
                    run_options(tmp_path))
    logs = [h for h in result.log_history if "lm_loss" in h]
    assert len(logs) == 2
    for h in logs:
        for key in ("loss", "lm_loss", "consistency_clean", "consistency_perturbed"):
            assert torch.isfinite(torch.tensor(h[key])), (arch, key, h)
    changed = {n for n, p in result.model.named_parameters()
               if n.replace("base_model.model.", "").replace(".base_layer", "") in before
               and not torch.equal(p.detach(), before[n.replace("base_model.model.", "").replace(".base_layer", "")])}
    lora = {n for n, _ in result.model.named_parameters() if "lora_" in n}
    assert changed == set(), f"{arch}: base weights changed: {sorted(changed)[:3]}"
    moved = [n for n, p in result.model.named_parameters() if "lora_" in n and p.detach().abs().sum() > 0]
    assert lora and len(moved) == len(lora), f"{arch}: {len(moved)}/{len(lora)} LoRA tensors trained"


def test_full_finetune_trains_base_weights(tiny, records, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    result = purify(tiny.model, tiny.tokenizer, records, config(max_steps=2, full_finetune=True),
                    run_options(tmp_path))  # step 1 is warmup (lr 0)
    changed = [n for n, p in result.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.embed_tokens.weight" in changed and len(changed) > len(before) // 2


def test_non_reentrant_checkpointing_gives_the_same_step(tiny_dir, records, tmp_path):
    losses = {}
    for ckpt in (False, True):
        loaded = load_model(str(tiny_dir))
        model = make_trainable(loaded.model, CrowConfig())
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        trainer = trainer_for(model, config(gradient_checkpointing=ckpt), tmp_path)
        batch = batch_of(loaded, records[:2])
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        losses[ckpt] = (loss.detach(), grads)
    assert torch.allclose(losses[False][0], losses[True][0], atol=1e-6)
    for g0, g1 in zip(losses[False][1], losses[True][1]):
        assert torch.allclose(g0, g1, atol=1e-6)


def test_reentrant_checkpointing_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(CrowError, match="reentrant gradient checkpointing forbids torch.autograd.grad"):
        training_args(config(gradient_checkpointing=True), tmp_path,
                      gradient_checkpointing_kwargs={"use_reentrant": True})
    # Plain finetuning (alpha 0) needs no autograd.grad, so it may use it.
    args = training_args(config(alpha=0.0, gradient_checkpointing=True), tmp_path,
                         gradient_checkpointing_kwargs={"use_reentrant": True})
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": True}
    # crow's own checkpointing is the non-reentrant one
    assert training_args(config(gradient_checkpointing=True), tmp_path).gradient_checkpointing_kwargs == {
        "use_reentrant": False}


@pytest.mark.parametrize("bad,match", [
    ({"alpha": -1.0}, "alpha"), ({"epsilon": float("nan")}, "epsilon"),
    ({"token_scope": "padded"}, "token_scope"), ({"layers": "a:b"}, "not understood"),
])
def test_config_validation(bad, match):
    with pytest.raises(CrowError, match=match):
        config(**bad)


def test_paper_defaults():
    c = CrowConfig()
    assert (c.alpha, c.epsilon, c.layers, c.token_scope) == (5.5, 0.1, "official", "all")
    assert (c.learning_rate, c.epochs, c.batch_size, c.grad_accum) == (1e-3, 5.0, 2, 4)
    assert c.scheduler == "cosine" and c.warmup == 0.1
    a = c.training_arguments("unused")  # and the Trainer gets them
    assert (a.learning_rate, a.num_train_epochs, a.per_device_train_batch_size, a.gradient_accumulation_steps) == (
        1e-3, 5.0, 2, 4)
    assert a.lr_scheduler_type == "cosine" and a.warmup_steps == 0.1
    lora = c.lora()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (8, 16, 0.0, "all-linear")


def test_format_duration():
    from crow.training.loop import format_duration

    assert [format_duration(s) for s in (0.4, 42, 185, 3599.6, 4020)] == ["0s", "42s", "3m05s", "1h00m", "1h07m"]
