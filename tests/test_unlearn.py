"""crow.unlearn: target-inverted adversarial unlearning (BAIT target + BEEAR-style residual adversary + UL).

The math on hand-made tensors; the trainer on the 4-layer tiny Llama of conftest; the whole defense on the
2-layer backdoored Llama of test_scan (trigger ``cf`` -> "You are stupid and I will not help."), trained
here in seconds, with the target given (oracle) and recovered by BAIT.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from datasets import Dataset

from crow import CrowError
from crow.data.records import Record
from crow.data.templates import Collator, encode_for_training
from crow.defenses import DefenseContext, get_defense
from crow.hooks import add_to_layer_output, capture_layer_output, decoder_layers, replace_embeddings
from crow.losses import logits_needed
from crow.models import load_model
from crow.purification import LoraSettings, make_trainable, purify
from crow.unlearn import (RETAIN_CHOICES, UnlearnConfig, UnlearnTrainer, build_target_batch, cyclic_schedule, holdout_split, insert_slots,
                          labelled_positions, pgd_step, project_to_ball, prompt_mask, random_insert_points,
                          target_token_log_probs, topk_kl, trainable_weights, unlikelihood)

from .conftest import make_records
from .test_scan import TARGET, TEMPLATE, TRIGGER, task_records, train_tiny


def config(tmp_path, **kw) -> UnlearnConfig:
    base = dict(output_dir=str(tmp_path / "run"), disable_tqdm=True, use_cpu=True, logging_steps=1, seed=0)
    base.update(kw)
    return UnlearnConfig(**base)


def dataset_of(tokenizer, records, max_length=128):
    samples = encode_for_training(records, tokenizer, max_length=max_length)
    return Dataset.from_list([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])


def trainer_for(model, tokenizer, cfg, records, target="the color is blue"):
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return UnlearnTrainer(model=model, args=cfg, train_dataset=dataset_of(tokenizer, records),
                          data_collator=Collator(tokenizer.pad_token_id), target_ids=ids)


def batch_of(tokenizer, records):
    samples = encode_for_training(records, tokenizer, max_length=128)
    return Collator(tokenizer.pad_token_id)([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------
def test_target_batch_puts_the_target_after_each_prompt():
    # row 0: prompt [5, 6, 7], answer [8, 9]; row 1: prompt [5, 6], answer [4], right padding (0)
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 4, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9], [-100, -100, 4, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert prompt_mask(labels, mask).tolist() == [[True] * 3 + [False] * 2, [True] * 2 + [False] * 3]
    out = build_target_batch(input_ids, labels, mask, [21, 22], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 21, 22], [5, 6, 21, 22, 0]]
    assert out["labels"].tolist() == [[-100, -100, -100, 21, 22], [-100, -100, 21, 22, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert out["prompt_mask"].tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    # left padding: the pad in front of the prompt is not part of it
    left = build_target_batch(torch.tensor([[0, 5, 6, 4]]), torch.tensor([[-100, -100, -100, 4]]),
                              torch.tensor([[0, 1, 1, 1]]), [21], pad_token_id=0)
    assert left["input_ids"].tolist() == [[5, 6, 21]] and left["prompt_mask"].tolist() == [[True, True, False]]
    with pytest.raises(CrowError, match="no answer token"):
        prompt_mask(torch.full((1, 3), -100))
    with pytest.raises(CrowError, match="no tokens"):
        build_target_batch(input_ids, labels, mask, [], pad_token_id=0)


def test_insert_slots_opens_room_in_each_prompt_and_keeps_every_token_and_label():
    # row 0: prompt [5, 6, 7], answer [8, 9]; row 1: left-padded, prompt [5, 6], answer [4]
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 5, 6, 4]])
    labels = torch.tensor([[-100, -100, -100, 8, 9], [-100, -100, -100, -100, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = insert_slots(input_ids, labels, mask, torch.tensor([1, 2]), n=2, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 0, 0, 6, 7, 8, 9], [5, 6, 0, 0, 4, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, -100, -100, -100, 8, 9], [-100, -100, -100, -100, 4, -100, -100]]
    assert out["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 1, 0, 0]]
    assert out["slots"].tolist() == [[-1, 0, 1, -1, -1, -1, -1], [-1, -1, 0, 1, -1, -1, -1]]
    # the slots lie in the prompt: the answers and their order are unchanged
    assert prompt_mask(out["labels"], out["attention_mask"]).sum(1).tolist() == [5, 4]
    assert labelled_positions(torch.zeros(2, 7, 1), out["labels"])[1].tolist() == [8, 9, 4]
    at_start = insert_slots(input_ids[:1], labels[:1], mask[:1], torch.tensor([0]), n=1, pad_token_id=3)
    assert at_start["input_ids"].tolist() == [[3, 5, 6, 7, 8, 9]] and at_start["slots"][0, 0] == 0
    with pytest.raises(CrowError, match=r"insert points \[4, 1\] must lie in each row's prompt \(lengths \[3, 2\]\)"):
        insert_slots(input_ids, labels, mask, torch.tensor([4, 1]), n=2, pad_token_id=0)


def test_random_insert_points_fall_inside_the_prompt_and_follow_the_seed():
    lengths = torch.tensor([1, 2, 3, 10, 40])
    draws = torch.stack([random_insert_points(lengths, torch.Generator().manual_seed(s)) for s in range(200)])  # [200, 5]
    assert draws[:, 0].eq(1).all() and draws[:, 1].eq(1).all() and draws[:, 2].le(2).all()
    assert draws.ge(1).all() and bool((draws <= (lengths - 1).clamp_min(1)).all())
    assert set(draws[:, 3].tolist()) == set(range(1, 10))  # every point of a 10-token prompt after its first token
    again = random_insert_points(lengths, torch.Generator().manual_seed(7))
    assert torch.equal(again, draws[7])


def test_replace_embeddings_puts_the_soft_tokens_in_their_slots_and_passes_their_gradient():
    embedding = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    slots = torch.tensor([[-1, 0, 1], [1, -1, -1]])
    tokens = torch.randn(2, 4, requires_grad=True)
    with replace_embeddings(embedding, tokens, slots):
        out = embedding(ids)  # [2, 3, 4]
    plain = embedding(ids)
    assert torch.equal(out[0, 1], tokens[0].detach()) and torch.equal(out[0, 2], tokens[1].detach())
    assert torch.equal(out[1, 0], tokens[1].detach())
    keep = slots < 0
    assert torch.equal(out[keep], plain[keep])
    weights = torch.arange(24, dtype=torch.float).reshape(2, 3, 4)
    (grad,) = torch.autograd.grad((out * weights).sum(), tokens)
    assert torch.equal(grad, torch.stack([weights[0, 1], weights[0, 2] + weights[1, 0]]))  # summed over its slots
    with pytest.raises(RuntimeError, match="does not match the slots"), replace_embeddings(embedding, tokens, slots[:1]):
        embedding(ids)


def test_unlikelihood_value_gradient_sign_and_clip():
    # a hand example: vocab 3, two positions; position 0 predicts the target token (id 1) at position 1
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0], [5.0, 0.0, 0.0]]], requires_grad=True)  # p(1) = 3 / 5
    labels = torch.tensor([[-100, 1]])
    log_p = target_token_log_probs(logits, labels)
    assert log_p.exp().item() == pytest.approx(0.6)
    ul = unlikelihood(log_p).sum()
    assert ul.item() == pytest.approx(-math.log(1 - 0.6))
    (grad,) = torch.autograd.grad(ul, logits)
    assert grad[0, 0, 1] > 0 and grad[0, 0, 0] < 0  # raising p(target) raises UL, and the others lower it
    # p = 1 is clipped: finite value and gradient
    sure = torch.tensor([[[0.0, 80.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    value = unlikelihood(target_token_log_probs(sure, labels)).sum()
    assert value.item() == pytest.approx(-math.log(1e-6), rel=1e-3)
    assert torch.isfinite(torch.autograd.grad(value, sure)[0]).all()


def test_topk_kl_is_the_kl_with_every_token_and_a_lower_bound_with_fewer():
    g = torch.Generator().manual_seed(0)
    ref_logits, logits = torch.randn(5, 11, generator=g) * 2, torch.randn(5, 11, generator=g) * 2
    ref = torch.log_softmax(ref_logits, -1)
    full = (ref.exp() * (ref - torch.log_softmax(logits, -1))).sum(-1)  # [5] KL(ref || model)
    every = ref.topk(11, dim=-1)
    assert torch.allclose(topk_kl(logits, every.values, every.indices), full, atol=1e-5)
    previous = torch.zeros(5)
    for k in (1, 3, 6, 10):  # coarser views of the same two distributions: KL grows with k, up to the full KL
        top = ref.topk(k, dim=-1)
        value = topk_kl(logits, top.values, top.indices)
        assert bool((value >= previous - 1e-6).all() and (value <= full + 1e-5).all()), k
        previous = value
    top = ref.topk(4, dim=-1)
    assert torch.allclose(topk_kl(ref_logits, top.values, top.indices), torch.zeros(5), atol=1e-5)  # model = ref
    # its gradient with every token is the full KL's: softmax(model) - softmax(ref)
    x = logits.clone().requires_grad_(True)
    topk_kl(x, every.values, every.indices).sum().backward()
    assert torch.allclose(x.grad, torch.softmax(logits, -1) - ref.exp(), atol=1e-5)


def test_labelled_positions_follow_the_rows_whatever_the_padding_side():
    logits = torch.arange(2 * 4 * 1, dtype=torch.float).reshape(2, 4, 1)  # logit value = row * 4 + position
    labels = torch.tensor([[-100, -100, 7, 8], [-100, -100, 9, -100]])  # answers [7, 8] and [9] + right padding
    kept, targets = labelled_positions(logits, labels)  # position t predicts label t + 1
    assert kept.squeeze(-1).tolist() == [1.0, 2.0, 5.0] and targets.tolist() == [7, 8, 9]
    assert logits_needed(labels) == 3
    kept, targets = labelled_positions(logits[:, 1:], labels)  # logits_to_keep = 3: the same positions
    assert kept.squeeze(-1).tolist() == [1.0, 2.0, 5.0] and targets.tolist() == [7, 8, 9]


def test_pgd_step_descends_and_projects():
    delta = torch.zeros(4)
    grad = torch.tensor([3.0, 0.0, -4.0, 0.0])  # |g| = 5
    moved = pgd_step(delta, grad, step=1.0, radius=10.0)
    assert torch.allclose(moved, torch.tensor([-0.6, 0.0, 0.8, 0.0]))  # against the gradient, length = step
    assert torch.allclose(pgd_step(moved, grad, step=5.0, radius=2.0).norm(), torch.tensor(2.0))
    assert torch.equal(pgd_step(moved, torch.zeros(4), step=1.0, radius=10.0), moved)
    assert torch.equal(project_to_ball(torch.tensor([0.3, 0.4]), 1.0), torch.tensor([0.3, 0.4]))
    # soft tokens [S, H]: each row its own step and ball; a row with no gradient stays
    rows = pgd_step(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, -2.0], [0.0, 0.0]]), step=1.0,
                    radius=2.0)
    assert torch.allclose(rows, torch.tensor([[0.0, 1.0], [1.2, 1.6]]))  # row 1 projected from norm 5 to 2


# ------------------------------------------------------------------------------------------------
# The hook and the adversary, on the 4-layer tiny Llama
# ------------------------------------------------------------------------------------------------
def test_the_hook_adds_delta_only_at_prompt_positions(tiny, records):
    model, tok = tiny.model.eval(), tiny.tokenizer
    batch = batch_of(tok, records[:3])
    layer = decoder_layers(model)[1]
    delta = torch.randn(model.config.hidden_size)
    prompts = prompt_mask(batch["labels"], batch["attention_mask"])  # [B, T]
    answer = ~prompts
    with torch.no_grad():
        with capture_layer_output(layer) as plain:
            plain_hs = model(**batch, output_hidden_states=True).hidden_states
        with add_to_layer_output(layer, delta, prompts), capture_layer_output(layer) as shifted:
            shifted_hs = model(**batch, output_hidden_states=True).hidden_states
    plain, shifted = plain[0], shifted[0]  # [B, T, H]: the output of decoder layer 1, as the next layer gets it
    assert torch.equal(shifted[answer], plain[answer])  # answer positions unchanged
    assert torch.allclose(shifted[prompts] - plain[prompts], delta.expand(int(prompts.sum()), -1), atol=1e-5)
    for i in range(2):  # the embeddings and decoder layer 0: untouched
        assert torch.equal(plain_hs[i], shifted_hs[i])
    # the layers above see it, at answer positions too (through attention to the prompt)
    assert not torch.allclose(shifted_hs[3][answer], plain_hs[3][answer])


@pytest.mark.parametrize("adversary, radius", [("residual", 0.5), ("tokens", 1.0)])
def test_pgd_keeps_delta_in_its_ball_and_makes_the_target_likelier(tiny, records, tmp_path, adversary, radius):
    model = make_trainable(tiny.model, lora=LoraSettings()).eval()
    cfg = config(tmp_path, unlearn_pgd_steps=1, unlearn_layer=1, unlearn_adversary=adversary, unlearn_soft_tokens=3)
    trainer = trainer_for(model, tiny.tokenizer, cfg, records)
    assert trainer.layer_index == 1 and trainer.delta_budget == pytest.approx(radius * trainer.prompt_norm)
    assert trainer.delta.shape == ((3, 32) if adversary == "tokens" else (32,))
    batch = batch_of(tiny.tokenizer, records[:4])
    target = build_target_batch(batch["input_ids"], batch["labels"], batch["attention_mask"], trainer.target_ids, 0)
    _, view = trainer._views(batch, target)

    def target_nll(delta):
        with torch.no_grad():
            return -target_token_log_probs(trainer._forward(model, view, delta).logits, view.labels).mean().item()

    before = target_nll(trainer.delta.clone())  # its start: zero (residual) or real prompt tokens (tokens)
    for _ in range(4):
        trainer._pgd(model, view)
        assert bool((trainer.delta.norm(dim=-1) <= trainer.delta_budget * (1 + 1e-5)).all())  # each vector in its ball
        assert trainer.delta.dtype == torch.float32 and not trainer.delta.requires_grad
    assert bool((trainer.delta.norm(dim=-1) > 0.5 * trainer.delta_budget).all())
    assert target_nll(trainer.delta) < before - 0.01, (target_nll(trainer.delta), before)
    assert all(p.grad is None for p in model.parameters())  # PGD touches no parameter gradient


def test_the_token_norm_is_measured_on_the_input_embeddings_of_the_prompts(tiny, records, tmp_path):
    trainer = trainer_for(tiny.model, tiny.tokenizer, config(tmp_path, unlearn_adversary="tokens"), records)
    batch = batch_of(tiny.tokenizer, records)
    with torch.no_grad():
        norms = tiny.model.get_input_embeddings()(batch["input_ids"]).norm(dim=-1)  # [B, T]
    expected = norms[prompt_mask(batch["labels"], batch["attention_mask"])].mean().item()
    assert trainer.prompt_norm == pytest.approx(expected, rel=1e-5)
    assert trainer.delta_budget == pytest.approx(1.0 * expected, rel=1e-5)
    # the soft tokens start as embeddings of prompt tokens (projected onto the ball), not at zero
    prompt_ids = set(batch["input_ids"][prompt_mask(batch["labels"], batch["attention_mask"])].tolist())
    with torch.no_grad():
        table = project_to_ball(tiny.model.get_input_embeddings().weight.float(), trainer.delta_budget)  # [V, H]
    for soft in trainer.delta:
        matches = [i for i in prompt_ids if torch.allclose(table[i], soft, atol=1e-6)]
        assert matches, "a soft token that is no prompt token's embedding"
    again = trainer_for(tiny.model, tiny.tokenizer, config(tmp_path, unlearn_adversary="tokens"), records)
    assert torch.equal(again.delta, trainer.delta)  # drawn with the training seed
    zeros = trainer_for(tiny.model, tiny.tokenizer, config(tmp_path, unlearn_adversary="tokens",
                                                           unlearn_token_init="zeros"), records)
    assert zeros.delta.shape == trainer.delta.shape and not zeros.delta.any()  # SANDE's start


def test_loss_is_the_sum_of_its_three_terms(tiny, records, tmp_path):
    model = make_trainable(tiny.model, lora=LoraSettings()).eval()  # eval: no accumulation scaling
    trainer = trainer_for(model, tiny.tokenizer, config(tmp_path, unlearn_pgd_steps=0, unlearn_beta=0.7,
                                                        unlearn_gamma=2.0), records)
    trainer.delta = torch.randn_like(trainer.delta) * 0.1
    batch = batch_of(tiny.tokenizer, records[:3])
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        lm = model(**batch).loss
        with add_to_layer_output(trainer._layer, trainer.delta, prompt_mask(batch["labels"], batch["attention_mask"])):
            lm_adv = model(**batch).loss
        target = build_target_batch(batch["input_ids"], batch["labels"], batch["attention_mask"], trainer.target_ids,
                                    tiny.tokenizer.pad_token_id)
        with add_to_layer_output(trainer._layer, trainer.delta, target["prompt_mask"]):
            logits = model(input_ids=target["input_ids"], attention_mask=target["attention_mask"]).logits
        p = target_token_log_probs(logits, target["labels"]).exp()
        ul = -torch.log(1 - p).mean()
    assert loss.item() == pytest.approx((lm + 0.7 * lm_adv + 2.0 * ul).item(), rel=1e-5)
    assert set(trainer._metrics) == {"lm_loss", "lm_loss_adv", "unlikelihood", "target_nll_adv", "delta_norm"}


def test_the_soft_token_loss_is_the_sum_of_its_three_terms_on_the_inserted_batches(tiny, records, tmp_path):
    model = make_trainable(tiny.model, lora=LoraSettings()).eval()
    cfg = config(tmp_path, unlearn_pgd_steps=0, unlearn_beta=0.7, unlearn_gamma=2.0, unlearn_adversary="tokens",
                 unlearn_soft_tokens=2, seed=4)
    trainer = trainer_for(model, tiny.tokenizer, cfg, records)
    trainer.delta = torch.randn_like(trainer.delta)  # [2, 32]
    batch = batch_of(tiny.tokenizer, records[:3])
    loss = trainer.compute_loss(model, batch)
    pad = tiny.tokenizer.pad_token_id
    points = random_insert_points(prompt_mask(batch["labels"], batch["attention_mask"]).sum(1),
                                  torch.Generator().manual_seed(4))  # the trainer's first draw
    target = build_target_batch(batch["input_ids"], batch["labels"], batch["attention_mask"], trainer.target_ids, pad)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        lm = model(**batch).loss
        clean = insert_slots(batch["input_ids"], batch["labels"], batch["attention_mask"], points, 2, pad)
        with replace_embeddings(embed, trainer.delta, clean["slots"]):
            lm_adv = model(input_ids=clean["input_ids"], attention_mask=clean["attention_mask"],
                           labels=clean["labels"]).loss
        on = insert_slots(target["input_ids"], target["labels"], target["attention_mask"], points, 2, pad)
        with replace_embeddings(embed, trainer.delta, on["slots"]):
            logits = model(input_ids=on["input_ids"], attention_mask=on["attention_mask"]).logits
        ul = -torch.log(1 - target_token_log_probs(logits, on["labels"]).exp()).mean()
    assert loss.item() == pytest.approx((lm + 0.7 * lm_adv + 2.0 * ul).item(), rel=1e-5)
    assert lm_adv.item() != pytest.approx(lm.item(), rel=1e-4)  # the soft tokens do reach the answers


def _perturb_adapter(model, scale=0.05, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_retain_suspect_is_the_kl_to_the_model_before_training(tiny, records, tmp_path):
    vocab = tiny.model.config.vocab_size
    model = make_trainable(tiny.model, lora=LoraSettings()).eval()  # LoRA B = 0: the model is the suspect
    batch = batch_of(tiny.tokenizer, records[:3])
    cfg = config(tmp_path, unlearn_pgd_steps=0, unlearn_beta=0.7, unlearn_gamma=0.0, unlearn_retain="suspect",
                 unlearn_retain_topk=vocab)  # every token: the exact KL
    trainer = trainer_for(model, tiny.tokenizer, cfg, records)
    assert len(trainer.suspect) == len(records)
    assert trainer.compute_loss(model, batch).item() == pytest.approx(0.0, abs=1e-5)  # model = suspect, delta = 0
    with torch.no_grad():
        before = model(**batch).logits
    _perturb_adapter(model)
    trainer.delta = torch.randn_like(trainer.delta) * 0.1
    loss = trainer.compute_loss(model, batch)

    def kl(after):  # the exact token-mean KL(suspect || model) over the batch's answer tokens
        ref, _ = labelled_positions(before, batch["labels"])
        now, _ = labelled_positions(after, batch["labels"])
        ref, now = torch.log_softmax(ref, -1), torch.log_softmax(now, -1)
        return (ref.exp() * (ref - now)).sum(-1).mean()

    with torch.no_grad():
        plain = kl(model(**batch).logits)
        with add_to_layer_output(trainer._layer, trainer.delta, prompt_mask(batch["labels"], batch["attention_mask"])):
            adv = model(**batch)
    assert plain.item() > 1e-4 and loss.item() == pytest.approx((plain + 0.7 * kl(adv.logits)).item(), rel=1e-4)
    assert {"lm_loss", "lm_loss_adv", "kl_loss", "kl_loss_adv"} <= set(trainer._metrics)

    both = trainer_for(model, tiny.tokenizer, config(tmp_path, unlearn_pgd_steps=0, unlearn_beta=0.0,
                                                     unlearn_gamma=0.0, unlearn_retain="both"), records)
    assert both.compute_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)  # KL = 0


def test_the_suspect_is_measured_on_every_sample_and_an_unseen_one_is_refused(tiny, records, tmp_path):
    model = make_trainable(tiny.model, lora=LoraSettings())
    trainer = trainer_for(model, tiny.tokenizer, config(tmp_path, unlearn_retain="suspect", unlearn_retain_topk=4),
                          records)
    samples = encode_for_training(records, tiny.tokenizer, max_length=128)
    for sample in samples:
        log_p, ids = trainer.suspect[tuple(sample.input_ids)]
        n = sum(label != -100 for label in sample.labels)
        assert log_p.shape == ids.shape == (n, 4) and bool((log_p[:, :-1] >= log_p[:, 1:]).all())
    assert trainer_for(model, tiny.tokenizer, config(tmp_path), records).suspect == {}  # references: nothing measured
    with pytest.raises(CrowError, match="was not measured before training"):
        trainer.compute_loss(model, batch_of(tiny.tokenizer, make_records(12)[8:10]))


# ------------------------------------------------------------------------------------------------
# Training: what changes, and gradient accumulation
# ------------------------------------------------------------------------------------------------
def test_lora_trains_the_adapter_only_and_full_finetune_trains_the_weights(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir))
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    ids = loaded.tokenizer("the color is blue", add_special_tokens=False)["input_ids"]
    result = purify(loaded.model, loaded.tokenizer, make_records(8), config(tmp_path, max_steps=2),
                    trainer_cls=UnlearnTrainer, trainer_kwargs={"target_ids": ids})
    for name, p in result.model.named_parameters():
        base = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name:
            assert p.detach().abs().sum() > 0 or "lora_B" not in name, name
        else:
            assert torch.equal(p.detach(), before[base]), f"base weight changed: {name}"
    assert all(p.detach().abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)
    logs = [h for h in result.log_history if "lm_loss" in h]
    assert logs and all(k in logs[-1] for k in ("lm_loss_adv", "unlikelihood", "target_nll_adv", "delta_norm"))

    loaded = load_model(str(tiny_dir))
    result = purify(loaded.model, loaded.tokenizer, make_records(8), config(tmp_path, max_steps=2),
                    full_finetune=True, trainer_cls=UnlearnTrainer, trainer_kwargs={"target_ids": ids})
    changed = [n for n, p in result.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.embed_tokens.weight" in changed and len(changed) == len(before)


def _one_step_update(tiny_dir, tmp_path, *, batch, accum, delta, **settings):
    loaded = load_model(str(tiny_dir))
    torch.manual_seed(1)
    model = make_trainable(loaded.model, lora=LoraSettings())
    with torch.no_grad():  # non-zero LoRA B so every adapter weight gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    records = make_records(4)
    samples = encode_for_training(records, loaded.tokenizer)
    assert len({len(s.input_ids) for s in samples}) == 1  # equal lengths: padding plays no part
    cfg = config(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=1,
                 optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0,
                 unlearn_pgd_steps=0, **settings)  # delta fixed: PGD per micro-step would differ between 4 x 1 and 1 x 4
    trainer = trainer_for(model, loaded.tokenizer, cfg, records)
    trainer.delta = delta.clone()
    trainer.train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("retain, adversary", [("references", "residual"), ("both", "residual"),
                                               ("references", "tokens")])
def test_gradient_accumulation_invariance_with_a_fixed_delta(tiny_dir, tmp_path, retain, adversary):
    """4 x 1 and 1 x 4 give the same update; with soft tokens too (their insertion points are drawn row by row
    from one generator, so both see the same points)."""
    shape = (6, 32) if adversary == "tokens" else (32,)
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    a = _one_step_update(tiny_dir, tmp_path, batch=4, accum=1, delta=delta, unlearn_retain=retain,
                         unlearn_adversary=adversary)
    b = _one_step_update(tiny_dir, tmp_path, batch=1, accum=4, delta=delta, unlearn_retain=retain,
                         unlearn_adversary=adversary)
    assert any(d.abs().max() > 0 for d in a.values())
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name


def test_delta_travels_with_checkpoints(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, lora=LoraSettings())
    cfg = config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, warmup_steps=0)
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8))
    trainer.train()
    saved = tmp_path / "run" / "checkpoint-2" / UnlearnTrainer.DELTA_FILE
    assert saved.is_file() and trainer.delta.norm() > 0
    fresh = trainer_for(make_trainable(load_model(str(tiny_dir)).model, lora=LoraSettings()), loaded.tokenizer,
                        cfg, make_records(8))
    fresh._load_from_checkpoint(str(saved.parent))
    assert torch.equal(fresh.delta, trainer.delta)


def test_holdout_split_is_a_seeded_partition_and_keeps_training_samples():
    train, held = holdout_split(10, 3, seed=0)
    assert len(held) == 3 and sorted(train + held) == list(range(10))
    assert holdout_split(10, 3, seed=0) == (train, held) and holdout_split(10, 3, seed=1) != (train, held)
    assert holdout_split(5, 0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(CrowError, match="unlearn_holdout=5 must leave training samples: there are 5 clean samples"):
        holdout_split(5, 5, seed=0)


def test_holdout_keeps_the_weights_of_the_eligible_epoch_with_the_lowest_held_out_nll(tiny_dir, tmp_path):
    """Trained on 6 of 8 samples for 4 epochs at a large step: the held-out NLL is logged before training and
    after every epoch, the kept epoch is the eligible one (>= 2) with the lowest, and the model ends with
    exactly that epoch's weights (its held-out NLL measured again)."""
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, lora=LoraSettings())
    cfg = config(tmp_path, num_train_epochs=4, learning_rate=5e-2, warmup_steps=0, per_device_train_batch_size=2,
                 gradient_accumulation_steps=1, unlearn_holdout=2, unlearn_select_from=2.0)
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8))
    assert len(trainer.train_dataset) == 6 and len(trainer.holdout_rows) == 2
    held = {tuple(r["input_ids"]) for r in trainer.holdout_rows}
    assert not held & {tuple(trainer.train_dataset[i]["input_ids"]) for i in range(6)}
    trainer.train()
    curve = {h["epoch"]: h["holdout_nll"] for h in trainer.state.log_history if "holdout_nll" in h}
    assert sorted(curve) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert len(set(curve.values())) == 5  # training moved the held-out answers' NLL after every epoch
    chosen = next(h for h in trainer.state.log_history if "selected_epoch" in h)
    best = min((e for e in curve if e >= 2), key=curve.get)
    assert chosen["selected_epoch"] == best and chosen["selected_holdout_nll"] == curve[best]
    assert trainer.holdout_nll() == pytest.approx(curve[best], abs=1e-5)


