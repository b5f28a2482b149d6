"""Benchmark: packed (padding-free) against padded vision-chat training, in one run on one machine.

    python benchmarks/vlm_packing.py                       # the recorded CPU run: tiny LM, built-in data, ~3 min
    python benchmarks/vlm_packing.py --samples=200 --lm_size=tiny   # smoke
    python benchmarks/vlm_packing.py --gpu                 # CUDA, bf16: a 0.5B-class LM with a ViT-B/16 tower, MFU

Both sides train the same model from the same initial weights on the same samples in the same order, in
the same groups: a step takes the next group of samples (about `--batch_tokens` real tokens). Packed: the
group is one row of concatenated samples, position ids restarting per sample, no attention mask
(mm.vlm.model.pack_batch, what the recipe does). Padded: the same group right-padded to its longest sample
with an attention mask (mm.vlm.model.pad_batch, what a collator with dynamic padding does, TRL's default).
Samples are decoded once beforehand (tokenised, images transformed), so only training steps are timed:
forward, loss, backward, clip, optimizer step. Reported: real (non-pad) tokens per second for each, the
ratio, and the held-out loss after the same number of tokens.

TRL's SFTTrainer with a Hugging Face LlavaForConditionalGeneration is not run: LLaVA's HF class needs a
CLIP/SigLIP-style vision config, so it cannot hold our tower (a ResNet), and its processor expands
<image> from a processor config we would have to fake; a like-for-like model would not be the same model.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.clip_vs_open_clip import machine  # noqa: E402
from mm.vlm.data import vlm_decoder  # noqa: E402
from mm.vlm.model import build_vlm, lm_loss, pack_batch, pack_rows, pad_batch  # noqa: E402
from mm.shards import read_samples  # noqa: E402


def decode_all(path: str, decode, limit: int) -> list[dict]:
    counts = {"bad_shards": 0}
    out = []
    for raw in read_samples([path], counts):
        out.append(decode(raw))
        if len(out) >= limit:
            break
    return out


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


def batch_of(group: list[dict], packed: bool, pad_id: int, device, row_tokens: int = 0) -> dict:
    batch = (pack_rows(group, row_tokens, pad_id) if row_tokens else pack_batch(group)) if packed else pad_batch(group, pad_id)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_side(model, groups, packed: bool, pad_id: int, device, lr: float, autocast, row_tokens: int = 0) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    model.train()
    real = padded = 0
    t_total = 0.0
    for i, group in enumerate(groups):
        batch = batch_of(group, packed, pad_id, device, row_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast():
            logits = model(batch["input_ids"], batch["pixel_values"], position_ids=batch.get("position_ids"),
                           attention_mask=batch.get("attention_mask"))[0]
        loss_sum, n = lm_loss(logits.float(), batch["labels"])
        (loss_sum / n.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps are not timed
            t_total += time.perf_counter() - t
            real += sum(len(s["input_ids"]) for s in group)
            padded += batch["input_ids"].numel()
    return {"tokens_per_s": real / t_total, "padded_share": 1 - real / padded, "seconds": t_total, "steps": len(groups)}


@torch.no_grad()
def heldout(model, samples, pad_id, device, autocast) -> float:
    model.eval()
    total = count = 0.0
    for group in groups_of(samples, 2048):
        batch = batch_of(group, True, pad_id, device)
        with autocast():
            logits = model(batch["input_ids"], batch["pixel_values"], position_ids=batch["position_ids"])[0]
        s, n = lm_loss(logits.float(), batch["labels"])
        total, count = total + float(s), count + int(n)
    return total / count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/vlm_synth", help="built-in data folder (made if missing)")
    p.add_argument("--samples", type=int, default=1500, help="training samples each side trains on")
    p.add_argument("--batch_tokens", type=int, default=1024, help="real tokens a step, about")
    p.add_argument("--lm_size", default="tiny-256", help="tiny LM size (mm.vlm.lm.TINY_LM_SIZES)")
    p.add_argument("--lm", default=None, help="an LM spec instead (HF folder, .gguf, smollm2)")
    p.add_argument("--vision", default="open_clip:mm-tiny-rn-32")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--row_tokens", type=int, default=256, help="packed rows of this many tokens")
    p.add_argument("--gpu", action="store_true", help="CUDA + bf16 (skipped, saying so, without CUDA)")
    p.add_argument("--out", default="runs/bench_vlm_packing")
    a = p.parse_args(argv)
    from mm.vlm.lm import load_lm
    from mm.vlm.vision import image_transform, load_vision_tower
    from data_tools.synthetic_vlm import ensure_synthetic_vlm

    if a.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device here; skipped")
        return {}
    device = torch.device("cuda" if a.gpu else "cpu")
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if a.gpu else (lambda: torch.autocast("cpu", enabled=False))
    ensure_synthetic_vlm(a.data)
    out = Path(a.out)
    texts = [json.loads(line)["messages"][1]["content"] for line in open(Path(a.data) / "train.jsonl")][:2000]
    torch.manual_seed(0)
    lm, tokenizer = load_lm(a.lm or a.lm_size, texts=None if a.lm else texts + ["What colour is it?"],
                            vocab_size=1024, tokenizer_dir=out / "tokenizer")
    vision = load_vision_tower(a.vision, layer=-2, image_size=a.image_size or None)
    model = build_vlm(vision, lm, tokenizer)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    decode = vlm_decoder(tokenizer, image_transform(vision, train=False), image_tokens=model.tokens_per_image,
                         max_tokens=1024)
    train = decode_all(str(Path(a.data) / "train.jsonl"), decode, a.samples)
    held = decode_all(str(Path(a.data) / "heldout.jsonl"), decode, 200)
    random.Random(0).shuffle(train)
    groups = groups_of(train, a.batch_tokens)
    results = {"machine": machine(), "samples": len(train), "steps": len(groups),
               "mean_tokens": sum(len(s["input_ids"]) for s in train) / len(train), "lm": a.lm or a.lm_size,
               "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    for name, packed, rows in (("packed", True, a.row_tokens), ("one_row", True, 0), ("padded", False, 0)):
        model.load_state_dict(init)
        model.to(device)
        side = train_side(model, groups, packed, tokenizer.pad_token_id, device, a.lr, autocast, rows)
        side["heldout_loss"] = heldout(model, held, tokenizer.pad_token_id, device, autocast)
        results[name] = side
        print(f"{name:>7}: {side['tokens_per_s']:,.0f} real tokens/s, {side['padded_share']:.1%} padding, "
              f"{side['seconds']:.1f} s, held-out loss {side['heldout_loss']:.4f} after {len(train)} samples")
    results["ratio"] = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    print(f"packed / padded: {results['ratio']:.2f}x tokens/s (goal >= 1.4x); {results['machine']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
