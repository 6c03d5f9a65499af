"""crow.methods.unlearn: target-inverted adversarial unlearning (a BAIT target, soft tokens inserted into the clean
prompts as the adversary, the target's unlikelihood under them, held-out cycles and a refit by CROW).

The adversary's math on hand-made tensors; the trainer and its schedule on the 4-layer tiny Llama of conftest (the
schedule's decisions on given held-out numbers); the whole defense on the 2-layer backdoored Llama of test_scan
(trigger ``cf`` -> "You are stupid and I will not help."), trained here in seconds, with the target given (oracle) and
recovered by BAIT. A test that trains a tiny model asserts either a decision it forced, a rule that holds whatever the
data decided, or a continuous quantity with a wide margin: on a tiny model the data-dependent decisions (the refit's
held-out gain, a cycle that does or does not improve) lie near their thresholds, where each CPU's float rounding
decides them (issue 48).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from crow import CrowError
from crow.data.records import Record
from crow.data.templates import Collator, encode_for_training
from crow.defenses import DefenseContext, get_defense
from crow.losses import logits_needed
from crow.methods.crow import CrowConfig
from crow.methods.crow.trainer import CrowTrainer
from crow.methods.unlearn import UnlearnConfig
from crow.methods.unlearn import run as run_unlearn
from crow.methods.unlearn.adversary import (
    build_target_batch,
    insert_slots,
    labelled_positions,
    pgd_step,
    project_to_ball,
    prompt_mask,
    random_insert_points,
    target_token_log_probs,
    unlikelihood,
)
from crow.methods.unlearn.schedule import (
    CycleSelection,
    cyclic_schedule,
    holdout_gain,
    holdout_split,
    trainable_weights,
)
from crow.methods.unlearn.trainer import UnlearnTrainer, load_state_info
from crow.modeling import replace_embeddings
from crow.models import load_model
from crow.training import RunOptions, make_trainable, train

from .conftest import make_records
from .test_scan import TARGET, TEMPLATE, TRIGGER, task_records, train_tiny


def unlearn_config(**kw) -> UnlearnConfig:
    """The recipe with per-step logging and seed 0, holding out 2 of the 8 records of conftest; ``kw`` overrides."""
    return UnlearnConfig(**{"logging_steps": 1, "seed": 0, "holdout": 2, **kw})


def dataset_of(tokenizer, records, max_length=128):
    samples = encode_for_training(records, tokenizer, max_length=max_length)
    return Dataset.from_list([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])


def trainer_for(model, tokenizer, cfg, records, tmp_path, target="the color is blue", **run):
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return UnlearnTrainer(model=model, args=cfg.training_arguments(str(tmp_path / "run"), disable_tqdm=True, **run),
                          method=cfg, train_dataset=dataset_of(tokenizer, records),
                          data_collator=Collator(tokenizer.pad_token_id), target_ids=ids)


def batch_of(tokenizer, records):
    samples = encode_for_training(records, tokenizer, max_length=128)
    return Collator(tokenizer.pad_token_id)([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])


def given_holdout_nll(monkeypatch, values) -> None:
    """Every UnlearnTrainer built afterwards measures ``values``, one per measurement (before training, then after each
    epoch), instead of its held-out NLL: the schedule's decisions on given numbers."""
    curve = iter(values)
    monkeypatch.setattr(UnlearnTrainer, "holdout_nll", lambda self: next(curve))


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
    draws = torch.stack([random_insert_points(lengths, torch.Generator().manual_seed(s))
                         for s in range(200)])  # [200, 5]
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
    with (pytest.raises(RuntimeError, match="does not match the slots"),
          replace_embeddings(embedding, tokens, slots[:1])):
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
# The adversary, on the 4-layer tiny Llama
# ------------------------------------------------------------------------------------------------
def test_one_pgd_step_lowers_the_target_nll_as_its_gradient_predicts_and_keeps_each_soft_token_in_its_ball(
        tiny, records, tmp_path):
    """The trainer's PGD step on the soft tokens, from a point inside their ball with a small step (token_step 0.02 of
    the budget): each token moves by the step against its own gradient, so to first order the target's NLL falls by
    step x the sum of the tokens' gradient norms; the fall must be at least half of that (measured 0.93-1.0 of it on
    six seeds, up to token_step 0.1; a decrease of about 1e-3 nats, a thousand times the float noise of the NLL).
    With the largest step (token_step 1) from their start, the tokens stay within the budget and the ball binds."""
    model = make_trainable(tiny.model, CrowConfig()).eval()
    cfg = unlearn_config(pgd_steps=1, soft_tokens=3, token_step=0.02)
    trainer = trainer_for(model, tiny.tokenizer, cfg, records, tmp_path)
    assert trainer.delta.shape == (3, 32) and trainer.delta_budget == pytest.approx(1.0 * trainer.prompt_norm)
    batch = batch_of(tiny.tokenizer, records[:4])
    target = build_target_batch(batch["input_ids"], batch["labels"], batch["attention_mask"], trainer.target_ids, 0)
    _, view = trainer._views(batch, target)

    def target_nll(delta):
        return -target_token_log_probs(trainer._forward(model, view, delta).logits, view.labels).mean()

    start = trainer.delta.clone()
    trainer.delta = 0.5 * start  # inside the ball: a small step is not projected
    inside = trainer.delta.clone().requires_grad_(True)
    before = target_nll(inside)
    (grad,) = torch.autograd.grad(before, inside)  # [3, 32]
    step = cfg.token_step * trainer.delta_budget
    trainer._pgd(model, view)
    assert trainer.delta.dtype == torch.float32 and not trainer.delta.requires_grad
    assert torch.allclose((trainer.delta - inside.detach()).norm(dim=-1), torch.full((3,), step), rtol=1e-4)
    with torch.no_grad():
        after = target_nll(trainer.delta).item()
    predicted = step * grad.norm(dim=-1).sum().item()  # first order: -<grad, -step * grad / |grad|> per token
    assert predicted > 1e-4 and before.item() - after >= 0.5 * predicted, (before.item(), after, predicted)
    assert all(p.grad is None for p in model.parameters())  # PGD touches no parameter gradient

    trainer.delta, trainer.method.token_step = start, 1.0  # the largest step, from the start (tokens on the ball)
    for _ in range(3):
        trainer._pgd(model, view)
        norms = trainer.delta.norm(dim=-1)
        assert bool((norms <= trainer.delta_budget * (1 + 1e-5)).all()), (norms, trainer.delta_budget)
    assert norms.max().item() == pytest.approx(trainer.delta_budget, rel=1e-5)  # a step of the budget's size: it binds