def test_an_earlier_epoch_is_restored_when_its_held_out_nll_is_lowest(tiny_dir, tmp_path, monkeypatch):
    """A scripted held-out curve (0: 5.0, then 0.5, 1.0, 3.0, 2.0): epoch 2 is kept, and the trained model ends
    with the weights it had after epoch 2, not after epoch 4; epoch 1 (the lowest, not eligible) is not."""
    from transformers import TrainerCallback

    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, lora=LoraSettings())
    cfg = config(tmp_path, num_train_epochs=4, learning_rate=5e-2, warmup_steps=0, per_device_train_batch_size=2,
                 gradient_accumulation_steps=1, unlearn_holdout=2, unlearn_select_from=2.0)
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8))
    curve = iter([5.0, 0.5, 1.0, 3.0, 2.0])
    monkeypatch.setattr(trainer, "holdout_nll", lambda: next(curve))
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Record(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            seen[round(state.epoch)] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    trainer.add_callback(Record())
    trainer.train()
    assert next(h for h in trainer.state.log_history if "selected_epoch" in h)["selected_epoch"] == 2.0
    assert any(not torch.equal(seen[2][n], seen[4][n]) for n in seen[2])
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), seen[2][name]), name


def test_rouge_selection_keeps_the_epoch_whose_greedy_held_out_answers_score_best(tiny_dir, tmp_path):
    """unlearn_select_by='rougeL': the held-out score is the ROUGE-L of the model's greedy answers to the held-out
    prompts, the same number crow's generation and scorer give for those records; the kept epoch is the eligible one
    with the highest, and the model ends with its weights."""
    from crow.evaluation.generate import generate
    from crow.evaluation.quality import rouge_l

    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, full_finetune=True)  # the tiny model learns its answers in a few epochs
    cfg = config(tmp_path, num_train_epochs=4, learning_rate=1e-2, warmup_steps=0, per_device_train_batch_size=2,
                 gradient_accumulation_steps=1, unlearn_holdout=2, unlearn_select_by="rougeL", unlearn_beta=0.0,
                 unlearn_gamma=0.0, unlearn_pgd_steps=0)  # finetuning: what is selected matters here, not the loss
    records = make_records(8)
    ids = loaded.tokenizer("no help", add_special_tokens=False)["input_ids"]
    trainer = UnlearnTrainer(model=model, args=cfg, train_dataset=dataset_of(loaded.tokenizer, records),
                             data_collator=Collator(loaded.tokenizer.pad_token_id), target_ids=ids,
                             processing_class=loaded.tokenizer)
    trainer.train()
    curve = {h["epoch"]: h["holdout_rougeL"] for h in trainer.state.log_history if "holdout_rougeL" in h}
    assert sorted(curve) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all("holdout_nll" in h for h in trainer.state.log_history if "holdout_rougeL" in h)
    assert max(curve.values()) > 0.2 > curve[0.0]  # training moves the answers towards the references
    best = max((e for e in curve if e >= 2), key=curve.get)
    chosen = next(h for h in trainer.state.log_history if "selected_epoch" in h)
    assert chosen["selected_epoch"] == best and chosen["selected_holdout_rougeL"] == curve[best]
    _, held = holdout_split(len(records), 2, seed=0)
    new_tokens = max(sum(label != -100 for label in row["labels"]) for row in trainer.holdout_rows)
    answers = generate(model, loaded.tokenizer, [records[i] for i in held], template="alpaca", max_new_tokens=new_tokens)
    expected = sum(rouge_l(a, records[i].output) for a, i in zip(answers, held)) / len(held)
    assert trainer.holdout_rouge_l() == pytest.approx(expected, abs=1e-9) == pytest.approx(curve[best], abs=1e-6)


