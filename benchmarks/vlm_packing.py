"""Benchmark: packed (padding-free) against padded vision-chat training, in one run on one machine.

    python benchmarks/vlm_packing.py                       # built-in Q&A mix: tiny-256 LM, built-in data
    python benchmarks/vlm_packing.py --mix=llava           # lengths spread as LLaVA-665K's: 45-750 tokens
    python benchmarks/vlm_packing.py --samples=200 --lm_size=tiny   # smoke
    python benchmarks/vlm_packing.py --gpu                 # CUDA, bf16 (skipped, saying so, without CUDA)
    python benchmarks/vlm_packing.py --gpu --mix=llava --lm_size=qwen2-0.5b --vision=open_clip:ViT-B-16 \
        --image_size=0 --loss=targets --batch_tokens=8192 --samples=900 --lr=1e-4 --warmup=3  # ~0.5B LM: MFU

Three sides train copies of the same model from the same initial weights on the same samples in the same
order and groups: a step takes the next group of samples (about `--batch_tokens` real tokens).
- varlen: the group packed into one row, position ids restarting per sample, no attention mask
  (mm.vlm.model.pack_batch, what the recipe does), attention "mm_varlen" (mm.vlm.attention): causal SDPA on
  each sample's slice, no T x T mask.
- dense: the same packed row with transformers' "sdpa", which builds a block-diagonal [T, T] mask from the
  position ids (what the recipe did before mm_varlen); --row_tokens=N splits it into rows of N (pack_rows).
- padded: the group right-padded to its longest sample with an attention mask (mm.vlm.model.pad_batch, what a
  collator with dynamic padding does, TRL's default), "sdpa".
Steps are interleaved (step i of every side, in a rotating order, before step i+1), so a change in the
machine's load falls on all sides alike. Samples are decoded once beforehand (tokenised, images
transformed), so only training steps are timed: forward, loss, backward, clip, optimizer step. Reported:
real (non-pad) tokens per second for each, the ratios to padded, and the held-out loss after the same tokens.
On CUDA (or with --flops) the training FLOPs of the timed steps are counted once more afterwards with torch's
FlopCounterMode on the varlen side (forward and backward, real tokens only, attention per sample), which gives
useful TFLOP/s for every side (FLOPs per real token x its real tokens/s) and MFU against --peak_tflops.

--lm_size=qwen2-0.5b: a Qwen2 LM of Qwen2-0.5B's dims (896 wide, 24 layers, 14 heads, 2 KV heads, MLP 4864,
151,936-token vocabulary, tied; 494M parameters), randomly initialised, with the tiny tokenizer (its ids fall
inside the vocabulary): the speed of a ~0.5B LM without its weights, which cannot be downloaded here.
--loss=targets runs the output layer only at the target positions, as the recipe does (mm.vlm.model.batch_loss);
the default, full, runs it at every position, as the recorded CPU figures did.

Mixes. qa: the built-in multi-turn Q&A conversations as they are (similar lengths, little padding to save).
llava: the same conversations stretched or cut to lengths drawn from a long-tailed distribution like
LLaVA-665K's (single-answer VQA next to long multi-turn chats): log-normal with a median of 150 tokens and
sigma 0.8, clipped to 45-750 (a shape chosen by hand to that range, not fitted to the real file). A sample keeps
its image and first turn and then takes whole Q&A turns, from its own conversation and then from others (text
only), until it reaches its drawn length; it is written as chat JSONL (<out>/llava_mix.jsonl) and decoded like
the built-in data.

TRL's SFTTrainer with a Hugging Face LlavaForConditionalGeneration is benchmarks/vlm_vs_trl.py: LLaVA's HF class
needs a CLIP/SigLIP-style vision config, so that comparison uses a CLIP ViT tower on both sides, not this ResNet.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.clip_vs_open_clip import machine, mfu  # noqa: E402
from mm.checkpoint import atomic_write  # noqa: E402
from mm.shards import read_samples  # noqa: E402
from mm.vlm.data import vlm_decoder  # noqa: E402
from mm.vlm.model import batch_loss, build_vlm, lm_loss, pack_batch, pack_rows, pad_batch  # noqa: E402

SIDES = ("varlen", "dense", "padded")  # see the module docstring
# Random-init LMs of published dims (transformers config kwargs), for speed without weights (see the docstring).
BENCH_LMS = {"qwen2-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                            "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 4096}}
LLAVA_MEDIAN, LLAVA_SIGMA, LLAVA_RANGE = 150, 0.8, (45, 750)  # the llava mix's length distribution, in tokens


# ---------------------------------------------------------------- data
def decode_all(path: str, decode, limit: int) -> list[dict]:
    counts = {"bad_shards": 0}
    out = []
    for raw in read_samples([path], counts):
        out.append(decode(raw))
        if len(out) >= limit:
            break
    return out


def turn_pairs(messages: list[dict]) -> list[tuple[object, str]]:
    """A conversation's (user content, assistant answer) pairs, in order."""
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2)]


