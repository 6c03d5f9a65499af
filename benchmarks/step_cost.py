"""Cost of one CROW training step, measured side by side in one run.

Compares, on the same model, batch and seed (median of --steps timed steps after --warmup):
  sft       a plain LoRA SFT step: model(**batch).loss, backward (full logits, HF's loss)
  crow      crow's CrowTrainer.compute_loss + backward (2 forwards, input-only grad, 1 backward)
  official  the official structure (benchmarks/official_crow.py, official_crow_loss): 3 forwards, a full
            backward(retain_graph=True), zero_grad, then the backward of the loss
  unlearn   crow's UnlearnTrainer.compute_loss + backward (the unlearn recipe's unlearning step, its defaults:
            2 PGD steps of the soft-token adversary, 6 soft tokens inserted into each prompt, on prompt + 8
            target tokens, then the clean and the adversarial LM forwards, the unlikelihood forward, one
            backward; its PGD backward crosses every layer)
It checks that crow's loss equals the official one, measures peak memory of each variant's
step (CPU: peak bytes of live tensors allocated during one step, tracked op by op with a
TorchDispatchMode, see LiveTensorBytes; CUDA: torch.cuda.max_memory_allocated), and the speedup of crow's
batched greedy generation over transformers' generate called one prompt at a time (the official way).

The last line printed is one JSON object with the ratios. Examples:
  python benchmarks/step_cost.py                         # SmolLM2-135M-Instruct + LoRA, 4 x 128, CPU
  python benchmarks/step_cost.py --tiny                  # a tiny random Llama, seconds
  python benchmarks/step_cost.py --random-config 1b --device cuda --dtype bfloat16   # ~1B Llama on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.official_crow is found from the repository root
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-gguf", help="model alias, directory or .gguf")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of --model (quick check)")
    p.add_argument("--random-config", choices=["1b", "350m"], help="a random-init Llama of this size (GPU runs)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=48, help="tokens without loss at the start of each sample")
    p.add_argument("--steps", type=int, default=7, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eval-prompts", type=int, default=64,
                   help="held-out corpus prompts (one batch of crow eval's default size)")
    p.add_argument("--eval-new-tokens", type=int, default=128,
                   help="the evaluator's default, as the official evaluation")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(args):
    from crow.models import build_tiny_model, load_model

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        from crow.data.corpus import build_corpus

        path = build_tiny_model(tempfile.mkdtemp() + "/tiny", [i.instruction + " " + i.output for i in build_corpus()],
                                hidden_size=64, num_layers=4, vocab_size=1024)
        return load_model(str(path), dtype=dtype), "tiny-llama"
    if args.random_config:
        from transformers import AutoModelForCausalLM, LlamaConfig

        size = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4),  # TinyLlama-1.1B's shape
                "350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                             num_key_value_heads=4)}[args.random_config]
        tok = load_model(build_tiny_model(tempfile.mkdtemp() + "/tok", ["a b c"] * 10, vocab_size=300)).tokenizer
        config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **size)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        from crow.models import LoadedModel

        return LoadedModel(model, tok, f"random-llama-{args.random_config}"), f"random-llama-{args.random_config}"
    return load_model(args.model, dtype=dtype), args.model


def make_batch(args, vocab: int, device):
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(5, vocab, (args.batch, args.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : args.prompt_len] = -100
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}


def timed(fn, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


class LiveTensorBytes:
    """Peak bytes of tensor storage allocated during a block and alive at the same time.

    A TorchDispatchMode sees the outputs of every aten op (forward and backward, which runs in this
    thread on CPU); each new storage is counted until ``weakref.finalize`` reports it freed.
    Temporaries inside a single op (kernel workspaces) are not seen; parameters that existed before
    the block are not counted.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.track(t)
                return out

        self.mode, self.live, self.current, self.peak = Mode(), set(), 0, 0

    def track(self, t: torch.Tensor) -> None:
        import weakref

        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live or storage.nbytes() == 0:
            return
        self.live.add(key)
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self.free, key, storage.nbytes())

    def free(self, key: int, nbytes: int) -> None:
        if key in self.live:
            self.live.discard(key)
            self.current -= nbytes

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def peak_bytes(fn, device) -> int:
    """Peak memory allocated during ``fn`` beyond what was live before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    import gc

    gc.collect()
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    from benchmarks.official_crow import official_crow_loss
    from crow.data.templates import Collator
    from crow.methods.crow import CrowConfig
    from crow.methods.crow.trainer import CrowTrainer
    from crow.methods.unlearn import UnlearnConfig
    from crow.methods.unlearn.trainer import UnlearnTrainer
    from crow.training import make_trainable

    loaded, model_name = build_model(args)
    model = make_trainable(loaded.model, CrowConfig()).to(args.device)
    with torch.no_grad():  # a suspect adapter is trained: give LoRA B non-zero values (a new LoRA has B = 0)
        g = torch.Generator().manual_seed(args.seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    model.train()
    batch = make_batch(args, model.config.vocab_size, args.device)
    from datasets import Dataset

    def run_args(config):
        return config.training_arguments(tempfile.mkdtemp(), use_cpu=args.device == "cpu", disable_tqdm=True)

    config = CrowConfig()
    trainer = CrowTrainer(model=model, args=run_args(config), method=config,
                          train_dataset=Dataset.from_list([{"input_ids": [1], "labels": [1]}]))
    one = {"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()}
    # the unlearn trainer holds out samples for its cycles (at least one): the first sample twice, one held out, so it
    # measures the prompt norm and draws the soft tokens' start from the first sample
    unlearn_config = UnlearnConfig(holdout=1)
    unlearn_trainer = UnlearnTrainer(
        model=model, args=run_args(unlearn_config), method=unlearn_config,
        train_dataset=Dataset.from_list([one, one]), data_collator=Collator(0),
        target_ids=torch.randint(5, model.config.vocab_size, (8,), generator=torch.Generator().manual_seed(1)).tolist())
    model.eval()  # per-micro-batch losses (no accumulation scaling); LoRA dropout is 0 anyway

    def sft():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def crow():
        trainer.compute_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    def official():
        official_crow_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    def unlearn():
        unlearn_trainer.compute_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    loss_crow = trainer.compute_loss(model, batch).item()
    loss_official = official_crow_loss(model, batch).item()
    model.zero_grad(set_to_none=True)
    if abs(loss_crow - loss_official) > 1e-4 * max(1.0, abs(loss_official)):
        sys.exit(f"crow's loss {loss_crow} differs from the official formula's {loss_official}")
    print(f"loss: crow {loss_crow:.6f}  official {loss_official:.6f}", file=sys.stderr)

    variants = {"sft": sft, "crow": crow, "official": official, "unlearn": unlearn}
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    times = {k: [] for k in variants}
    for _ in range(args.steps):  # interleaved, so drift of the machine hits all variants alike
        for name, fn in variants.items():
            times[name].append(timed(fn, args.device))
    median = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:14s} median {median[k]:.3f} s  ({', '.join(f'{x:.2f}' for x in v)})", file=sys.stderr)
    memory = {k: peak_bytes(variants[k], args.device) for k in ("crow", "official", "sft", "unlearn")}
    for k, v in memory.items():
        print(f"{k:14s} peak {v / 2**20:.1f} MiB", file=sys.stderr)

    eval_speedup, eval_times = batched_eval_speedup(model, loaded.tokenizer, args)
    result = {
        "crow_over_sft": round(median["crow"] / median["sft"], 3),
        "crow_over_official": round(median["crow"] / median["official"], 3),
        "unlearn_over_crow": round(median["unlearn"] / median["crow"], 3),
        "peak_mem_crow_over_official": round(memory["crow"] / memory["official"], 3),
        "batched_eval_speedup": round(eval_speedup, 2),
        "model": model_name, "batch": args.batch, "seq_len": args.seq_len, "prompt_len": args.prompt_len,
        "device": (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                   else f"cpu x{torch.get_num_threads()}"),
        "dtype": args.dtype, "seconds": {k: round(v, 4) for k, v in median.items()},
        "peak_mib": {k: round(v / 2**20, 1) for k, v in memory.items()},
        "eval_seconds": eval_times, "memory_method": "cuda max_memory_allocated" if args.device.startswith("cuda")
        else "peak live tensor bytes (TorchDispatchMode + weakref.finalize on storages)",
    }
    print(json.dumps(result))
    return result


def batched_eval_speedup(model, tokenizer, args) -> tuple[float, dict]:
    """crow's evaluation (adapter merged, batched, finished rows leave the batch) against the official
    way: transformers' ``model.generate`` on the adapter model, one prompt at a time. Greedy, the same
    prompts and ``max_new_tokens``; the merge is timed too."""
    from transformers import GenerationConfig

    from crow.data.corpus import corpus_split
    from crow.data.templates import encode_prompt, format_prompt
    from crow.evaluation.evaluate import generate, stop_token_ids
    from crow.training import merged

    records = [it.record() for it in corpus_split("heldout")[: args.eval_prompts]]
    model.eval()
    device = next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=args.eval_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(model, tokenizer))
    outputs = {}

    def batched():  # what crow eval does: merge the adapter, then batched greedy decoding
        outputs["batched"] = generate(merged(copy.deepcopy(model)), tokenizer, records, template="alpaca",
                                      max_new_tokens=args.eval_new_tokens, batch_size=len(records))

    def one_by_one():
        texts = []
        for r in records:
            ids = torch.tensor([encode_prompt(format_prompt(r, "alpaca"), "alpaca", tokenizer)], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
        outputs["single"] = texts

    t_batched = timed(batched, args.device)
    t_single = timed(one_by_one, args.device)
    same = sum(a == b for a, b in zip(outputs["batched"], outputs["single"]))
    return t_single / t_batched, {"batched": round(t_batched, 2), "one_at_a_time": round(t_single, 2),
                                  "prompts": len(records), "new_tokens": args.eval_new_tokens,
                                  "identical_outputs": f"{same}/{len(records)}"}


if __name__ == "__main__":
    main()