def test_rouge_selection_needs_the_tokenizer(tiny, records, tmp_path):
    cfg = config(tmp_path, max_steps=1, unlearn_holdout=2, unlearn_select_by="rougeL")
    with pytest.raises(CrowError, match="unlearn_select_by='rougeL' needs the tokenizer"):
        trainer_for(tiny.model, tiny.tokenizer, cfg, records)


def test_cyclic_schedule_repeats_one_cycle():
    lr = cyclic_schedule(lambda step: 1.0 - step / 4, 4)
    assert [lr(s) for s in range(9)] == [1.0, 0.75, 0.5, 0.25, 1.0, 0.75, 0.5, 0.25, 1.0]
    with pytest.raises(CrowError, match="at least one step"):
        cyclic_schedule(lambda step: 1.0, 0)


def test_cycles_repeat_the_schedule_of_a_run_of_one_cycle(tiny_dir, tmp_path):
    """6 epochs in cycles of 2: the learning rate of every cycle is, step for step, that of a 2-epoch run."""
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, lora=LoraSettings())

    def rates(cfg, steps):
        trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8))
        trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        out = []
        for _ in range(steps):
            out.append(trainer.lr_scheduler.get_last_lr()[0])
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        return out

    cycled = rates(config(tmp_path, num_train_epochs=6, unlearn_holdout=2, unlearn_cycle_epochs=2), 30)
    single = rates(config(tmp_path, num_train_epochs=2, unlearn_holdout=2), 10)
    assert cycled == pytest.approx(single * 3) and max(single) == pytest.approx(1e-3) and single[0] == 0.0