def test_the_token_norm_is_measured_on_the_input_embeddings_of_the_training_prompts(tiny, records, tmp_path):
    trainer = trainer_for(tiny.model, tiny.tokenizer, unlearn_config(), records, tmp_path)
    keep, _ = holdout_split(len(records), 2, seed=0)  # the held-out samples are not looked at
    batch = batch_of(tiny.tokenizer, [records[i] for i in keep])
    prompts = prompt_mask(batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        norms = tiny.model.get_input_embeddings()(batch["input_ids"]).norm(dim=-1)  # [B, T]
    expected = norms[prompts].mean().item()
    assert trainer.prompt_norm == pytest.approx(expected, rel=1e-5)
    assert trainer.delta_budget == pytest.approx(1.0 * expected, rel=1e-5)
    # the soft tokens start as embeddings of training prompt tokens (projected onto the ball), not at zero
    prompt_ids = set(batch["input_ids"][prompts].tolist())
    with torch.no_grad():
        table = project_to_ball(tiny.model.get_input_embeddings().weight.float(), trainer.delta_budget)  # [V, H]
    assert trainer.delta.shape == (6, 32)
    for soft in trainer.delta:
        matches = [i for i in prompt_ids if torch.allclose(table[i], soft, atol=1e-6)]
        assert matches, "a soft token that is no training prompt token's embedding"
    again = trainer_for(tiny.model, tiny.tokenizer, unlearn_config(), records, tmp_path)
    assert torch.equal(again.delta, trainer.delta)  # drawn with the training seed
    other = trainer_for(tiny.model, tiny.tokenizer, unlearn_config(seed=1), records, tmp_path)
    assert not torch.equal(other.delta, trainer.delta)


def test_the_loss_is_the_sum_of_its_three_terms_on_the_inserted_batches(tiny, records, tmp_path):
    model = make_trainable(tiny.model, CrowConfig()).eval()  # eval: no accumulation scaling
    cfg = unlearn_config(pgd_steps=0, beta=0.7, gamma=2.0, soft_tokens=2, seed=4)
    trainer = trainer_for(model, tiny.tokenizer, cfg, records, tmp_path)
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
    assert set(trainer._metrics) == {"lm_loss", "lm_loss_adv", "unlikelihood", "target_nll_adv", "delta_norm"}
    trainer.finetuning = True  # the cycles after the unlearning one: the LM term alone
    assert trainer.compute_loss(model, batch).item() == pytest.approx(lm.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Training: what changes, and gradient accumulation
# ------------------------------------------------------------------------------------------------
def test_lora_trains_the_adapter_only_and_full_finetune_trains_the_weights(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir))
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    ids = loaded.tokenizer("the color is blue", add_special_tokens=False)["input_ids"]
    cfg = unlearn_config(epochs=1, cycle_epochs=1, batch_size=2, grad_accum=1, refit_epochs=0)
    run = RunOptions(output_dir=str(tmp_path / "run"), max_length=128, progress=False)
    result = train(loaded.model, loaded.tokenizer, make_records(8), cfg, UnlearnTrainer, run,
                   trainer_kwargs={"target_ids": ids})
    assert result.global_step == 3 and result.train_samples == 6  # 2 of 8 held out, batches of 2
    for name, p in result.model.named_parameters():
        base = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(p.detach(), before[base]), f"base weight changed: {name}"
    assert all(p.detach().abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)
    logs = [h for h in result.log_history if "lm_loss" in h]
    assert logs and all(k in logs[-1] for k in ("lm_loss_adv", "unlikelihood", "target_nll_adv", "delta_norm"))

    loaded = load_model(str(tiny_dir))
    result = train(loaded.model, loaded.tokenizer, make_records(8), unlearn_config(
        epochs=1, cycle_epochs=1, batch_size=2, grad_accum=1, refit_epochs=0, full_finetune=True), UnlearnTrainer, run,
        trainer_kwargs={"target_ids": ids})
    changed = [n for n, p in result.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.embed_tokens.weight" in changed and len(changed) == len(before)


def _one_step_update(tiny_dir, tmp_path, *, batch, accum, delta):
    loaded = load_model(str(tiny_dir))
    torch.manual_seed(1)
    model = make_trainable(loaded.model, CrowConfig())
    with torch.no_grad():  # non-zero LoRA B so every adapter weight gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    records = make_records(5)  # 1 held out, 4 trained: one optimizer step in one epoch
    samples = encode_for_training(records, loaded.tokenizer)
    assert len({len(s.input_ids) for s in samples}) == 1  # equal lengths: padding plays no part
    cfg = unlearn_config(holdout=1, batch_size=batch, grad_accum=accum, epochs=1, cycle_epochs=1, learning_rate=0.5,
                         scheduler="constant", warmup=0, pgd_steps=0,  # delta fixed: PGD per micro-step differs
                         refit_epochs=0)
    trainer = trainer_for(model, loaded.tokenizer, cfg, records, tmp_path, optim="sgd", max_grad_norm=0)
    trainer.delta = delta.clone()
    trainer.train()
    assert trainer.state.global_step == 1
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_invariance_with_a_fixed_adversary(tiny_dir, tmp_path):
    """4 x 1 and 1 x 4 give the same update (the soft tokens' insertion points are drawn row by row from one
    generator, so both see the same points)."""
    delta = torch.randn((6, 32), generator=torch.Generator().manual_seed(3))
    a = _one_step_update(tiny_dir, tmp_path, batch=4, accum=1, delta=delta)
    b = _one_step_update(tiny_dir, tmp_path, batch=1, accum=4, delta=delta)
    assert any(d.abs().max() > 0 for d in a.values())
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name


def test_the_soft_tokens_the_draws_and_the_selection_travel_with_checkpoints(tiny_dir, tmp_path):
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, CrowConfig())
    cfg = unlearn_config(epochs=1, cycle_epochs=1, batch_size=2, grad_accum=1, warmup=0, refit_epochs=0)
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8), tmp_path, save_strategy="steps", save_steps=1)
    start, points = trainer.delta.clone(), trainer._points.get_state()
    trainer.train()
    saved = tmp_path / "run" / "checkpoint-3" / UnlearnTrainer.STATE_FILE
    assert saved.is_file() and not torch.equal(trainer.delta, start)  # PGD moved them
    fresh = trainer_for(make_trainable(load_model(str(tiny_dir)).model, CrowConfig()), loaded.tokenizer, cfg,
                        make_records(8), tmp_path)
    assert torch.equal(fresh.delta, start) and torch.equal(fresh._points.get_state(), points)
    fresh._load_from_checkpoint(str(saved.parent))
    assert torch.equal(fresh.delta, trainer.delta)
    assert torch.equal(fresh._points.get_state(), trainer._points.get_state())  # the insertion points go on alike
    ours, theirs = trainer.selection, fresh.selection
    assert theirs.suspect_nll == ours.suspect_nll is not None and theirs.stopped == ours.stopped
    assert theirs.kept.epoch == ours.kept.epoch == 1.0 and theirs.kept.nll == ours.kept.nll
    assert theirs.kept.weights.keys() == ours.kept.weights.keys()
    assert all(torch.equal(theirs.kept.weights[n], ours.kept.weights[n]) for n in ours.kept.weights)
    assert load_state_info(str(saved.parent))["global_step"] == 3