def text_of(content) -> str:
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def template_tokens(tokenizer) -> int:
    """Tokens the chat template adds around one question and its answer."""
    turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 2


def write_llava_mix(data: Path, out: Path, tokenizer, image_tokens: int, n: int, seed: int = 0) -> Path:
    """<out>/llava_mix.jsonl: n conversations of the built-in data stretched or cut to lengths drawn from
    log-normal(LLAVA_MEDIAN, LLAVA_SIGMA) clipped to LLAVA_RANGE (see the module docstring). Image paths are
    made absolute, so the file reads from anywhere. Lengths are estimated per turn here; decoding measures them."""
    lines = [json.loads(line) for line in open(data / "train.jsonl")]
    pool = [pair for line in lines for pair in turn_pairs(line["messages"])[1:]]  # later turns: text only
    rng = random.Random(seed)
    overhead = template_tokens(tokenizer)

    def cost(pair) -> int:
        return len(tokenizer(text_of(pair[0]))["input_ids"]) + len(tokenizer(pair[1])["input_ids"]) + overhead

    rows = []
    for k in range(n):
        target = min(max(rng.lognormvariate(math.log(LLAVA_MEDIAN), LLAVA_SIGMA), LLAVA_RANGE[0]), LLAVA_RANGE[1])
        own = turn_pairs(lines[k % len(lines)]["messages"])
        first, rest = own[0], own[1:]
        turns, used = [first], image_tokens + cost(first)
        for pair in itertools.chain(rest, (rng.choice(pool) for _ in itertools.count())):  # ends: cost > 0
            if used + cost(pair) > target:
                break
            turns.append(pair)
            used += cost(pair)
        messages = []
        for content, answer in turns:
            if not isinstance(content, str):  # the first turn: its image, by absolute path
                content = [{**p, "image_url": {"url": str((data / p["image_url"]["url"]).resolve())}}
                           if p["type"] == "image_url" else p for p in content]
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        rows.append(json.dumps({"messages": messages}))
    path = out / "llava_mix.jsonl"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))
    return path


def groups_of(samples: list[dict], batch_tokens: int) -> list[list[dict]]:
    """Consecutive samples, about batch_tokens real tokens a group."""
    groups, cur, used = [], [], 0
    for s in samples:
        if cur and used + len(s["input_ids"]) > batch_tokens:
            groups.append(cur)
            cur, used = [], 0
        cur.append(s)
        used += len(s["input_ids"])
    return groups + ([cur] if cur else [])


def length_stats(samples: list[dict]) -> dict:
    lengths = sorted(len(s["input_ids"]) for s in samples)
    return {"min": lengths[0], "median": statistics.median(lengths), "mean": round(statistics.mean(lengths), 1),
            "p90": lengths[int(0.9 * (len(lengths) - 1))], "max": lengths[-1]}


def bench_lm(name: str, tokenizer):
    """A randomly initialised causal LM of BENCH_LMS[name]'s dims that takes `tokenizer`'s ids."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = dict(BENCH_LMS[name])
    if len(tokenizer) > dims["vocab_size"]:
        raise ValueError(f"lm_size={name}: the tokenizer has {len(tokenizer)} tokens, the LM's vocabulary {dims['vocab_size']}")
    config = AutoConfig.for_model(dims.pop("model_type"), **dims, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(config, attn_implementation="mm_varlen")


# ---------------------------------------------------------------- sides
def batch_of(group: list[dict], side: str, pad_id: int, device, row_tokens: int = 0) -> dict:
    if side == "padded":
        batch = pad_batch(group, pad_id)
    elif side == "dense" and row_tokens:
        batch = pack_rows(group, row_tokens, pad_id)
    else:
        batch = pack_batch(group)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_side(model, attn: str, lr: float) -> dict:
    """A copy of the model with the LM's attention set, its optimizer, and its tallies."""
    model = copy.deepcopy(model)
    model.lm.set_attn_implementation(attn)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    return {"model": model, "opt": opt, "attn": attn, "seconds": 0.0, "real": 0, "computed": 0}


def loss_of(model, batch: dict, autocast, targets_only: bool) -> torch.Tensor:
    """Mean target-token loss; targets_only: the output layer at target positions only (batch_loss)."""
    with autocast():
        if targets_only:
            loss_sum, n = batch_loss(model, batch)
        else:
            logits = model(batch["input_ids"], batch["pixel_values"], position_ids=batch.get("position_ids"),
                           attention_mask=batch.get("attention_mask"))[0]
            loss_sum, n = lm_loss(logits.float(), batch["labels"])
    return loss_sum / n.clamp(min=1)