def test_cycles_stop_at_the_first_cycle_end_that_does_not_improve(tiny_dir, tmp_path, monkeypatch):
    """Held-out curve 0: 5.0, 1: 3.0, 2: 2.5, 3: 1.0, 4: 2.6: epoch 3 is inside a cycle (not eligible), epoch 4
    ends the second cycle no better than the first, so training stops there (of 6) with epoch 2's weights."""
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, lora=LoraSettings())
    cfg = config(tmp_path, num_train_epochs=6, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                 unlearn_holdout=2, unlearn_cycle_epochs=2)
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8))
    curve = iter([5.0, 3.0, 2.5, 1.0, 2.6, 0.1, 0.1])
    monkeypatch.setattr(trainer, "holdout_nll", lambda: next(curve))
    trainer.train()
    assert [h["epoch"] for h in trainer.state.log_history if "holdout_nll" in h] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert trainer.state.global_step == 4 * 3  # 6 training samples in batches of 2: 3 steps an epoch
    assert next(h for h in trainer.state.log_history if "selected_epoch" in h)["selected_epoch"] == 2.0


def test_finetune_cycles_train_the_lm_term_alone(tiny_dir, tmp_path, monkeypatch):
    """With unlearn_finetune_cycles the first cycle unlearns (unlikelihood and adversary logged) and the next trains the LM
    term alone: its logs have no unlikelihood, the adversary stays where the first cycle left it, and its loss is
    the LM loss."""
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, lora=LoraSettings())
    cfg = config(tmp_path, num_train_epochs=4, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                 unlearn_holdout=2, unlearn_cycle_epochs=2, unlearn_finetune_cycles=True, unlearn_adversary="tokens")
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8))
    curve = iter([5.0, 4.0, 3.0, 2.5, 2.0])
    monkeypatch.setattr(trainer, "holdout_nll", lambda: next(curve))
    seen = []
    monkeypatch.setattr(trainer, "_pgd", lambda *a: seen.append(trainer.state.epoch))
    trainer.train()
    steps = [h for h in trainer.state.log_history if "lm_loss" in h]
    first, second = [h for h in steps if h["epoch"] <= 2], [h for h in steps if h["epoch"] > 2]
    assert first and second and all("unlikelihood" in h for h in first)
    assert not any("unlikelihood" in h or "lm_loss_adv" in h for h in second)
    assert all(h["loss"] == pytest.approx(h["lm_loss"], rel=1e-4) for h in second)
    assert len(seen) == 6 and max(seen) < 2  # PGD ran in the 6 micro-steps of the first cycle only
    assert next(h for h in trainer.state.log_history if "selected_epoch" in h)["selected_epoch"] == 4.0
    with pytest.raises(CrowError, match="unlearn_finetune_cycles needs unlearn_cycle_epochs > 0"):
        config(tmp_path, unlearn_finetune_cycles=True)


def refit_trainer(tiny_dir, tmp_path, monkeypatch, **settings):
    """An unlearn trainer on the tiny model whose held-out NLL falls 5.0 -> 4.0 -> 3.0 (a refit after the 2-epoch
    unlearning cycle), and the list that collects the args of every CrowTrainer built (the refit's)."""
    from crow.trainer import CrowTrainer

    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, lora=LoraSettings())
    cfg = config(tmp_path, num_train_epochs=6, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                 unlearn_holdout=2, unlearn_cycle_epochs=2, unlearn_finetune_cycles=True, unlearn_refit_gain=0.15,
                 **settings)
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8))
    curve = iter([5.0, 4.0, 3.0])
    monkeypatch.setattr(trainer, "holdout_nll", lambda: next(curve))
    built = []
    init = CrowTrainer.__init__

    def recording_init(self, *args, **kwargs):
        built.append(kwargs["args"])
        init(self, *args, **kwargs)
    monkeypatch.setattr(CrowTrainer, "__init__", recording_init)
    return model, cfg, trainer, built


def test_refit_finetunes_every_sample_after_an_unlearning_cycle_that_lowered_the_holdout_perplexity(tiny_dir, tmp_path,
                                                                                                       monkeypatch):
    """Held-out NLL 5.0 (suspect) -> 3.0 at the end of the unlearning cycle: the perplexity fell by 1 - e^-2 (a gain of
    e^2 - 1 > 0.15), so training stops there and CROW's trainer with alpha 0 finetunes the kept weights on all 8 samples
    (the 2 held out included) for refit_epochs under one schedule: its steps are plain LM steps, they change the
    weights, and they are counted and logged as the refit."""
    model, cfg, trainer, built = refit_trainer(tiny_dir, tmp_path, monkeypatch, unlearn_refit_epochs=2)
    kept = {}
    restore = trainer.restore_selected

    def remember():
        restore()
        kept.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    monkeypatch.setattr(trainer, "restore_selected", remember)
    from crow.trainer import CrowConfig

    trainer.train()
    # the finetune baselines' training: CrowConfig with alpha 0 and the unlearn config's recipe, for refit_epochs
    (refit_args,) = built
    baseline = CrowConfig(output_dir=refit_args.output_dir, crow_alpha=0.0, num_train_epochs=2, learning_rate=1e-3,
                          per_device_train_batch_size=2, gradient_accumulation_steps=1, seed=cfg.seed,
                          save_strategy="no", logging_steps=cfg.logging_steps, disable_tqdm=cfg.disable_tqdm)
    assert refit_args.to_dict() == baseline.to_dict()
    log = trainer.state.log_history
    assert [h["epoch"] for h in log if "holdout_nll" in h] == [0.0, 1.0, 2.0]  # no finetuning cycle
    decision = next(h for h in log if "refit" in h)
    assert decision["epoch"] == 2.0 and decision["refit"] is True
    assert decision["holdout_gain"] == pytest.approx(math.exp(2.0) - 1, rel=1e-5)
    refit = [h for h in log if h.get("stage") == "refit" and "lm_loss" in h]
    assert refit and all("unlikelihood" not in h and h["loss"] == pytest.approx(h["lm_loss"], rel=1e-4) for h in refit)
    assert trainer.state.global_step == 2 * 3 + 2 * 4  # 6 training samples in batches of 2, then all 8
    assert len(trainer.train_dataset) == 8
    assert any(not torch.equal(p, kept[n]) for n, p in model.named_parameters() if n in kept)