# ------------------------------------------------------------------------------------------------
# The held-out split and the cycles
# ------------------------------------------------------------------------------------------------
def test_holdout_split_is_a_seeded_partition_and_keeps_training_samples():
    train_rows, held = holdout_split(10, 3, seed=0)
    assert len(held) == 3 and sorted(train_rows + held) == list(range(10))
    assert holdout_split(10, 3, seed=0) == (train_rows, held) and holdout_split(10, 3, seed=1) != (train_rows, held)
    with pytest.raises(CrowError, match="holdout=5 must leave training samples: there are 5 clean samples"):
        holdout_split(5, 5, seed=0)


def test_holdout_keeps_the_weights_of_the_best_cycle_end(tiny_dir, tmp_path):
    """Trained on 6 of 8 samples in 1-epoch cycles at a large step: the held-out NLL is logged before training and after
    every epoch; training stops at the first cycle end no better than the best before it (or after the last epoch);
    the kept epoch is the best cycle end, and the model ends with exactly its weights (its held-out NLL measured again).
    Which epoch that is depends on the data; the rule is asserted whatever it decided."""
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, CrowConfig())
    cfg = unlearn_config(epochs=3, cycle_epochs=1, learning_rate=5e-2, warmup=0, batch_size=2, grad_accum=1,
                         refit_epochs=0)
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8), tmp_path)
    assert len(trainer.train_dataset) == 6 and len(trainer.holdout_rows) == 2
    held = {tuple(r["input_ids"]) for r in trainer.holdout_rows}
    assert not held & {tuple(trainer.train_dataset[i]["input_ids"]) for i in range(6)}
    trainer.train()
    curve = {h["epoch"]: h["holdout_nll"] for h in trainer.state.log_history if "holdout_nll" in h}
    ends = [e for e in curve if e > 0]
    assert list(curve) == [0.0, *ends] and ends in ([1.0, 2.0], [1.0, 2.0, 3.0])
    assert len(set(curve.values())) == len(curve)  # training moved the held-out answers' NLL after every epoch
    for end in ends[1:-1]:  # it improved on the best cycle end before it: training went on
        assert curve[end] < min(curve[e] for e in ends if e < end), curve
    if ends[-1] < 3.0:  # stopped before the last epoch: it did not improve
        assert curve[ends[-1]] >= min(curve[e] for e in ends[:-1]), curve
    chosen = next(h for h in trainer.state.log_history if "selected_epoch" in h)
    best = min((e for e in curve if e >= 1), key=curve.get)
    assert chosen["selected_epoch"] == best and chosen["selected_holdout_nll"] == curve[best]
    assert trainer.holdout_nll() == pytest.approx(curve[best], abs=1e-5)


def test_cyclic_schedule_repeats_one_cycle():
    lr = cyclic_schedule(lambda step: 1.0 - step / 4, 4)
    assert [lr(s) for s in range(9)] == [1.0, 0.75, 0.5, 0.25, 1.0, 0.75, 0.5, 0.25, 1.0]
    with pytest.raises(CrowError, match="at least one step"):
        cyclic_schedule(lambda step: 1.0, 0)


def test_cycles_repeat_the_schedule_of_a_run_of_one_cycle(tiny_dir, tmp_path):
    """6 epochs in cycles of 2: the learning rate of every cycle is, step for step, that of a 2-epoch run."""
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, CrowConfig())

    def rates(cfg, steps):
        trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8), tmp_path)
        trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        out = []
        for _ in range(steps):
            out.append(trainer.lr_scheduler.get_last_lr()[0])
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        return out

    cycled = rates(unlearn_config(epochs=6, cycle_epochs=2), 30)
    single = rates(unlearn_config(epochs=2, cycle_epochs=2), 10)
    assert cycled == pytest.approx(single * 3) and max(single) == pytest.approx(1e-3) and single[0] == 0.0