def train_step(side: dict, batch: dict, autocast, device, targets_only: bool = False) -> float:
    """One optimizer step; returns its seconds (synchronised on CUDA)."""
    model, opt = side["model"], side["opt"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    loss_of(model, batch, autocast, targets_only).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def train_interleaved(sides: dict, groups, pad_id: int, device, autocast, row_tokens: int, warmup: int = 2,
                      targets_only: bool = False) -> None:
    """Step i of every side (in an order rotating with i) before step i+1; the first `warmup` steps untimed."""
    names, start = list(sides), time.perf_counter()
    for i, group in enumerate(groups):
        if i and i % 20 == 0:
            print(f"  step {i}/{len(groups)}, {time.perf_counter() - start:.0f} s", flush=True)
        for name in names[i % len(names):] + names[:i % len(names)]:
            batch = batch_of(group, name, pad_id, device, row_tokens)
            seconds = train_step(sides[name], batch, autocast, device, targets_only)
            if i >= warmup:
                sides[name]["seconds"] += seconds
                sides[name]["real"] += sum(len(s["input_ids"]) for s in group)
                sides[name]["computed"] += batch["input_ids"].numel()


def _sdpa_without_gqa(query, key, value, *args, enable_gqa: bool = False, **kwargs):
    """SDPA with grouped key/value heads repeated up front: the same result and the same attention FLOPs, in a
    form FlopCounterMode can count (torch 2.11's SDPA formula, on the GPU machine, asserts as many key as query
    heads; 2.14's accepts grouped ones)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    return _SDPA(query, key, value, *args, **kwargs)


_SDPA = torch.nn.functional.scaled_dot_product_attention


def count_flops(model, groups, device, autocast, targets_only: bool) -> int:
    """Training FLOPs (forward + backward, torch's FlopCounterMode) of these groups packed one sample after
    another with per-sample attention: the useful work, no padding, no cross-sample attention."""
    from unittest import mock

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # FlopCounterMode has no formula for the CPU flash kernel (it would count 0): on CPU the math kernel, whose
    # matmuls count the same as the formula for the CUDA kernels (which mm_varlen picks inside this)
    kernels = (lambda: sdpa_kernel(SDPBackend.MATH)) if device.type == "cpu" else contextlib.nullcontext
    total = 0
    for group in groups:
        batch = batch_of(group, "varlen", 0, device)
        with FlopCounterMode(display=False) as counter, \
                mock.patch("torch.nn.functional.scaled_dot_product_attention", _sdpa_without_gqa), \
                kernels():
            loss_of(model, batch, autocast, targets_only).backward()
        model.zero_grad(set_to_none=True)
        total += counter.get_total_flops()
    return total


def profile(side: dict, groups, device, autocast, targets_only: bool) -> None:
    """Print torch.profiler's table of the ops that took the most time over these training steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for group in groups:
            train_step(side, batch_of(group, "varlen", 0, device), autocast, device, targets_only)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)


@torch.no_grad()
def heldout(model, samples, pad_id, device, autocast) -> float:
    model.eval()
    total = count = 0.0
    for group in groups_of(samples, 2048):
        batch = batch_of(group, "varlen", pad_id, device)
        with autocast():
            logits = model(batch["input_ids"], batch["pixel_values"], position_ids=batch["position_ids"])[0]
        s, n = lm_loss(logits.float(), batch["labels"])
        total, count = total + float(s), count + int(n)
    return total / count


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/vlm_synth", help="built-in data folder (made if missing)")
    p.add_argument("--mix", choices=("qa", "llava"), default="qa", help="sample lengths (see the docstring)")
    p.add_argument("--samples", type=int, default=1000, help="training samples each side trains on")
    p.add_argument("--batch_tokens", type=int, default=1024, help="real tokens a step, about")
    p.add_argument("--lm_size", default="tiny-256", help="tiny LM size (mm.vlm.lm.TINY_LM_SIZES) or a BENCH_LMS name "
                   "(random weights)")
    p.add_argument("--lm", default=None, help="an LM spec instead (HF folder, .gguf, smollm2)")
    p.add_argument("--vision", default="open_clip:mm-tiny-rn-32")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--row_tokens", type=int, default=0, help="dense side: rows of this many tokens (0: one row)")
    p.add_argument("--seed", type=int, default=0, help="sample order and the llava mix's lengths")
    p.add_argument("--gpu", action="store_true", help="CUDA + bf16 (skipped, saying so, without CUDA)")
    p.add_argument("--loss", choices=("full", "targets"), default="full",
                   help="output layer at every position, or at target positions only (the recipe's)")
    p.add_argument("--flops", action="store_true", help="count FLOPs for TFLOP/s and MFU (always on with --gpu)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="MFU denominator (989: H100/H200 dense bf16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--profile_steps", type=int, default=0, help="then profile this many varlen steps (torch.profiler)")
    p.add_argument("--out", default="runs/bench_vlm_packing")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    from data_tools.synthetic_vlm import ensure_synthetic_vlm
    from mm.vlm.lm import load_lm
    from mm.vlm.vision import image_transform, load_vision_tower

    if a.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device here; skipped")
        return {}
    device = torch.device("cuda" if a.gpu else "cpu")
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if a.gpu else (lambda: torch.autocast("cpu", enabled=False))
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_synthetic_vlm(data)
    texts = [json.loads(line)["messages"][1]["content"] for line in open(data / "train.jsonl")][:2000]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm, tokenizer = load_lm(a.lm or ("tiny" if a.lm_size in BENCH_LMS else a.lm_size),
                            texts=None if a.lm else texts + ["What colour is it?"], vocab_size=1024,
                            tokenizer_dir=out / "tokenizer")
    if not a.lm and a.lm_size in BENCH_LMS:
        lm = bench_lm(a.lm_size, tokenizer)
    vision = load_vision_tower(a.vision, layer=-2, image_size=a.image_size or None)
    model = build_vlm(vision, lm, tokenizer)
    decode = vlm_decoder(tokenizer, image_transform(vision, train=False), image_tokens=model.tokens_per_image,
                         max_tokens=1024)
    train_file = data / "train.jsonl"
    if a.mix == "llava":
        train_file = write_llava_mix(data, out, tokenizer, model.tokens_per_image, a.samples, a.seed)
    print(f"model built ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    train = decode_all(str(train_file), decode, a.samples)
    held = decode_all(str(data / "heldout.jsonl"), decode, 200)
    random.Random(a.seed).shuffle(train)
    groups = groups_of(train, a.batch_tokens)
    results = {"machine": machine(), "mix": a.mix, "samples": len(train), "steps": len(groups),
               "lengths": length_stats(train), "lm": a.lm or a.lm_size, "row_tokens": a.row_tokens,
               "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "vision": a.vision,
               "loss": a.loss, "batch_tokens": a.batch_tokens, "dtype": "bf16 autocast" if a.gpu else "fp32",
               "lm_params_M": sum(p.numel() for p in model.lm.parameters()) / 1e6}
    print(f"{a.mix} mix: {len(train)} samples, tokens {results['lengths']}, {len(groups)} steps of ~{a.batch_tokens}")
    sides = {name: make_side(model, attn, a.lr) for name, attn in
             zip(SIDES, ("mm_varlen", "sdpa", "sdpa"))}
    for side in sides.values():
        side["model"].to(device)
    print(f"data decoded and sides ready at {time.perf_counter() - t0:.0f} s", flush=True)
    targets_only = a.loss == "targets"
    train_interleaved(sides, groups, tokenizer.pad_token_id, device, autocast, a.row_tokens, a.warmup, targets_only)
    flops_per_token = None
    if a.gpu or a.flops:
        flops = count_flops(sides["varlen"]["model"], groups[a.warmup:], device, autocast, targets_only)
        flops_per_token = flops / sides["varlen"]["real"]  # the real tokens of those same timed steps
        results["train_flops_per_real_token"] = flops_per_token
        print(f"FLOPs counted at {time.perf_counter() - t0:.0f} s", flush=True)
    for name, side in sides.items():
        row = {"attn": side["attn"], "tokens_per_s": side["real"] / side["seconds"],
               "padded_share": 1 - side["real"] / side["computed"], "seconds": side["seconds"],
               "heldout_loss": heldout(side["model"], held, tokenizer.pad_token_id, device, autocast)}
        if flops_per_token:
            row["tflops"] = flops_per_token * row["tokens_per_s"] / 1e12
            row["mfu"] = mfu(row["tokens_per_s"], flops_per_token, a.peak_tflops)
        results[name] = row
        print(f"{name:>7} ({row['attn']:>9}): {row['tokens_per_s']:,.0f} real tokens/s, {row['padded_share']:.1%} "
              f"padding, {row['seconds']:.1f} s, held-out loss {row['heldout_loss']:.4f} after {len(train)} samples"
              + (f", {row['tflops']:.3g} useful TFLOP/s, MFU {row['mfu']:.1%}" if flops_per_token else ""))
    for name in ("varlen", "dense"):
        results[f"ratio_{name}"] = results[name]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    print(f"packed / padded: {results['ratio_varlen']:.2f}x with mm_varlen, {results['ratio_dense']:.2f}x with "
          f"sdpa's dense mask (goal >= 1.4x); {results['machine']}")
    if a.profile_steps:  # last: it trains the varlen side on
        profile(sides["varlen"], groups[:a.profile_steps], device, autocast, targets_only)
    if device.type == "cuda":
        results["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
        results["gpu"] = torch.cuda.get_device_name()
    atomic_write(out / f"results_{a.mix}.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    return results


if __name__ == "__main__":
    main()