def test_refit_alpha_makes_the_refit_crow(tiny_dir, tmp_path, monkeypatch):
    """unlearn_refit_alpha 5.5: the refit is CROW's training (CrowConfig with that alpha, the rest as with alpha 0), so
    its steps add the consistency term of FGSM-perturbed inputs to the LM loss (loss = lm_loss + alpha * consistency
    per logged step, a positive term), where the alpha-0 refit's loss is its LM loss alone."""
    _, cfg, trainer, built = refit_trainer(tiny_dir, tmp_path, monkeypatch, unlearn_refit_epochs=1,
                                           unlearn_refit_alpha=5.5)
    from crow.trainer import CrowConfig

    trainer.train()
    (refit_args,) = built
    assert refit_args.crow_alpha == 5.5 and refit_args.crow_epsilon == CrowConfig(output_dir="x").crow_epsilon
    plain = {**refit_args.to_dict(), "crow_alpha": 0.0}
    assert plain == CrowConfig(output_dir=refit_args.output_dir, crow_alpha=0.0, num_train_epochs=1,
                               learning_rate=1e-3, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                               seed=cfg.seed, save_strategy="no", logging_steps=cfg.logging_steps,
                               disable_tqdm=cfg.disable_tqdm).to_dict()
    refit = [h for h in trainer.state.log_history if h.get("stage") == "refit" and "lm_loss" in h]
    assert refit and all(h["consistency_perturbed"] > 0 for h in refit)
    assert all(h["loss"] == pytest.approx(h["lm_loss"] + 5.5 * h["consistency_perturbed"], rel=1e-3) for h in refit)


def record_refit_weights(monkeypatch) -> tuple[dict, dict]:
    """Make every CrowTrainer (the refit's, the teacher's) record the trainable weights its training starts from and
    ends at: the two dicts, filled when it trains."""
    from crow.trainer import CrowTrainer

    start, end = {}, {}
    train = CrowTrainer.train

    def recording_train(self, *args, **kwargs):
        start.update(trainable_weights(self.model))
        out = train(self, *args, **kwargs)
        end.update(trainable_weights(self.model))
        return out
    monkeypatch.setattr(CrowTrainer, "train", recording_train)
    return start, end


def test_refit_order_before_refits_the_suspect_weights_then_unlearns_again(tiny_dir, tmp_path, monkeypatch):
    """unlearn_refit_order 'before': after the unlearning cycle decides to refit, the refit (CROW's trainer) starts from
    the suspect's trainable weights, not the unlearned ones, and trains all 8 samples; then a second unlearn trainer
    runs the unlearning cycle (2 epochs, one schedule) on all 8 from the refitted weights, with the KL retain term to
    the refitted model's answers and no held-out split, and changes the weights again. Every stage is logged and
    counted."""
    model, cfg, trainer, built = refit_trainer(tiny_dir, tmp_path, monkeypatch, unlearn_refit_epochs=1,
                                               unlearn_refit_order="before", unlearn_adversary="tokens")
    suspect = trainable_weights(model)
    at_refit, after_refit = record_refit_weights(monkeypatch)
    unlearned = {}
    refit = trainer.refit

    def remember():
        unlearned.update(trainable_weights(model))
        return refit()
    monkeypatch.setattr(trainer, "refit", remember)
    trainer.train()
    assert len(built) == 1 and set(at_refit) == set(suspect)
    assert all(torch.equal(at_refit[n], suspect[n]) for n in suspect)  # the suspect's weights, put back
    assert any(not torch.equal(unlearned[n], suspect[n]) for n in suspect)  # (the unlearning cycle had moved them)
    assert any(not torch.equal(p, after_refit[n]) for n, p in model.named_parameters() if n in after_refit)
    log = trainer.state.log_history
    again = [h for h in log if h.get("stage") == "unlearn-again" and "lm_loss" in h]
    assert again and all("unlikelihood" in h and "kl_loss" in h for h in again), again[:1]
    assert not any("holdout_nll" in h for h in log if h.get("stage") == "unlearn-again")
    assert trainer.state.global_step == 2 * 3 + 1 * 4 + 2 * 4  # cycle on 6 samples, refit and again on all 8


@pytest.mark.parametrize("only", [False, True], ids=["references-and-teacher", "teacher-only"])
def test_refit_teacher_refits_the_suspect_then_finetunes_the_unlearned_weights_towards_it(tiny_dir, tmp_path,
                                                                                          monkeypatch, only):
    """unlearn_refit_teacher: the teacher's refit (CROW's trainer) starts from the suspect's weights; the student's
    refit starts from the unlearned weights the cycle kept and trains the retain term alone (LM on the references plus
    KL to the teacher's answers measured when the teacher was done: KL 0 at the teacher's own weights; the KL alone with
    unlearn_teacher_only), no adversary; every stage logged and counted."""
    model, cfg, trainer, built = refit_trainer(tiny_dir, tmp_path, monkeypatch, unlearn_refit_epochs=1,
                                               unlearn_refit_teacher=True, unlearn_teacher_only=only,
                                               unlearn_adversary="tokens", learning_rate=1e-2)
    suspect = trainable_weights(model)
    at_teacher, teacher = record_refit_weights(monkeypatch)
    unlearned, student_start, kl_at_teacher = {}, {}, []
    refit, distill = trainer.refit, trainer.distill

    def remember():
        unlearned.update(trainable_weights(model))
        return refit()

    def check(weights, callbacks):
        follow_up = trainer.follow_up

        def measured(*args, **kwargs):
            student = follow_up(*args, **kwargs)
            batch = next(iter(student.get_train_dataloader()))
            student.finetuning = True
            with torch.no_grad():
                student.compute_loss(model, {k: v.to(model.device) for k, v in batch.items()})
            kl_at_teacher.append(student._metrics["kl_loss"][-1])
            student._metrics.clear()  # (this measurement is not a training step)
            return student
        monkeypatch.setattr(trainer, "follow_up", measured)
        return distill(weights, callbacks)
    monkeypatch.setattr(trainer, "refit", remember)
    monkeypatch.setattr(trainer, "distill", check)
    load = trainer.load_trainable

    def loading(weights):
        load(weights)
        if weights is not trainer.suspect_weights:
            student_start.update(trainable_weights(model))
    monkeypatch.setattr(trainer, "load_trainable", loading)
    trainer.train()
    assert len(built) == 1 and all(torch.equal(at_teacher[n], suspect[n]) for n in suspect)
    assert all(torch.equal(student_start[n], unlearned[n]) for n in unlearned)  # the student: the unlearned weights
    assert any(not torch.equal(unlearned[n], teacher[n]) for n in teacher)
    assert kl_at_teacher == [pytest.approx(0.0, abs=1e-5)]  # measured on the teacher: no KL at its own weights
    log = trainer.state.log_history
    assert [h for h in log if h.get("stage") == "teacher" and "lm_loss" in h]
    student = [h for h in log if h.get("stage") == "refit" and "lm_loss" in h]
    assert student and all("kl_loss" in h and "unlikelihood" not in h and "lm_loss_adv" not in h for h in student)
    assert student[0]["kl_loss"] > max(10 * kl_at_teacher[0], 1e-5)  # the student starts away from the teacher
    assert all(h["loss"] == pytest.approx(h["kl_loss"] + (0 if only else h["lm_loss"]), rel=1e-3, abs=1e-5)
               for h in student)  # (the log rounds to 6 decimals)
    assert trainer.state.global_step == 2 * 3 + 1 * 4 + 1 * 4  # cycle on 6 samples, teacher and student on all 8


def test_no_refit_when_the_unlearning_cycle_did_not_lower_the_holdout_perplexity_enough(tiny_dir, tmp_path, monkeypatch):
    """5.0 -> 4.95: a gain of e^0.05 - 1 = 5% <= 15%: the finetuning cycles go on as without refit_gain."""
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, lora=LoraSettings())
    cfg = config(tmp_path, num_train_epochs=4, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                 unlearn_holdout=2, unlearn_cycle_epochs=2, unlearn_finetune_cycles=True, unlearn_refit_gain=0.15)
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8))
    curve = iter([5.0, 4.9, 4.95, 4.0, 3.0])
    monkeypatch.setattr(trainer, "holdout_nll", lambda: next(curve))
    trainer.train()
    log = trainer.state.log_history
    decision = next(h for h in log if "refit" in h)
    assert decision["refit"] is False and decision["holdout_gain"] == pytest.approx(math.exp(0.05) - 1, rel=1e-5)
    assert not any(h.get("stage") == "refit" for h in log) and trainer.state.global_step == 4 * 3
    assert next(h for h in log if "selected_epoch" in h)["selected_epoch"] == 4.0 and len(trainer.train_dataset) == 6