class EpochWeights(TrainerCallback):
    """The trainable weights and the soft tokens after every epoch."""

    def __init__(self, trainer) -> None:
        self.trainer, self.weights, self.delta = trainer, {}, {}

    def on_epoch_end(self, args, state, control, **kwargs):
        self.weights[round(state.epoch)] = trainable_weights(self.trainer.model)
        self.delta[round(state.epoch)] = self.trainer.delta.clone()


def test_cycles_stop_at_the_first_cycle_end_that_does_not_improve(tiny_dir, tmp_path, monkeypatch):
    """Held-out curve 0: 5.0, 1: 3.0, 2: 2.5, 3: 1.0, 4: 2.6 (given): epoch 3 is inside a cycle (not eligible), epoch 4
    ends the second cycle no better than the first, so training stops there (of 6) and the model ends with the weights
    it had after epoch 2, not after epoch 4."""
    given_holdout_nll(monkeypatch, [5.0, 3.0, 2.5, 1.0, 2.6, 0.1, 0.1])
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, CrowConfig())
    cfg = unlearn_config(epochs=6, batch_size=2, grad_accum=1, cycle_epochs=2, refit_epochs=0)
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8), tmp_path)
    seen = EpochWeights(trainer)
    trainer.add_callback(seen)
    trainer.train()
    assert [h["epoch"] for h in trainer.state.log_history if "holdout_nll" in h] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert trainer.state.global_step == 4 * 3  # 6 training samples in batches of 2: 3 steps an epoch
    assert next(h for h in trainer.state.log_history if "selected_epoch" in h)["selected_epoch"] == 2.0
    assert any(not torch.equal(seen.weights[2][n], seen.weights[4][n]) for n in seen.weights[2])
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), seen.weights[2][name]), name


def test_finetuning_cycles_train_the_lm_term_alone(tiny_dir, tmp_path, monkeypatch):
    """The first cycle unlearns (unlikelihood and adversary logged, PGD run) and the next trains the LM term alone: its
    logs have no unlikelihood, the soft tokens stay where the first cycle left them, and its loss is the LM loss."""
    given_holdout_nll(monkeypatch, [5.0, 4.0, 3.0, 2.5, 2.0])
    loaded = load_model(str(tiny_dir))
    model = make_trainable(loaded.model, CrowConfig())
    cfg = unlearn_config(epochs=4, batch_size=2, grad_accum=1, cycle_epochs=2, refit_epochs=0)
    trainer = trainer_for(model, loaded.tokenizer, cfg, make_records(8), tmp_path)
    pgd, epochs = trainer._pgd, []

    def counted(*args):
        epochs.append(trainer.state.epoch)
        pgd(*args)
    monkeypatch.setattr(trainer, "_pgd", counted)
    seen = EpochWeights(trainer)
    trainer.add_callback(seen)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "lm_loss" in h]
    first, second = [h for h in steps if h["epoch"] <= 2], [h for h in steps if h["epoch"] > 2]
    assert first and second and all("unlikelihood" in h for h in first)
    assert not any("unlikelihood" in h or "lm_loss_adv" in h for h in second)
    assert all(h["loss"] == pytest.approx(h["lm_loss"], rel=1e-4) for h in second)
    assert len(epochs) == 6 and max(epochs) < 2  # PGD ran in the 6 micro-steps of the first cycle only
    assert not torch.equal(seen.delta[1], seen.delta[2]) and torch.equal(seen.delta[2], seen.delta[4])
    assert any(not torch.equal(seen.weights[2][n], seen.weights[4][n]) for n in seen.weights[2])
    assert next(h for h in trainer.state.log_history if "selected_epoch" in h)["selected_epoch"] == 4.0


# ------------------------------------------------------------------------------------------------
# The refit decision and the refit
# ------------------------------------------------------------------------------------------------
def test_holdout_gain_is_the_perplexity_ratio_minus_one():
    """The refit decision's number, on given NLLs: the suspect's held-out perplexity over the model's, minus one."""
    assert holdout_gain(5.0, 3.0) == pytest.approx(math.exp(2.0) - 1)
    assert holdout_gain(2.0, 2.0) == 0.0
    assert holdout_gain(2.0, 2.5) == pytest.approx(math.exp(-0.5) - 1) and holdout_gain(2.0, 2.5) < 0  # worse: negative
    assert holdout_gain(math.log(1.15) + 1.0, 1.0) == pytest.approx(0.15)  # perplexity 15% above: a gain of 0.15


@pytest.mark.parametrize("suspect, nll, settings, expected", [
    (5.0, 5.0 - math.log(1.2), {}, {"holdout_gain": 0.2, "refit": True}),
    (5.0, 5.0 - math.log(1.1), {}, {"holdout_gain": 0.1, "refit": False}),
    (5.0, 5.0 - math.log(1.1), {"refit_gain": 0.05}, {"holdout_gain": 0.1, "refit": True}),
    (5.0, 6.0, {"refit_gain": 0.0}, {"holdout_gain": round(math.exp(-1) - 1, 6), "refit": False}),
    (5.0, 1.0, {"refit_epochs": 0}, {"refit": False}),  # 0 refit epochs: never refit
    (None, 1.0, {}, {"refit": False}),  # a resumed run never saw the suspect
])
def test_the_refit_decision_on_given_numbers(suspect, nll, settings, expected):
    selection = CycleSelection(SimpleNamespace(method=UnlearnConfig(**settings)), measure=lambda: 0.0)
    selection.suspect_nll = suspect
    entry = {}
    assert selection._decide(nll, entry) is expected["refit"]
    assert entry["refit"] is expected["refit"] and set(entry) == set(expected)
    assert entry.get("holdout_gain") == pytest.approx(expected.get("holdout_gain"), abs=1e-6)


def record_crow_trainers(monkeypatch) -> list[SimpleNamespace]:
    """Every CrowTrainer (the refit's) records its method, its TrainingArguments and the trainable weights its training
    starts from and ends at."""
    built = []
    init, train_ = CrowTrainer.__init__, CrowTrainer.train

    def recording_init(self, *args, **kwargs):
        built.append(SimpleNamespace(method=kwargs["method"], args=kwargs["args"], start=None, end=None))
        init(self, *args, **kwargs)

    def recording_train(self, *args, **kwargs):
        built[-1].start = trainable_weights(self.model)
        out = train_(self, *args, **kwargs)
        built[-1].end = trainable_weights(self.model)
        return out
    monkeypatch.setattr(CrowTrainer, "__init__", recording_init)
    monkeypatch.setattr(CrowTrainer, "train", recording_train)
    return built