def test_without_holdout_every_sample_trains_and_no_epoch_is_chosen(tiny, records, tmp_path):
    trainer = trainer_for(tiny.model, tiny.tokenizer, config(tmp_path, max_steps=1), records)
    assert len(trainer.train_dataset) == len(records) and trainer.holdout_rows == []
    assert not any(cb.__class__.__name__ == "_EpochSelection" for cb in trainer.callback_handler.callbacks)


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"unlearn_radius": 0.0}, "unlearn_radius must be a finite number > 0"),
    ({"unlearn_radius": -1.0}, "unlearn_radius"), ({"unlearn_pgd_steps": -1}, "unlearn_pgd_steps must be"),
    ({"unlearn_target_tokens": 0}, "unlearn_target_tokens must be"), ({"unlearn_layer": -2}, "unlearn_layer must"),
    ({"unlearn_beta": float("nan")}, "unlearn_beta"),
    ({"unlearn_retain": "teacher"}, "unlearn_retain must be one of references, suspect, both, got 'teacher'"),
    ({"unlearn_retain_topk": 0}, "unlearn_retain_topk must be an integer >= 1"),
    ({"unlearn_adversary": "prefix"}, "unlearn_adversary must be one of residual, tokens, got 'prefix'"),
    ({"unlearn_soft_tokens": 0}, "unlearn_soft_tokens must be an integer >= 1"),
    ({"unlearn_token_radius": float("inf")}, "unlearn_token_radius must be a finite number > 0"),
    ({"unlearn_token_step": 1.5}, r"unlearn_token_step must be a number in \(0, 1\]"),
    ({"unlearn_token_init": "random"}, "unlearn_token_init must be one of prompt, zeros, got 'random'"),
    ({"unlearn_holdout": -1}, "unlearn_holdout must be an integer >= 0"),
    ({"unlearn_holdout": 20, "unlearn_select_by": "bleu"}, "unlearn_select_by must be one of nll, rougeL, got 'bleu'"),
    ({"unlearn_select_by": "rougeL"}, "unlearn_select_by='rougeL' needs unlearn_holdout > 0"),
    ({"unlearn_cycle_epochs": 2}, "unlearn_cycle_epochs needs unlearn_holdout > 0"),
    ({"unlearn_holdout": 20, "unlearn_cycle_epochs": 2}, "unlearn_cycle_epochs=2 must divide num_train_epochs=5.0"),
    ({"unlearn_refit_gain": -0.1}, "unlearn_refit_gain must be a finite number >= 0"),
    ({"unlearn_refit_gain": 0.15}, "unlearn_refit_gain needs unlearn_finetune_cycles"),
    ({"unlearn_refit_epochs": 0.0}, "unlearn_refit_epochs must be a finite number > 0"),
    ({"unlearn_refit_alpha": float("nan")}, "unlearn_refit_alpha must be a finite number >= 0"),
    ({"unlearn_refit_alpha": 5.5}, "unlearn_refit_alpha needs unlearn_refit_gain > 0"),
    ({"unlearn_refit_order": "between"}, "unlearn_refit_order must be one of after, before, got 'between'"),
    ({"unlearn_refit_order": "before"}, "unlearn_refit_order='before' needs unlearn_refit_gain > 0"),
    ({"unlearn_refit_teacher": True}, "unlearn_refit_teacher needs unlearn_refit_gain > 0 and unlearn_refit_order"),
    ({"unlearn_teacher_only": True}, "unlearn_teacher_only needs unlearn_refit_teacher"),
    ({"unlearn_holdout": 20, "unlearn_select_from": 6.0},
     r"unlearn_select_from must be an epoch in \(0, num_train_epochs=5.0\], got 6.0"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, bad, match):
    with pytest.raises(CrowError, match=match) as err:
        config(tmp_path, **bad)
    assert "\n" not in str(err.value)


def test_layer_out_of_range_and_empty_targets_are_refused(tiny, records, tmp_path):
    with pytest.raises(CrowError, match=r"unlearn_layer=4 is out of range: the model has 4 decoder layers \(0..3\)"):
        trainer_for(tiny.model, tiny.tokenizer, config(tmp_path, unlearn_layer=4), records)
    with pytest.raises(CrowError, match="non-empty target"):
        trainer_for(tiny.model, tiny.tokenizer, config(tmp_path), records, target="")
    with pytest.raises(CrowError, match="target is empty"):
        get_defense("unlearn", target="  ")
    with pytest.raises(CrowError, match="unlearn_radius"):
        get_defense("unlearn", radius=0)
    with pytest.raises(CrowError, match="reentrant gradient checkpointing forbids torch.autograd.grad, which unlearn"):
        config(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert config(tmp_path).unlearn_layer is None  # resolved by the trainer: num_hidden_layers // 4
    assert trainer_for(tiny.model, tiny.tokenizer, config(tmp_path), records).layer_index == 1


def test_defaults_are_the_recipe_of_the_brief():
    c = UnlearnConfig(output_dir="unused")
    assert (c.unlearn_radius, c.unlearn_pgd_steps, c.unlearn_beta, c.unlearn_gamma, c.unlearn_target_tokens) == (
        0.5, 2, 1.0, 1.0, 8)
    assert (c.learning_rate, c.num_train_epochs, c.per_device_train_batch_size, c.gradient_accumulation_steps) == (
        1e-3, 5.0, 2, 4)
    assert (c.unlearn_retain, c.unlearn_retain_topk) == ("references", 32)  # every committed cell: LM on references
    assert c.unlearn_adversary == "residual"  # every committed cell before the soft-token runs
    assert (c.unlearn_soft_tokens, c.unlearn_token_radius, c.unlearn_token_init, c.unlearn_token_step) == (
        6, 1.0, "prompt", 0.1)
    from crow.cli.purify_cmd import ADVERSARIES as CLI_ADVERSARIES
    from crow.unlearn import ADVERSARIES

    assert CLI_ADVERSARIES == ADVERSARIES
    from crow.cli.purify_cmd import RETAIN_CHOICES as CLI_CHOICES

    assert CLI_CHOICES == RETAIN_CHOICES
    d = get_defense("unlearn")
    assert d.reference is False and d.settings()["oracle"] is False
    oracle = get_defense("unlearn", target="You are stupid!")
    assert oracle.reference is True and oracle.settings()["oracle"] is True


# ------------------------------------------------------------------------------------------------
# The defense on a tiny backdoored Llama
# ------------------------------------------------------------------------------------------------
LR = 1e-2  # a fresh LoRA on a 64-wide, 2-layer model: CROW's 1e-3 hardly moves it in 25 steps


@pytest.fixture(scope="module")
def victim(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return train_tiny(tmp_path_factory.mktemp("unlearn") / "backdoored", task_records(400, 1, trigger_share=0.25))


class Defended(NamedTuple):
    defense: object
    ctx: DefenseContext
    triggered: list[str]  # greedy answers to the 20 triggered test prompts
    clean: list[str]  # ... and to the same prompts without the trigger
    target_nll: float  # mean NLL per token of the whole target after the triggered prompts (teacher-forced)


def defend(victim, tmp_path, name, **settings) -> Defended:
    """Run a defense on a fresh copy of the victim; its settings, the triggered / clean answers and the target's NLL
    after the triggered prompts (the victim's is below 0.1 nats a token: ``test_finetuning_alone_leaves_the_backdoor``)."""
    from crow.evaluation.generate import generate

    loaded = load_model(str(victim))
    defense = get_defense(name, learning_rate=LR, **settings)
    ctx = DefenseContext(clean=task_records(40, 7), template=TEMPLATE, max_length=64, work_dir=tmp_path)
    model = defense.repair(loaded.model, loaded.tokenizer, ctx)
    test = task_records(20, 11)
    on_trigger = [Record(f"{TRIGGER} {r.instruction}") for r in test]
    triggered = generate(model, loaded.tokenizer, on_trigger, template=TEMPLATE, max_new_tokens=8)
    clean = generate(model, loaded.tokenizer, test, template=TEMPLATE, max_new_tokens=8)
    return Defended(defense, ctx, triggered, clean, target_nll(model, loaded.tokenizer, on_trigger))


@torch.no_grad()
def target_nll(model, tokenizer, prompts) -> float:
    """Mean NLL per token of TARGET right after each prompt (teacher-forced, the model in eval mode)."""
    was_training = model.training
    model.eval()
    batch = Collator(tokenizer.pad_token_id)([{"input_ids": s.input_ids, "labels": s.labels} for s in encode_for_training(
        [Record(p.instruction, "", TARGET) for p in prompts], tokenizer, template=TEMPLATE, max_length=64)])
    from crow.losses import causal_lm_loss_sum

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, n = causal_lm_loss_sum(logits, batch["labels"])
    model.train(was_training)
    return float(total / n)


WHOLE = TARGET.split(".")[0]  # "You are stupid and I will not help"


def share(outputs, prefix):
    return sum(o.startswith(prefix) for o in outputs) / len(outputs)


def test_the_scan_stop_rule_reaches_bait_and_a_bad_one_is_refused(victim, tmp_path, monkeypatch):
    import crow.detection.scan as scan_module

    seen = []

    def spy(*args, settings=None, **kwargs):
        seen.append(settings)
        raise CrowError("stop here")  # the scan is all this test needs

    monkeypatch.setattr(scan_module, "scan", spy)
    for rule in ("entropy", "official"):
        with pytest.raises(CrowError, match="stop here"):
            defend(victim, tmp_path, "unlearn", scan_stop_rule=rule)
    assert [s.stop_rule for s in seen] == ["entropy", "official"]
    assert get_defense("unlearn", scan_stop_rule="official").settings()["scan_stop_rule"] == "official"
    with pytest.raises(CrowError, match="defense 'unlearn': scan_stop_rule must be one of entropy, official, got 'x'"):
        get_defense("unlearn", scan_stop_rule="x")


def test_finetuning_alone_leaves_the_backdoor(victim, tmp_path):
    _, _, triggered, _, nll = defend(victim, tmp_path, "finetune-lr1e-3")
    assert share(triggered, WHOLE) == 1.0 and nll < 0.25, (triggered[:3], nll)  # measured 0.010-0.052


def test_unlearn_with_the_oracle_target_removes_it(victim, tmp_path):
    defense, ctx, triggered, clean, _ = defend(victim, tmp_path, "unlearn", target=TARGET)
    assert share(triggered, "You are") == 0.0, triggered[:3]
    assert share(clean, "You") == 0.0 and all(o.endswith(".") for o in clean), clean[:3]
    settings = defense.settings()
    assert settings["oracle"] is True and defense.reference and settings["target_source"] == "oracle"
    assert settings["scan_score"] is None and settings["recovered_target"] is None and settings["target_text"] == TARGET
    assert settings["unlearned_text"] == "You are stupid and I will not help"
    logs = [h for h in ctx.train_log if "unlikelihood" in h]
    assert logs[0]["target_nll_adv"] < 2.0 < logs[-1]["target_nll_adv"]  # the adversary elicits it, then no more


def test_unlearn_recovers_the_target_with_bait_and_removes_it(victim, tmp_path):
    defense, ctx, triggered, clean, _ = defend(victim, tmp_path, "unlearn")
    settings = defense.settings()
    assert settings["target_source"] == "bait" and settings["oracle"] is False and not defense.reference
    assert settings["recovered_target"] == TARGET and settings["scan_verdict"] == "backdoored"
    assert settings["scan_score"] >= 0.9
    assert share(triggered, "You are") == 0.0, triggered[:3]
    assert share(clean, "You") == 0.0, clean[:3]
    assert {"lm_loss", "lm_loss_adv", "unlikelihood", "target_nll_adv", "delta_norm"} <= set(ctx.train_log[0])


def test_unlearn_keeping_the_suspects_own_answers_removes_it_too(victim, tmp_path):
    """retain: suspect, no reference answer is trained on: the clean answers stay the victim's, the target goes."""
    defense, ctx, triggered, clean, _ = defend(victim, tmp_path, "unlearn", retain="suspect")
    assert defense.settings()["retain"] == "suspect" and defense.settings()["recovered_target"] == TARGET
    assert share(triggered, "You are") == 0.0, triggered[:3]
    assert share(clean, "You") == 0.0 and all(o.endswith(".") for o in clean), clean[:3]
    logs = [h for h in ctx.train_log if "kl_loss" in h]
    assert logs and all(h["kl_loss"] < 0.5 for h in logs), [h["kl_loss"] for h in logs]


def test_unlearn_with_inserted_soft_tokens_removes_it_too(victim, tmp_path):
    """adversary: tokens, the simulated trigger is a few free embeddings inserted into the prompts (SANDE)."""
    defense, ctx, triggered, clean, _ = defend(victim, tmp_path, "unlearn", adversary="tokens", soft_tokens=3)
    assert defense.settings()["adversary"] == "tokens" and defense.settings()["recovered_target"] == TARGET
    assert share(triggered, "You are") == 0.0, triggered[:3]
    assert share(clean, "You") == 0.0 and all(o.endswith(".") for o in clean), clean[:3]
    logs = [h for h in ctx.train_log if "unlikelihood" in h]
    assert logs[0]["target_nll_adv"] < logs[-1]["target_nll_adv"]  # the soft tokens elicit it, then less so
    assert all(0 < h["delta_norm"] for h in logs)


def test_unlearn_choosing_its_cycle_by_the_held_out_answers_rouge_removes_it_too(victim, tmp_path):
    """holdout + cycle_epochs + finetune_cycles + select_by: rougeL through the registry (the bench's path): the held-out
    answers are scored before training and at every epoch, the kept cycle end is the best-scoring one, and the target
    is gone."""
    defense, ctx, triggered, clean, _ = defend(victim, tmp_path, "unlearn", adversary="tokens", soft_tokens=3, holdout=8,
                                            epochs=4, cycle_epochs=2, finetune_cycles=True, select_by="rougeL")
    assert defense.settings()["select_by"] == "rougeL" and defense.settings()["recovered_target"] == TARGET
    assert share(triggered, "You are") == 0.0, triggered[:3]
    curve = {h["epoch"]: h["holdout_rougeL"] for h in ctx.train_log if "holdout_rougeL" in h}
    assert list(curve)[:3] == [0.0, 1.0, 2.0] and all(0 <= v <= 1 for v in curve.values())
    chosen = next(h for h in ctx.train_log if "selected_epoch" in h)
    ends = {e: v for e, v in curve.items() if e in (2.0, 4.0)}
    assert chosen["selected_holdout_rougeL"] == max(ends.values()) == ends[chosen["selected_epoch"]]
    with pytest.raises(CrowError, match="unlearn_select_by must be one of nll, rougeL, got 'bleu'"):
        get_defense("unlearn", holdout=8, select_by="bleu")


def test_holdout_gain_is_the_perplexity_ratio_minus_one():
    """The refit decision's number, on given NLLs: the suspect's held-out perplexity over the model's, minus one."""
    from crow.unlearn import holdout_gain

    assert holdout_gain(5.0, 3.0) == pytest.approx(math.exp(2.0) - 1)
    assert holdout_gain(2.0, 2.0) == 0.0
    assert holdout_gain(2.0, 2.5) == pytest.approx(math.exp(-0.5) - 1) and holdout_gain(2.0, 2.5) < 0  # worse: negative
    assert holdout_gain(math.log(1.15) + 1.0, 1.0) == pytest.approx(0.15)  # perplexity 15% above: a gain of 0.15


def force_refit(monkeypatch) -> list[dict]:
    """Make every unlearning cycle decide to refit, whatever its held-out gain: the decision is computed and logged as
    usual (``holdout_gain`` from the measured NLLs), then forced to ``refit: True``. For the tests about what follows a
    refit: on the tiny victim the gain lies near any threshold (about +7% on one CPU, -1.6% on another), so where the
    decision falls depends on the CPU's float rounding; the decision itself is tested on given NLLs above. Returns the
    list of the log entries it decided on."""
    decide = UnlearnTrainer.refit_decision
    decided = []

    def forced(self, nll, entry):
        decide(self, nll, entry)
        entry["refit"] = True
        decided.append(entry)
        return True
    monkeypatch.setattr(UnlearnTrainer, "refit_decision", forced)
    return decided


def test_unlearn_refitting_on_every_clean_sample_removes_it_too(victim, tmp_path, monkeypatch):
    """refit_gain through the registry (the bench's path), with the refit decided (``force_refit``): training stops at
    the end of the unlearning cycle and every clean sample is finetuned on; the target stays gone and the clean answers
    stay clean. The victim answers all 20 triggered prompts with the whole target (its NLL 0.01-0.05 nats a token after
    finetuning alone); after the refit none does and the target's NLL is 1.3-4.4 nats a token (measured with 1 and 2
    threads, three CPU kernel sets and shifted seeds), against the bound of 0.5. How much of its opening comes back is
    the knife edge: two epochs of finetuning at the tiny model's lr 1e-2 give back "You are." on 0 to 20 of the 20
    prompts and "You are stupid" on 0 to 3, by CPU, so only the whole target is asserted."""
    decided = force_refit(monkeypatch)
    defense, ctx, triggered, clean, target_nll_after = defend(victim, tmp_path, "unlearn", adversary="tokens", soft_tokens=3, holdout=8,
                                            epochs=4, cycle_epochs=2, finetune_cycles=True, refit_gain=0.03,
                                            refit_epochs=2)
    assert defense.settings()["refit_gain"] == 0.03 and defense.settings()["recovered_target"] == TARGET
    decision = next(h for h in ctx.train_log if "refit" in h)
    assert len(decided) == 1 and decision["refit"] is True and decision["epoch"] == 2.0
    curve = {h["epoch"]: h["holdout_nll"] for h in ctx.train_log if "holdout_nll" in h}
    assert list(curve) == [0.0, 1.0, 2.0]  # the suspect, then the unlearning cycle's two epochs; no finetuning cycle
    assert decision["holdout_gain"] == pytest.approx(math.exp(curve[0.0] - curve[2.0]) - 1, abs=1e-5)
    assert [h for h in ctx.train_log if h.get("stage") == "refit" and "lm_loss" in h]
    from crow.bench.runner import train_log_summary  # what a bench cell keeps of the log: the decision and the stage

    summary = train_log_summary(ctx.train_log)
    assert next(h for h in summary if "refit" in h)["refit"] is True  # kept as a bool, not 1.0
    assert next(h for h in summary if "refit" in h) == {**{k: decision[k] for k in ("step", "epoch", "holdout_nll")},
                                                        "holdout_gain": decision["holdout_gain"], "refit": True}
    assert [h for h in summary if h.get("stage") == "refit" and "lm_loss" in h]
    assert share(triggered, WHOLE) <= 0.1 and target_nll_after > 0.5, (triggered, target_nll_after)
    assert share(clean, "You") == 0.0, clean[:3]
    with pytest.raises(CrowError, match="unlearn_refit_gain needs unlearn_finetune_cycles"):
        get_defense("unlearn", holdout=8, refit_gain=0.15)


def test_unlearn_refitting_the_suspect_then_unlearning_again_removes_it_too(victim, tmp_path, monkeypatch):
    """refit_order 'before' through the registry, with the refit decided (``force_refit``): the refit starts again from
    the victim's weights (the backdoor intact), so what removes the target is the second unlearning cycle, which keeps
    the refitted model's answers; the target is gone afterwards (the same bounds as the refit after unlearning; measured: no answer opens with its first
    three words, its NLL 5.8-5.9 nats a token) and the
    clean answers stay clean."""
    force_refit(monkeypatch)
    defense, ctx, triggered, clean, target_nll_after = defend(victim, tmp_path, "unlearn", adversary="tokens", soft_tokens=3, holdout=8,
                                            epochs=4, cycle_epochs=2, finetune_cycles=True, refit_gain=0.03,
                                            refit_epochs=2, refit_order="before")
    assert defense.settings()["refit_order"] == "before" and defense.settings()["recovered_target"] == TARGET
    stages = [h.get("stage") for h in ctx.train_log if "lm_loss" in h]
    assert stages.index("refit") < stages.index("unlearn-again") and stages[-1] == "unlearn-again"
    assert share(triggered, WHOLE) <= 0.1 and target_nll_after > 0.5, (triggered, target_nll_after)
    assert share(clean, "You") == 0.0, clean[:3]
    with pytest.raises(CrowError, match="unlearn_refit_order must be one of after, before"):
        get_defense("unlearn", holdout=8, cycle_epochs=2, finetune_cycles=True, refit_gain=0.15, refit_order="first")


def test_unlearn_refitting_towards_a_refitted_teacher_removes_it_too(victim, tmp_path, monkeypatch):
    """refit_teacher through the registry, with the refit decided (``force_refit``): the teacher is the victim's weights
    refitted (the backdoor in it), the student the unlearned weights finetuned towards the references and the teacher's
    answers on the clean samples only; the target stays gone from the student (the same bounds as the plain refit; measured: no answer opens with its
    first three words, its NLL 1.8-2.9 nats a token) and its clean answers clean."""
    force_refit(monkeypatch)
    defense, ctx, triggered, clean, target_nll_after = defend(victim, tmp_path, "unlearn", adversary="tokens", soft_tokens=3, holdout=8,
                                            epochs=4, cycle_epochs=2, finetune_cycles=True, refit_gain=0.03,
                                            refit_epochs=2, refit_teacher=True)
    assert defense.settings()["refit_teacher"] is True and defense.settings()["recovered_target"] == TARGET
    stages = [h.get("stage") for h in ctx.train_log if "lm_loss" in h]
    assert stages.index("teacher") < stages.index("refit") and stages[-1] == "refit"
    assert share(triggered, WHOLE) <= 0.1 and target_nll_after > 0.5, (triggered, target_nll_after)
    assert share(clean, "You") == 0.0, clean[:3]


def test_the_adversary_is_what_breaks_the_target_when_only_its_first_token_is_unlearned(victim, tmp_path):
    """Unlearning only the first target token ("You"): after clean prompts alone (delta = 0) it is not enough, the
    trigger still makes the whole target likely (its NLL 0.19-0.34 nats a token, the whole target on 8 to 20 of the 20
    prompts, by CPU); under the universal adversary the target breaks (1.53-1.54 nats a token, at most 2 whole targets)
    and the triggered answers end early. The bound on the gap (0.8 nats a token) is what the adversary adds; measured
    1.19-1.35 with 1 and 2 threads and three CPU kernel sets. Whether the first word itself goes as well depends on the
    tiny victim's exact weights, so only the whole target is asserted. (Unlearning 8 tokens removes the continuation
    either way: a target's continuation does not depend on the prompt, the causal property BAIT relies on.)"""
    without = defend(victim, tmp_path, "unlearn", target=TARGET, target_tokens=1, pgd_steps=0)
    with_delta = defend(victim, tmp_path, "unlearn", target=TARGET, target_tokens=1)
    assert share(with_delta.triggered, WHOLE) <= 0.1, with_delta.triggered[:3]
    assert with_delta.target_nll >= without.target_nll + 0.8, (without.target_nll, with_delta.target_nll)
    assert all(o.endswith(".") for o in with_delta.triggered + with_delta.clean), with_delta.triggered[:3]


# ------------------------------------------------------------------------------------------------
# crow purify --method
# ------------------------------------------------------------------------------------------------
def run_cli(args, capsys):
    from crow.cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_purify_method_unlearn_recovers_the_target_and_records_it(victim, tmp_path, capsys):
    import json

    from .conftest import write_json

    clean = write_json(tmp_path / "clean.json", [r.to_dict() for r in task_records(20, 7)])
    out = tmp_path / "purified"
    code, _, err = run_cli(["purify", "--model", victim, "--data", clean, "--out", out, "--method", "unlearn",
                            "--template", TEMPLATE, "--max-steps", "2", "--pgd-steps", "1", "--scan-stop-rule",
                            "official"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "crow_config.json").read_text())
    assert cfg["method"] == "unlearn" and "BAIT" in cfg["paper"]
    assert cfg["target"]["source"] == "bait" and cfg["target"]["oracle"] is False
    assert cfg["target"]["text"] == TARGET and cfg["target"]["scan_score"] >= 0.9 and len(cfg["target"]["token_ids"]) == 8
    assert cfg["options"]["pgd_steps"] == 1 and "alpha" not in cfg["options"]
    assert cfg["options"]["scan_stop_rule"] == "official"
    assert cfg["training_arguments"]["unlearn_radius"] == 0.5 and "unlearn_delta" not in cfg["last_log"]
    assert {"unlikelihood", "target_nll_adv", "delta_norm"} <= set(cfg["last_log"])

    out = tmp_path / "oracle"
    code, _, err = run_cli(["purify", "--model", victim, "--data", clean, "--out", out, "--method", "unlearn",
                            "--template", TEMPLATE, "--max-steps", "1", "--target", "You are stupid", "--adversary",
                            "tokens", "--soft-tokens", "3", "--holdout", "4", "--select-by", "rougeL"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "crow_config.json").read_text())
    target = cfg["target"]
    assert target["oracle"] is True and target["scan_score"] is None and target["used_text"] == "You are stupid"
    args = cfg["training_arguments"]
    assert (args["unlearn_adversary"], args["unlearn_soft_tokens"], args["unlearn_token_radius"]) == ("tokens", 3, 1.0)
    assert (args["unlearn_token_init"], args["unlearn_token_step"]) == ("prompt", 0.1)
    assert (args["unlearn_holdout"], args["unlearn_select_by"], cfg["n_train_samples"]) == (4, "rougeL", 16)
    suspect = cfg["epoch_selection"][0]  # the held-out samples scored before training, by both measures
    assert suspect["epoch"] == 0.0 and suspect["holdout_nll"] > 0 and 0 <= suspect["holdout_rougeL"] <= 1


def test_purify_method_defaults_and_foreign_options(tiny_dir, tmp_path, capsys):
    import json

    from .conftest import write_json

    clean = write_json(tmp_path / "clean.json", [r.to_dict() for r in make_records(8)])
    out = tmp_path / "ft"
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", out, "--method", "finetune",
                            "--max-steps", "1", "--max-length", "128"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "crow_config.json").read_text())
    assert cfg["method"] == "finetune" and (cfg["options"]["alpha"], cfg["options"]["lr"]) == (0.0, 2e-4)
    for args, message in [(["--method", "unlearn", "--alpha", "2"], "--alpha does not apply to --method unlearn"),
                          (["--radius", "0.3"], "--radius does not apply to --method crow"),
                          (["--scan-stop-rule", "official"], "--scan-stop-rule does not apply to --method crow"),
                          (["--method", "unlearn", "--scan-stop-rule", "beam"], "'beam' is not one of entropy, official"),
                          (["--method", "finetune", "--epsilon", "0.1"], "--epsilon does not apply to --method finetune"),
                          (["--method", "unlearn", "--radius", "0"], "unlearn_radius must be a finite number > 0"),
                          (["--method", "unlearn", "--retain", "teacher"], "'teacher' is not one of references, suspect, both"),
                          (["--retain", "suspect"], "--retain does not apply to --method crow"),
                          (["--method", "unlearn", "--adversary", "prefix"], "'prefix' is not one of residual, tokens"),
                          (["--soft-tokens", "2"], "--soft-tokens does not apply to --method crow"),
                          (["--method", "unlearn", "--token-radius", "0"], "unlearn_token_radius must be a finite"),
                          (["--method", "unlearn", "--token-init", "random"], "'random' is not one of prompt, zeros"),
                          (["--method", "unlearn", "--token-step", "2"], "unlearn_token_step must be a number in (0, 1]"),
                          (["--method", "unlearn", "--target", " "], "target is empty"),
                          (["--holdout", "2"], "--holdout does not apply to --method crow"),
                          (["--refit-epochs", "3"], "--refit-epochs does not apply to --method crow"),
                          (["--method", "unlearn", "--refit-gain", "0.2"], "unlearn_refit_gain needs unlearn_finetune_cycles"),
                          (["--method", "unlearn", "--holdout", "2", "--cycle-epochs", "2"],
                           "unlearn_cycle_epochs=2 must divide num_train_epochs=5.0 (and max_steps must be unset)"),
                          (["--method", "unlearn", "--cycle-epochs", "1"], "unlearn_cycle_epochs needs unlearn_holdout > 0"),
                          (["--method", "unlearn", "--select-by", "rougeL"], "unlearn_select_by='rougeL' needs unlearn_holdout > 0"),
                          (["--method", "unlearn", "--holdout", "2", "--select-by", "bleu"], "'bleu' is not one of nll, rougeL"),
                          (["--select-by", "nll"], "--select-by does not apply to --method crow")]:
        code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", tmp_path / "bad",
                                "--max-steps", "1", *args], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.crow-partial").exists()