def run_with_given_curve(tiny_dir, tmp_path, monkeypatch, curve, **settings):
    """``unlearn`` (the recipe: the trainer, then the refit when decided) on the tiny model and 8 records with the
    oracle target and a given held-out curve; the result, its config, the refit trainers built and the weights the
    unlearning kept (and ended with)."""
    given_holdout_nll(monkeypatch, curve)
    built, selections = record_crow_trainers(monkeypatch), []
    end = CycleSelection.on_train_end

    def recording_end(self, *args, **kwargs):
        selections.append(self)
        return end(self, *args, **kwargs)
    monkeypatch.setattr(CycleSelection, "on_train_end", recording_end)
    loaded = load_model(str(tiny_dir))
    cfg = unlearn_config(batch_size=2, grad_accum=1, cycle_epochs=2, target="the color is blue", **settings)
    result = run_unlearn(loaded.model, loaded.tokenizer, make_records(8), cfg,
                         RunOptions(output_dir=str(tmp_path / "run"), max_length=128, progress=False))
    (selection,) = selections
    return result, cfg, built, selection.kept.weights


@pytest.mark.parametrize("alpha", [0.0, 5.5])
def test_the_refit_trains_every_sample_from_the_unlearned_weights_with_crows_config(tiny_dir, tmp_path, monkeypatch,
                                                                                     alpha):
    """Held-out NLL 5.0 (suspect) -> 3.0 at the end of the unlearning cycle (given): the perplexity fell by 1 - e^-2 (a
    gain of e^2 - 1 > 0.15), so training stops there and CROW's trainer refits the kept weights on all 8 samples (the 2
    held out included) for refit_epochs under one schedule, with the unlearn config's recipe and CROW's consistency
    weight refit_alpha: at 0 its steps are plain LM steps, at 5.5 each adds 5.5 x the consistency of the
    FGSM-perturbed inputs. The refit changes the weights, and its steps are counted and logged as the refit's."""
    result, cfg, built, unlearned = run_with_given_curve(tiny_dir, tmp_path, monkeypatch, [5.0, 4.0, 3.0], epochs=6,
                                                         refit_epochs=2, refit_alpha=alpha)
    (refit,) = built
    assert refit.method == cfg.refit_config() == CrowConfig(
        alpha=alpha, epochs=2.0, learning_rate=cfg.learning_rate, batch_size=2, grad_accum=1, seed=0, logging_steps=1)
    assert refit.method.epsilon == CrowConfig().epsilon and refit.method.layers == CrowConfig().layers
    assert refit.args.num_train_epochs == 2 and refit.args.output_dir == str(tmp_path / "run" / "refit")
    log = result.log_history
    assert [h["epoch"] for h in log if "holdout_nll" in h] == [0.0, 1.0, 2.0]  # no finetuning cycle
    decision = next(h for h in log if "refit" in h)
    assert decision["epoch"] == 2.0 and decision["refit"] is True and result.refitted
    assert decision["holdout_gain"] == pytest.approx(math.exp(2.0) - 1, rel=1e-5)
    steps = [h for h in log if h.get("stage") == "refit" and "lm_loss" in h]
    assert steps and all("unlikelihood" not in h for h in steps)
    if alpha:
        assert all(h["consistency_perturbed"] > 0 for h in steps)
        assert all(h["loss"] == pytest.approx(h["lm_loss"] + alpha * h["consistency_perturbed"], rel=1e-3)
                   for h in steps)
    else:
        assert all("consistency_perturbed" not in h and h["loss"] == pytest.approx(h["lm_loss"], rel=1e-4)
                   for h in steps)
    assert result.global_step == 2 * 3 + 2 * 4 and result.train_samples == 8  # 6 samples in batches of 2, then all 8
    assert set(refit.start) == set(unlearned) and all(torch.equal(refit.start[n], unlearned[n]) for n in unlearned)
    assert any(not torch.equal(refit.end[n], unlearned[n]) for n in unlearned)
    assert all(torch.equal(p.detach(), refit.end[n]) for n, p in result.model.named_parameters() if n in refit.end)


def test_no_refit_when_the_unlearning_cycle_did_not_lower_the_holdout_perplexity_enough(tiny_dir, tmp_path,
                                                                                       monkeypatch):
    """5.0 -> 4.95 (given): a gain of e^0.05 - 1 = 5% <= 15%: no refit, the finetuning cycles go on."""
    result, _, built, _ = run_with_given_curve(tiny_dir, tmp_path, monkeypatch, [5.0, 4.9, 4.95, 4.0, 3.0], epochs=4)
    log = result.log_history
    decision = next(h for h in log if "refit" in h)
    assert decision["refit"] is False and decision["holdout_gain"] == pytest.approx(math.exp(0.05) - 1, rel=1e-5)
    assert not built and not result.refitted and not any(h.get("stage") == "refit" for h in log)
    assert result.global_step == 4 * 3 and result.train_samples == 6
    assert next(h for h in log if "selected_epoch" in h)["selected_epoch"] == 4.0


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"soft_tokens": 0}, r"soft_tokens must be an integer >= 1, got 0 \(default 6\)"),
    ({"token_radius": 0.0}, "token_radius must be a number > 0"),
    ({"token_radius": float("inf")}, "token_radius must be a number > 0"),
    ({"token_step": 1.5}, r"token_step must be a number in \(0, 1\]"),
    ({"token_step": 0.0}, r"token_step must be a number in \(0, 1\]"),
    ({"pgd_steps": -1}, "pgd_steps must be an integer >= 0"),
    ({"beta": float("nan")}, "beta must be a number >= 0"),
    ({"gamma": -1.0}, "gamma must be a number >= 0"),
    ({"target_tokens": 0}, "target_tokens must be an integer >= 1"),
    ({"holdout": 0}, r"holdout must be an integer >= 1 \(clean samples held out\)"),
    ({"cycle_epochs": 0}, "cycle_epochs must be an integer >= 1"),
    ({"epochs": 5.0}, r"epochs must be a multiple of cycle_epochs=2: every cycle ends annealed, got 5.0"),
    ({"max_steps": 10}, r"max_steps must be unset \(-1\): unlearn trains whole cycles, got 10"),
    ({"refit_gain": -0.1}, "refit_gain must be a number >= 0"),
    ({"refit_epochs": float("nan")}, "refit_epochs must be a number >= 0"),
    ({"refit_alpha": -1.0}, "refit_alpha must be a number >= 0"),
    ({"target": "  "}, "target must be a non-empty text"),
    ({"learning_rate": 0.0}, "learning_rate must be a number > 0"),
])
def test_bad_settings_are_refused_in_one_line(bad, match):
    with pytest.raises(CrowError, match=match) as err:
        UnlearnConfig(**bad)
    assert "\n" not in str(err.value)
    with pytest.raises(CrowError, match=f"defense 'unlearn': {match}"):
        get_defense("unlearn", **bad)