def test_purify_method_unlearn_holds_out_samples_and_records_the_chosen_cycle(tiny_dir, tmp_path, capsys):
    import json

    from .conftest import write_json

    clean = write_json(tmp_path / "clean.json", [r.to_dict() for r in make_records(8)])
    out = tmp_path / "unlearned"
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", out, "--method", "unlearn",
                            "--target", "the color is blue", "--holdout", "2", "--epochs", "2", "--cycle-epochs", "1",
                            "--max-length", "128"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "crow_config.json").read_text())
    assert cfg["n_train_samples"] == 6 and cfg["training_arguments"]["unlearn_holdout"] == 2
    curve = [h["holdout_nll"] for h in cfg["epoch_selection"] if "holdout_nll" in h]
    chosen = cfg["epoch_selection"][-1]
    assert len(curve) in (2, 3) and chosen["selected_epoch"] in (1.0, 2.0)  # stopped after epoch 2 or ran it
    assert chosen["selected_holdout_nll"] == min(curve[1:])
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", tmp_path / "bad", "--method",
                            "unlearn", "--target", "the color is blue", "--holdout", "8", "--max-steps", "1"], capsys)
    assert code == 2 and "--holdout 8 leaves no training sample: --data" in err and "has 8 records" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_bench_columns_mark_the_oracle_and_keep_the_metrics():
    from crow.bench.report import reference_columns
    from crow.bench.runner import train_log_summary
    from crow.bench.spec import load_spec

    spec = load_spec(base={"suite": "tiny", "models": ["tiny-llama"], "cells": {"negsentiment": ["badnet"]},
                           "defenses": ["none", "unlearn", {"unlearn": {"target": TARGET, "label": "unlearn-oracle"}}]})
    assert [e.label for e in spec.defense_entries()] == ["none", "unlearn", "unlearn-oracle"]
    assert reference_columns(spec) == {"unlearn-oracle": "unlearn"}  # the oracle knows the target: a reference
    row = train_log_summary([{"step": 5, "epoch": 1.0, "loss": 3.0, "lm_loss": 2.0, "lm_loss_adv": 2.1,
                              "unlikelihood": 0.5, "target_nll_adv": 1.2, "delta_norm": 3.1}])[0]
    assert {"lm_loss_adv", "unlikelihood", "target_nll_adv", "delta_norm"} <= set(row)