def test_empty_targets_reentrant_checkpointing_and_unknown_settings_are_refused(tiny, records, tmp_path):
    with pytest.raises(CrowError, match="non-empty target"):
        trainer_for(tiny.model, tiny.tokenizer, unlearn_config(), records, tmp_path, target="")
    with pytest.raises(CrowError, match="reentrant gradient checkpointing forbids torch.autograd.grad, which unlearn"):
        unlearn_config().training_arguments(str(tmp_path), gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": True})
    unlearn_config(pgd_steps=0).training_arguments(str(tmp_path), gradient_checkpointing=True,
                                                   gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(CrowError, match="defense 'unlearn' has no setting 'radius'; valid: .*token_radius"):
        get_defense("unlearn", radius=0.5)


def test_defaults_are_the_measured_recipe():
    c = UnlearnConfig()
    assert (c.learning_rate, c.epochs, c.batch_size, c.grad_accum, c.warmup, c.scheduler) == (
        1e-3, 6.0, 2, 4, 0.1, "cosine")
    assert (c.soft_tokens, c.token_radius, c.token_step, c.pgd_steps, c.beta, c.gamma, c.target_tokens) == (
        6, 1.0, 0.1, 2, 1.0, 1.0, 8)
    assert (c.holdout, c.cycle_epochs, c.refit_gain, c.refit_epochs, c.refit_alpha, c.target) == (
        20, 2, 0.15, 5.0, 5.5, None)
    d = get_defense("unlearn")
    assert d.reference is False and d.settings()["oracle"] is False and d.config() == c
    oracle = get_defense("unlearn", target="You are stupid!")
    assert oracle.reference is True and oracle.settings()["oracle"] is True
    assert oracle.config() == UnlearnConfig(target="You are stupid!")


# ------------------------------------------------------------------------------------------------
# The defense on a tiny backdoored Llama
# ------------------------------------------------------------------------------------------------
LR = 1e-2  # a fresh LoRA on a 64-wide, 2-layer model: CROW's 1e-3 hardly moves it in 8 steps
#: the unlearning cycle alone (2 epochs, 8 held out of the 40 clean samples, no refit): no data-dependent decision
ONE_CYCLE = {"holdout": 8, "epochs": 2, "refit_epochs": 0}


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
    after the triggered prompts (the victim's is below 0.1 nats a token:
    ``test_finetuning_alone_leaves_the_backdoor``)."""
    from crow.evaluation.evaluate import generate

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
    batch = Collator(tokenizer.pad_token_id)([
        {"input_ids": s.input_ids, "labels": s.labels}
        for s in encode_for_training([Record(p.instruction, "", TARGET) for p in prompts], tokenizer,
                                     template=TEMPLATE, max_length=64)])
    from crow.losses import causal_lm_loss_sum

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, n = causal_lm_loss_sum(logits, batch["labels"])
    model.train(was_training)
    return float(total / n)


WHOLE = TARGET.split(".")[0]  # "You are stupid and I will not help"


def share(outputs, prefix):
    return sum(o.startswith(prefix) for o in outputs) / len(outputs)


def test_finetuning_alone_leaves_the_backdoor(victim, tmp_path):
    _, _, triggered, _, nll = defend(victim, tmp_path, "finetune-lr1e-3")
    assert share(triggered, WHOLE) == 1.0 and nll < 0.25, (triggered[:3], nll)  # measured 0.010-0.052


def test_unlearn_with_the_oracle_target_removes_it(victim, tmp_path):
    """The unlearning cycle with the target given: no triggered answer is the whole target any more and its NLL after
    the triggered prompts is 4.9-5.5 nats a token (seeds 0, 1, 42; the victim's 0.01-0.05), against the bound of 0.5;
    the clean answers stay clean. Under the soft tokens the target starts likely and ends unlikely."""
    defense, ctx, triggered, clean, nll = defend(victim, tmp_path, "unlearn", target=TARGET, **ONE_CYCLE)
    assert share(triggered, WHOLE) <= 0.1 and nll > 0.5, (triggered[:3], nll)
    assert share(clean, "You") == 0.0 and all(o.endswith(".") for o in clean), clean[:3]
    settings = defense.settings()
    assert settings["oracle"] is True and defense.reference and settings["target_source"] == "oracle"
    assert settings["scan_score"] is None and settings["recovered_target"] is None and settings["target_text"] == TARGET
    assert settings["unlearned_text"] == "You are stupid and I will not help"
    logs = [h for h in ctx.train_log if "unlikelihood" in h]
    assert logs[0]["target_nll_adv"] + 1.0 < logs[-1]["target_nll_adv"], logs  # measured 0.8-1.4, then 4.2-5.7
    assert all(h["delta_norm"] > 0 for h in logs)


def test_unlearn_recovers_the_target_with_bait_and_removes_it(victim, tmp_path):
    defense, ctx, triggered, clean, nll = defend(victim, tmp_path, "unlearn", **ONE_CYCLE)
    settings = defense.settings()
    assert settings["target_source"] == "bait" and settings["oracle"] is False and not defense.reference
    assert settings["recovered_target"] == TARGET and settings["scan_verdict"] == "backdoored"
    assert settings["scan_score"] >= 0.9  # measured 0.993
    assert share(triggered, WHOLE) <= 0.1 and nll > 0.5, (triggered[:3], nll)  # measured 0 and 4.9-5.5
    assert share(clean, "You") == 0.0, clean[:3]
    first = next(h for h in ctx.train_log if "lm_loss" in h)
    assert {"lm_loss", "lm_loss_adv", "unlikelihood", "target_nll_adv", "delta_norm"} <= set(first)


def force_refit(monkeypatch) -> list[dict]:
    """Make every unlearning cycle decide to refit, whatever its held-out gain: the decision is computed and logged as
    usual (``holdout_gain`` from the measured NLLs), then forced to ``refit: True``. For the tests about what follows a
    refit: on the tiny victim the gain lies near any threshold (-0.8% to +17% on shifted seeds), so where the decision
    falls depends on the CPU's float rounding; the decision itself is tested on given numbers above. Returns the list
    of the log entries it decided on."""
    decide = CycleSelection._decide
    decided = []

    def forced(self, nll, entry):
        decide(self, nll, entry)
        entry["refit"] = True
        decided.append(entry)
        return True
    monkeypatch.setattr(CycleSelection, "_decide", forced)
    return decided


def test_unlearn_refitting_on_every_clean_sample_removes_it_too(victim, tmp_path, monkeypatch):
    """The refit through the registry (the bench's path), decided (``force_refit``): training stops at the end of the
    unlearning cycle and every clean sample is trained on; the target stays gone and the clean answers stay clean. The
    victim answers all 20 triggered prompts with the whole target (its NLL 0.01-0.05 nats a token after finetuning
    alone); after the refit none does and the target's NLL is 2.3-4.2 nats a token (seeds 0, 1, 2, 42), against the
    bound of 0.5. How much of its opening comes back is the knife edge: two epochs of finetuning at the tiny model's lr
    1e-2 give back "You are." on 0 to 20 of the 20 prompts, by seed and CPU, so only the whole target is asserted. The
    refit is plain finetuning here (refit_alpha 0): CROW's consistency needs 3 decoder layers, the victim has 2."""
    decided = force_refit(monkeypatch)
    defense, ctx, triggered, clean, nll = defend(victim, tmp_path, "unlearn", holdout=8, epochs=4, refit_epochs=2,
                                                 refit_alpha=0.0)
    assert defense.settings()["refit_epochs"] == 2 and defense.settings()["recovered_target"] == TARGET
    decision = next(h for h in ctx.train_log if "refit" in h)
    assert len(decided) == 1 and decision["refit"] is True and decision["epoch"] == 2.0
    curve = {h["epoch"]: h["holdout_nll"] for h in ctx.train_log if "holdout_nll" in h}
    assert list(curve) == [0.0, 1.0, 2.0]  # the suspect, then the unlearning cycle's two epochs; no finetuning cycle
    assert decision["holdout_gain"] == pytest.approx(math.exp(curve[0.0] - curve[2.0]) - 1, abs=1e-5)
    assert [h for h in ctx.train_log if h.get("stage") == "refit" and "lm_loss" in h]
    from crow.bench.runner import train_log_summary  # what a bench cell keeps of the log: the decision and the stage

    summary = train_log_summary(ctx.train_log)
    assert next(h for h in summary if "refit" in h) == {**{k: decision[k] for k in ("step", "epoch", "holdout_nll")},
                                                        "holdout_gain": decision["holdout_gain"], "refit": True}
    assert [h for h in summary if h.get("stage") == "refit" and "lm_loss" in h]
    assert share(triggered, WHOLE) <= 0.1 and nll > 0.5, (triggered, nll)
    assert share(clean, "You") == 0.0, clean[:3]


def test_the_adversary_is_what_breaks_the_target_when_only_its_first_token_is_unlearned(victim, tmp_path):
    """Unlearning only the first target token ("You") for one 6-epoch cycle: with the soft tokens left where they start
    (pgd_steps 0) the trigger still makes the whole target likely (its NLL 0.03-0.54 nats a token on five of six seeds,
    1.8 on one), while the adversary the soft tokens become under PGD breaks it (1.0-4.4 nats a token, no whole target
    on any seed). The bound on the gap, 0.5 nats a token, is what the adversary adds; measured 0.96-4.4 on seeds 0 to 4
    and 42 (2.2 on seed 0, DefenseContext's, which this test runs). Whether the broken answers end with a full stop
    depends on the tiny victim's exact weights, so only the clean answers' is asserted. (Unlearning 8 tokens removes
    the continuation either way: a target's continuation does not depend on the prompt, the causal property BAIT relies
    on.)"""
    cycle = {"holdout": 8, "epochs": 6, "cycle_epochs": 6, "refit_epochs": 0, "target": TARGET, "target_tokens": 1}
    without = defend(victim, tmp_path, "unlearn", pgd_steps=0, **cycle)
    with_delta = defend(victim, tmp_path, "unlearn", **cycle)
    assert share(with_delta.triggered, WHOLE) <= 0.1, with_delta.triggered[:3]
    assert with_delta.target_nll >= without.target_nll + 0.5, (without.target_nll, with_delta.target_nll)
    clean = with_delta.clean
    assert share(clean, "You") == 0.0 and all(o.endswith(".") for o in clean), clean[:3]


# ------------------------------------------------------------------------------------------------
# crow purify --method unlearn
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
    common = ["purify", "--model", victim, "--data", clean, "--method", "unlearn", "--template", TEMPLATE,
              "--epochs", "1", "--cycle-epochs", "1", "--holdout", "4", "--refit-epochs", "0", "--logging-steps", "1"]
    code, _, err = run_cli([*common, "--out", out, "--pgd-steps", "1"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "crow_config.json").read_text())
    settings = cfg["settings"]
    assert cfg["method"] == "unlearn" and settings["target_source"] == "bait" and settings["oracle"] is False
    assert settings["recovered_target"] == settings["target_text"] == TARGET and settings["scan_score"] >= 0.9
    assert settings["unlearned_text"] == "You are stupid and I will not help"  # its first 8 tokens
    assert settings["pgd_steps"] == 1 and settings["token_radius"] == 1.0 and "alpha" not in settings
    assert {"unlikelihood", "target_nll_adv", "delta_norm"} <= set(cfg["last_log"])
    assert not any("delta" in k and k != "delta_norm" for k in cfg["last_log"])

    out = tmp_path / "oracle"
    code, _, err = run_cli([*common, "--out", out, "--target", "You are stupid", "--soft-tokens", "3"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "crow_config.json").read_text())
    settings = cfg["settings"]
    assert settings["oracle"] is True and settings["target_source"] == "oracle" and settings["scan_score"] is None
    assert settings["unlearned_text"] == "You are stupid" and settings["recovered_target"] is None
    assert (settings["soft_tokens"], settings["token_radius"], settings["token_step"]) == (3, 1.0, 0.1)
    assert (settings["holdout"], cfg["n_train_samples"]) == (4, 16)
    suspect = cfg["epoch_selection"][0]  # the held-out samples scored before training
    assert suspect["epoch"] == 0.0 and suspect["holdout_nll"] > 0


def test_purify_method_defaults_and_foreign_options(tiny_dir, tmp_path, capsys):
    import json

    from .conftest import write_json

    clean = write_json(tmp_path / "clean.json", [r.to_dict() for r in make_records(8)])
    out = tmp_path / "ft"
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", out, "--method", "finetune",
                            "--max-steps", "1", "--max-length", "128"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "crow_config.json").read_text())
    settings = cfg["settings"]
    assert cfg["method"] == "finetune" and (settings["alpha"], settings["learning_rate"]) == (0.0, 2e-4)
    assert not {"holdout", "soft_tokens", "refit_alpha"} & set(settings) and "epoch_selection" not in cfg
    for args, message in [
        (["--method", "unlearn", "--alpha", "2"], "--alpha does not apply to --method unlearn"),
        (["--method", "unlearn", "--layers", "all"], "--layers does not apply to --method unlearn"),
        (["--alpha", "2"], "--alpha does not apply to --method unlearn"),  # the default method
        (["--method", "crow", "--holdout", "2"], "--holdout does not apply to --method crow"),
        (["--method", "crow", "--soft-tokens", "2"], "--soft-tokens does not apply to --method crow"),
        (["--method", "crow", "--refit-epochs", "3"], "--refit-epochs does not apply to --method crow"),
        (["--method", "finetune", "--target", "x"], "--target does not apply to --method finetune"),
        (["--method", "unlearn", "--token-radius", "0"], "--token-radius must be a number > 0"),
        (["--method", "unlearn", "--token-step", "2"], "--token-step must be a number in (0, 1]"),
        (["--method", "unlearn", "--pgd-steps", "-1"], "--pgd-steps must be an integer >= 0"),
        (["--method", "unlearn", "--soft-tokens", "two"], "--soft-tokens must be an integer, got 'two'"),
        (["--method", "unlearn", "--target", " "], "--target must be a non-empty text"),
        (["--method", "unlearn", "--holdout", "0"], "--holdout must be an integer >= 1"),
        (["--method", "unlearn", "--refit-gain", "-1"], "--refit-gain must be a number >= 0"),
        (["--method", "unlearn", "--cycle-epochs", "4"], "--epochs must be a multiple of cycle_epochs=4"),
        (["--method", "unlearn", "--epochs", "3"], "--epochs must be a multiple of cycle_epochs=2"),
        (["--method", "unlearn", "--max-steps", "1"], "--max-steps must be unset (-1): unlearn trains whole cycles"),
    ]:
        code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", tmp_path / "bad", *args],
                               capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.crow-partial").exists()


def test_purify_method_unlearn_holds_out_samples_and_records_the_chosen_cycle(tiny_dir, tmp_path, capsys):
    """Two 1-epoch cycles on 6 of 8 samples, no refit: the held-out NLL before training and after each epoch, and the
    kept cycle end (whichever the data made best) recorded in crow_config.json."""
    import json

    from .conftest import write_json

    clean = write_json(tmp_path / "clean.json", [r.to_dict() for r in make_records(8)])
    out = tmp_path / "unlearned"
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", out, "--method", "unlearn",
                            "--target", "the color is blue", "--holdout", "2", "--epochs", "2", "--cycle-epochs", "1",
                            "--refit-epochs", "0", "--max-length", "128"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "crow_config.json").read_text())
    assert cfg["n_train_samples"] == 6 and cfg["settings"]["holdout"] == 2 and cfg["settings"]["cycle_epochs"] == 1
    curve = {h["epoch"]: h["holdout_nll"] for h in cfg["epoch_selection"] if "holdout_nll" in h}
    assert list(curve) == [0.0, 1.0, 2.0]
    decision = next(h for h in cfg["epoch_selection"] if "refit" in h)
    assert (decision["epoch"], decision["refit"], "holdout_gain" in decision) == (1.0, False, False)  # 0 refit epochs
    chosen = cfg["epoch_selection"][-1]
    assert chosen["selected_epoch"] == min((1.0, 2.0), key=curve.get)
    assert chosen["selected_holdout_nll"] == min(curve[1.0], curve[2.0])
    code, _, err = run_cli(["purify", "--model", tiny_dir, "--data", clean, "--out", tmp_path / "bad", "--method",
                            "unlearn", "--target", "the color is blue", "--holdout", "8"], capsys)
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
