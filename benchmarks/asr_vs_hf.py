"""Benchmark: our ASR training step vs the Hugging Face Whisper fine-tuning path, in one run on one machine.

    python benchmarks/asr_vs_hf.py --wait_idle=600                    # the recorded CPU run, ~20 minutes on 2 cores
    python benchmarks/asr_vs_hf.py --data=/tmp/tiny --model=cpu_tiny --seconds=10 --padded_seconds=5  # smoke
    python benchmarks/asr_vs_hf.py --gpu --seconds=0 --padded_seconds=0  # GPU only: whisper-base dims, bf16, MFU

The peer is `WhisperForConditionalGeneration` fed as the Hugging Face fine-tuning blog feeds it:
`WhisperFeatureExtractor` on each clip (padded to 30 s: 3000 frames), the blog's
`DataCollatorSpeechSeq2SeqWithPadding`, a fixed batch size. Ours is `mm.asr.model.Whisper` fed by the
recipe's decode stage (`asr_decoder`), duration buckets (`BucketBatcher`) and `asr_collate`. Modes:

  1. buckets vs 30 s: ours on duration buckets, the peer on 30 s inputs, `--seconds` of training each;
     samples/s, the ratio, and the held-out CER / WER / language-ID each model reached in that time.
  2. both 30 s: ours on the same 30 s padded inputs (`pad_to_30s=True`) in the same fixed batches as the
     peer, `--padded_seconds` each: the implementations alone, samples/s and the ratio (no CER).
  3. `--gpu`: modes 1 and 2 (without CER) with whisper-base dims in bf16 autocast on CUDA: samples/s,
     TFLOP/s and MFU against `--peak_tflops`. Skipped, saying so, when CUDA is absent.

What "equal" means, knob by knob:
- model: the same dims (`--model`, n_vocab = the tokenizer's), and the same initial weights: ours is built
  with `--seed`, exported with `export_hf`, and both sides load that folder (the check prints the
  largest logit difference at the start). Dropout 0 on both. No CTC head on ours (the peer has none).
- tokens: one BPE (`train_bpe` on the training transcripts); both take the ids of `build_target`
  ([sot, lang, transcribe, notimestamps] + text + [eot]), so the loss covers the same tokens.
- loss: `label_smoothed_ce` with `--label_smoothing` on both. The peer's decoder input is HF's own
  `shift_tokens_right(labels)`, what its forward does with `labels=`; its built-in loss has no smoothing.
- optimizer: AdamW fused, the same lr / betas / eps / weight decay groups (`mm.optim.param_groups`), grad
  clip. The schedule is `mm.optim.WarmupCosine` over training *seconds*, not steps: both get the same
  budget but take very different numbers of steps; each warms up over its first `--warmup` share of the
  budget and decays to `--min_lr_ratio` at its end.
- data: one sample order (a seeded shuffle per epoch) consumed by both; no augmentation and no timestamps
  on either (the blog has none). Peer batch size = the mean number of samples in our bucket batches
  (`--max_batch_seconds` of audio each), so both take as many samples per step on average.
- time: only training steps are timed (device copy, forward, loss, backward, clip, optimizer step);
  features and collation are computed beforehand per utterance and cached (as the blog's `datasets.map`
  does), not timed, and shown as "data s". samples/s leaves out each side's first `--skip_steps` steps.
  A side stops at the first step that ends past its budget, so a side with long steps (the peer's) may
  train up to one step longer ("step s" shows it). The sides run one after the other, ours first, in this
  process with the same `torch.set_num_threads`.
Writes <out>/results.json with every figure.
"""
from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.clip_vs_open_clip import busy_cpu_seconds, machine, wait_for_idle  # noqa: E402
from mm.asr.convert import export_hf, load_whisper  # noqa: E402
from mm.asr.data import asr_collate, asr_decoder, mel_seconds, read_transcripts  # noqa: E402
from mm.asr.evaluate import evaluate_asr  # noqa: E402
from mm.asr.losses import label_smoothed_ce  # noqa: E402
from mm.asr.model import Whisper, dims_for  # noqa: E402
from mm.asr.tokenizer import train_bpe  # noqa: E402
from mm.batching import BucketBatcher, FixedBatcher, estimate_bucket_bounds  # noqa: E402
from mm.decoders import audio_decoder  # noqa: E402
from mm.optim import WarmupCosine, param_groups  # noqa: E402
from mm.shards import read_samples  # noqa: E402

SYNTH_DIR = ROOT / "data" / "asr_synth"  # the recipe's built-in corpus (generated here if missing)


def recipe_defaults():
    """The ASR recipe's config defaults (its built-in corpus settings), read from recipes/asr/train.py."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("asr_recipe", ROOT / "recipes" / "asr" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module.ASRConfig()


SCHEDULE_TICKS = 1000  # the time-based schedule's resolution: 1/1000 of the budget


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SYNTH_DIR), help="a corpus with train/ and heldout/ shards")
    p.add_argument("--model", default="cpu_small", help="named size of mm.asr.model for modes 1 and 2")
    p.add_argument("--seconds", type=float, default=240, help="mode 1: seconds of training steps per side (0: skip)")
    p.add_argument("--padded_seconds", type=float, default=120, help="mode 2: seconds per side (0: skip)")
    p.add_argument("--gpu", action="store_true", help="mode 3: --gpu_model in bf16 on CUDA")
    p.add_argument("--gpu_model", default="base")
    p.add_argument("--gpu_seconds", type=float, default=60, help="mode 3: seconds per side and setting")
    p.add_argument("--gpu_max_batch_seconds", type=float, default=600, help="mode 3: --max_batch_seconds")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="MFU denominator (989: H100/H200 dense bf16)")
    p.add_argument("--max_batch_seconds", type=float, default=12, help="audio per bucket batch (the recipe's)")
    p.add_argument("--num_buckets", type=int, default=10)
    p.add_argument("--peer_batch_size", type=int, default=None, help="default: our mean bucket batch size")
    p.add_argument("--bpe_vocab", type=int, default=500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.1, help="share of the budget spent warming up")
    p.add_argument("--min_lr_ratio", type=float, default=0.05)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98))
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--label_smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    p.add_argument("--skip_steps", type=int, default=1, help="first steps of each side left out of samples/s")
    p.add_argument("--eval_batch_size", type=int, default=32)
    p.add_argument("--wait_idle", type=float, default=0,
                   help="before each side, wait up to this many seconds for other processes to leave the CPU idle")
    p.add_argument("--out", default="runs/bench_asr")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- data: one order for both sides

def load_corpus(data: Path) -> tuple[list[str], list[dict], list[float], str]:
    """(training shards; their raw samples, in shard order; their durations in s; the held-out shard spec)."""
    if data.resolve() == SYNTH_DIR.resolve():
        from data_tools.synthetic_asr import ensure_synthetic_asr
        cfg = recipe_defaults()
        ensure_synthetic_asr(data, per_language=cfg.synthetic_per_language, words_per_language=cfg.synthetic_words)
    urls = sorted(str(u) for u in (data / "train").glob("*.tar"))
    if not urls or not list((data / "heldout").glob("*.tar")):
        raise SystemExit(f"{data}: expected train/*.tar and heldout/*.tar (python -m data_tools.synthetic_asr)")
    raw = list(read_samples(urls, {"bad_shards": 0}))
    return urls, raw, [float(json.loads(s["json"])["duration"]) for s in raw], str(data / "heldout")


def sample_order(n: int, seed: int):
    """Endless sample indices: each epoch a fresh shuffle seeded by (seed, epoch). Every side gets the same."""
    for epoch in itertools.count():
        order = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        yield from order


def mean_bucket_batch(durations: list[float], bounds: list[float], max_batch_seconds: float, seed: int) -> float:
    """Samples per batch that our BucketBatcher makes from the shared order (at least 50,000 samples of it)."""
    batcher, sizes = BucketBatcher(lambda d: d, max_batch_seconds, bounds), []
    for key, i in enumerate(itertools.islice(sample_order(len(durations), seed), max(len(durations), 50_000))):
        sizes += [len(b) for b in batcher.add(key, durations[i])]
    return sum(sizes) / max(1, len(sizes))


def our_batches(raw, prep, batcher, eot: int, seed: int, pin: bool):
    """Ours: the recipe's decode stage (cached per utterance), a batcher, asr_collate.
    Yields (batch of tensors, (samples, mel frames, decoder tokens))."""
    collate = asr_collate(eot)
    for key, i in enumerate(sample_order(len(raw), seed)):
        for items in batcher.add(key, prep(i)):
            b = collate([s for _, s in items])
            batch = {k: b[k].pin_memory() if pin else b[k] for k in ("mel", "mel_lengths", "tokens", "labels")}
            yield batch, (len(items), b["mel"].shape[-1], b["tokens"].shape[1])


class DataCollatorSpeechSeq2SeqWithPadding:
    """The Hugging Face fine-tuning blog's collator (huggingface.co/blog/fine-tune-whisper), as written there."""

    def __init__(self, processor, decoder_start_token_id: int):
        self.processor, self.decoder_start_token_id = processor, decoder_start_token_id

    def __call__(self, features: list[dict]) -> dict:
        input_features = [{"input_features": feature["input_features"]} for feature in features]
        batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")
        label_features = [{"input_ids": feature["labels"]} for feature in features]
        labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
        if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():  # the model prepends it itself
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch


def prepare_dataset(sample: dict, read, feature_extractor, tokenizer, device: str) -> dict:
    """The blog's prepare_dataset: the clip's log-mel padded to 30 s, and the label ids (ours, as for us)."""
    d = read(sample)
    features = feature_extractor(d["audio"].numpy(), sampling_rate=16000, device=device).input_features[0]
    return {"input_features": features, "labels": tokenizer.build_target(d["text"], d["language"])[0]}


def peer_batches(raw, prep, collator, batch_size: int, seed: int, pin: bool):
    """The peer: cached prepare_dataset, `batch_size` samples a batch in the shared order, the blog's collator."""
    order = sample_order(len(raw), seed)
    while True:
        b = collator([prep(next(order)) for _ in range(batch_size)])
        batch = {k: b[k].pin_memory() if pin else b[k] for k in ("input_features", "labels")}
        yield batch, (batch_size, b["input_features"].shape[-1], b["labels"].shape[1])


def cached(fn, raw: list[dict]):
    """prep(i) = fn(raw[i]), computed once per utterance (there is no augmentation: it never changes)."""
    return functools.lru_cache(maxsize=None)(lambda i: fn(raw[i]))


# ---------------------------------------------------------------------------- the two training steps

def our_loss(model, batch: dict, smoothing: float) -> torch.Tensor:
    logits = model(batch["mel"], batch["tokens"], batch["mel_lengths"])
    labels = batch["labels"]
    return label_smoothed_ce(logits, labels.clamp(min=0), labels >= 0, smoothing)


def peer_loss(model, batch: dict, smoothing: float) -> torch.Tensor:
    from transformers.models.whisper.modeling_whisper import shift_tokens_right
    labels = batch["labels"]
    decoder_input_ids = shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)
    logits = model(input_features=batch["input_features"], decoder_input_ids=decoder_input_ids, use_cache=False).logits
    return label_smoothed_ce(logits, labels.clamp(min=0), labels >= 0, smoothing)


def train_flops(dims, batch: int, frames: int, tokens: int) -> float:
    """Training FLOPs of a batch of `batch` samples padded to `frames` mel frames and `tokens` decoder tokens:
    3 x forward, a multiply-add = 2 FLOPs, counted on the padded tensors a side computes. With d the width,
    T = ceil(frames / 2) encoder positions, L tokens, V the vocabulary, per sample:
    convs 6 * frames * n_mels * d + 6 * T * d^2; per encoder layer 24 T d^2 (projections, MLP) + 4 T^2 d
    (scores, values); per decoder layer 28 L d^2 + 4 T d^2 (cross-attention keys/values) + 4 L^2 d + 4 L T d
    (attention, counted in full, no causal halving); logits 2 L d V. Norms, softmax, GELU and the loss left out.
    This equals torch's FlopCounterMode count of our forward (math SDPA) x 3 for cpu_tiny and cpu_small."""
    d, T, L = dims.n_audio_state, (frames + 1) // 2, tokens
    convs = 6 * frames * dims.n_mels * d + 6 * T * d * d
    encoder = dims.n_audio_layer * (24 * T * d * d + 4 * T * T * d)
    decoder = dims.n_text_layer * (28 * L * d * d + 4 * T * d * d + 4 * L * L * d + 4 * L * T * d)
    return 3.0 * batch * (convs + encoder + decoder + 2 * L * d * dims.n_vocab)


def train_side(name: str, model, batches, loss_fn, budget_s: float, dims, device: torch.device, args) -> dict:
    """Train `model` on `batches` until the timed training steps add up to `budget_s` seconds."""
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.betas),
                                  eps=args.eps, fused=True)
    schedule = WarmupCosine(round(args.warmup * SCHEDULE_TICKS), SCHEDULE_TICKS, args.min_lr_ratio)
    bf16 = device.type == "cuda"
    steps, losses, train_s, data_s = [], [], 0.0, 0.0
    busy0, own0, wall0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    while train_s < budget_s:
        t0 = time.perf_counter()
        batch, shape = next(batches)  # features and collation: not timed
        t1 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = args.lr * schedule(int(SCHEDULE_TICKS * train_s / budget_s))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, batch, args.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a host sync each step on both sides (the recipe checks the loss each step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        data_s, train_s = data_s + t1 - t0, train_s + t2 - t1
        steps.append((shape[0], t2 - t1, train_flops(dims, *shape)))
    wall = time.perf_counter() - wall0
    other = max(0.0, (busy_cpu_seconds() - busy0 - (time.process_time() - own0)) / wall)
    steady = steps[args.skip_steps:] if len(steps) > args.skip_steps else steps
    samples, seconds, flops = (sum(s[i] for s in steady) for i in range(3))
    r = {"steps": len(steps), "samples": sum(s[0] for s in steps), "train_s": train_s, "data_s": data_s,
         "steady_steps": len(steady), "samples_per_s": samples / seconds, "tflops": flops / seconds / 1e12,
         "mean_batch": sum(s[0] for s in steps) / len(steps), "final_loss": sum(losses[-5:]) / len(losses[-5:]),
         "other_cores": other}
    if device.type == "cuda":
        r["mfu"] = r["tflops"] / args.peak_tflops
    print(f"  {name}: {r['steps']} steps, {r['samples']} samples in {train_s:.1f} s of steps (+{data_s:.1f} s data), "
          f"{r['samples_per_s']:.2f} samples/s, loss {r['final_loss']:.3f}, others {other:.2f}"
          + (" (fewer steps than --skip_steps: all counted)" if steady is steps else ""), flush=True)
    return r


# ---------------------------------------------------------------------------- models and scoring

def make_initial_model(dims, tokenizer, tokenizer_dir: Path, folder: Path, seed: int) -> Path:
    """Our model built with `seed`, exported as a Hugging Face folder: the starting point of both sides."""
    torch.manual_seed(seed)
    ids = {"decoder_start_token_id": tokenizer.sot, "eos_token_id": tokenizer.eot, "pad_token_id": tokenizer.eot,
           "bos_token_id": tokenizer.eot}
    return export_hf(Whisper(dims), folder, tokenizer_dir=tokenizer_dir, **ids)


def load_peer(folder: Path):
    from transformers import WhisperForConditionalGeneration
    return WhisperForConditionalGeneration.from_pretrained(folder)  # dropout 0, SDPA attention: its defaults


@torch.no_grad()
def start_difference(folder: Path, peer_prep) -> float:
    """Largest |logit difference| of the two freshly loaded models on one 30 s input: 0 up to rounding."""
    ours, peer = load_whisper(folder)[0], load_peer(folder).eval()
    sample = peer_prep(0)
    mel = torch.as_tensor(sample["input_features"])[None]
    tokens = torch.tensor(sample["labels"])[None, :-1]
    return float((ours(mel, tokens) - peer(input_features=mel, decoder_input_ids=tokens).logits).abs().max())


def score(model, tokenizer, heldout: str, device, args, pad_to_30s: bool) -> dict:
    r = evaluate_asr(model, tokenizer, heldout, device, batch_size=args.eval_batch_size, pad_to_30s=pad_to_30s)
    return {"cer": r["cer_mean"], "wer": r["wer"], "lid": r["lid_acc"]}


# ---------------------------------------------------------------------------- one model size, one setting

def prepare(dims_name: str, max_batch_s: float, fe_device: str, args, ctx: dict) -> tuple:
    """For one model size: the shared initial model folder, both data paths, the bucket bounds and the
    peer's batch size. Returns (dims, folder, what to record)."""
    from transformers import WhisperProcessor
    tokenizer, raw = ctx["tokenizer"], ctx["raw"]
    dims = dims_for(dims_name, n_vocab=tokenizer.vocab_size, n_mels=80)
    folder = make_initial_model(dims, tokenizer, ctx["out"] / "tokenizer", ctx["out"] / f"init_{dims_name}", args.seed)
    processor = WhisperProcessor.from_pretrained(folder)  # the feature extractor and tokenizer export_hf wrote
    ctx["collator"] = DataCollatorSpeechSeq2SeqWithPadding(processor, tokenizer.sot)
    ctx["peer_prep"] = cached(functools.partial(prepare_dataset, read=audio_decoder(max_seconds=30.0),
                                                feature_extractor=processor.feature_extractor, tokenizer=tokenizer,
                                                device=fe_device), raw)
    ctx["our_prep"] = cached(asr_decoder(tokenizer, dims.n_mels, train=False), raw)
    ctx["our_prep_30s"] = cached(asr_decoder(tokenizer, dims.n_mels, train=False, pad_to_30s=True), raw)
    ctx["bounds"] = estimate_bucket_bounds(ctx["durations"], args.num_buckets)
    ctx["max_batch_s"] = max_batch_s
    mean = mean_bucket_batch(ctx["durations"], ctx["bounds"], max_batch_s, args.seed)
    ctx["peer_batch"] = args.peer_batch_size or max(1, round(mean))
    diff = start_difference(folder, ctx["peer_prep"])
    print(f"{dims_name}: d {dims.n_audio_state}, {dims.n_audio_layer}+{dims.n_text_layer} layers, vocab {dims.n_vocab};"
          f" buckets of {max_batch_s:g} s of audio hold {mean:.1f} samples on average -> peer batch "
          f"{ctx['peer_batch']}; initial logits differ by at most {diff:.2e}", flush=True)
    return dims, folder, {"model": dims_name, "max_batch_seconds": max_batch_s, "mean_bucket_batch": mean,
                          "peer_batch_size": ctx["peer_batch"], "bucket_bounds": ctx["bounds"],
                          "initial_logit_max_diff": diff}


def run_setting(label: str, padded: bool, budget: float, dims, folder: Path, ctx: dict, device, args,
                evaluate: bool) -> dict:
    """Ours (buckets; with `padded`, 30 s inputs in the peer's batches) then the peer, `budget` seconds each.
    With `evaluate`, each model is scored on the held-out set right after its training."""
    print(f"[{label}] {budget:g} s of training steps per side, on {device}", flush=True)
    pin, tokenizer, raw = device.type == "cuda", ctx["tokenizer"], ctx["raw"]
    if padded:  # the same samples in the same batches as the peer, 3000 frames each
        batcher, prep = FixedBatcher(ctx["peer_batch"]), ctx["our_prep_30s"]
    else:
        batcher, prep = BucketBatcher(mel_seconds, ctx["max_batch_s"], ctx["bounds"]), ctx["our_prep"]
    ours_data = our_batches(raw, prep, batcher, tokenizer.eot, args.seed, pin)
    peer_data = peer_batches(raw, ctx["peer_prep"], ctx["collator"], ctx["peer_batch"], args.seed, pin)

    ours = load_whisper(folder)[0]
    r_ours = train_side("mm", ours, ours_data, our_loss, budget, dims, device, args)
    if evaluate:  # as it trained: no padding to 30 s
        r_ours.update(score(ours, tokenizer, ctx["heldout"], device, args, pad_to_30s=False))
    del ours
    peer = load_peer(folder)
    r_peer = train_side("hf", peer, peer_data, peer_loss, budget, dims, device, args)
    if evaluate:  # its weights in our model, scored by the same code, on 30 s padded inputs as it trained
        peer.save_pretrained(ctx["out"] / "hf_trained")
        r_peer.update(score(load_whisper(ctx["out"] / "hf_trained", device)[0], tokenizer, ctx["heldout"], device,
                            args, pad_to_30s=True))
    del peer
    gc.collect()
    if evaluate:
        print(f"  held-out CER: mm {r_ours['cer']:.4f}, hf {r_peer['cer']:.4f}", flush=True)
    return {"mode": label, "seconds": budget, "mm": r_ours, "hf": r_peer,
            "ratio": r_ours["samples_per_s"] / r_peer["samples_per_s"]}


# ---------------------------------------------------------------------------- report

def print_table(res: dict) -> None:
    head = (f"{'mode':34}{'side':>5}{'samples/s':>11}{'ratio':>8}{'steps':>7}{'samples':>9}{'step s':>8}{'data s':>8}"
            f"{'TFLOP/s':>9}{'MFU':>7}{'loss':>7}{'CER':>8}{'WER':>8}{'LID':>8}{'others':>8}")
    print("\n" + head)
    for m in res["modes"]:
        for side in ("mm", "hf"):
            r = m[side]
            cells = [f"{r[k]:8.4f}" if k in r else f"{'-':>8}" for k in ("cer", "wer", "lid")]
            mfu = f"{r['mfu']:7.1%}" if "mfu" in r else f"{'-':>7}"
            ratio = f"{m['ratio']:8.2f}" if side == "mm" else f"{'':8}"
            print(f"{m['mode'] if side == 'mm' else '':34}{side:>5}{r['samples_per_s']:11.2f}{ratio}{r['steps']:7d}"
                  f"{r['samples']:9d}{r['train_s']:8.1f}{r['data_s']:8.1f}{r['tflops']:9.4f}{mfu}"
                  f"{r['final_loss']:7.3f}{''.join(cells)}{r['other_cores']:8.2f}")
    print(f"\nratio: mm/hf samples/s over the steps after the first {res['config']['skip_steps']} of each side.\n"
          "step s: timed training steps; data s: features + collation, untimed (cached per utterance).\n"
          "CER: mean over languages on the held-out set, greedy decoding by mm.asr.evaluate for both models\n"
          "(hf's evaluated on 30 s padded inputs, as it trained). loss: the mean of the last 5 steps.\n"
          "others: CPU cores other processes kept busy during the side (0 = undisturbed).")
    for note in res["notes"]:
        print(note)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import __version__ as transformers_version
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars on every from_pretrained
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    info = {**machine(), "transformers": transformers_version}
    print(f"machine: {info['cpu']}, {info['cpu_cores']} cores, GPU {info['gpu']}; torch {info['torch']} "
          f"({args.threads} threads), transformers {transformers_version}", flush=True)

    urls, raw, durations, heldout = load_corpus(Path(args.data))
    tokenizer = train_bpe(read_transcripts(urls), args.bpe_vocab)  # as the recipe trains its BPE
    tokenizer.save(out / "tokenizer")
    print(f"{len(raw)} training utterances, {sum(durations) / len(durations):.2f} s mean, "
          f"{max(durations):.1f} s longest; BPE of {tokenizer.vocab_size} tokens with specials", flush=True)
    ctx = {"raw": raw, "durations": durations, "heldout": heldout, "tokenizer": tokenizer, "out": out}
    res = {"command": " ".join(sys.argv), "config": vars(args), "machine": info, "modes": [], "notes": []}

    cpu = torch.device("cpu")
    if args.seconds > 0 or args.padded_seconds > 0:
        dims, folder, res["cpu_setup"] = prepare(args.model, args.max_batch_seconds, "cpu", args, ctx)
        if args.seconds > 0:
            res["modes"].append(run_setting(f"buckets vs 30 s, {args.model}, fp32", False, args.seconds, dims, folder,
                                            ctx, cpu, args, evaluate=True))
        if args.padded_seconds > 0:
            res["modes"].append(run_setting(f"both 30 s, {args.model}, fp32", True, args.padded_seconds, dims, folder,
                                            ctx, cpu, args, evaluate=False))
    if args.gpu and not torch.cuda.is_available():
        res["notes"].append("--gpu: skipped, CUDA is not available on this machine (no GPU figures, no MFU).")
    elif args.gpu:
        gpu = torch.device("cuda")
        dims, folder, res["gpu_setup"] = prepare(args.gpu_model, args.gpu_max_batch_seconds, "cuda", args, ctx)
        for label, padded in ((f"GPU buckets vs 30 s, {args.gpu_model}, bf16", False),
                              (f"GPU both 30 s, {args.gpu_model}, bf16", True)):
            res["modes"].append(run_setting(label, padded, args.gpu_seconds, dims, folder, ctx, gpu, args,
                                            evaluate=False))
        res["notes"].append(f"MFU: TFLOP/s / {args.peak_tflops:g} (--peak_tflops), FLOPs on the padded tensors.")
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    if res["modes"]:
        print_table(res)
    else:
        print("\n".join(res["notes"]) or "nothing to run: --seconds=0 --padded_seconds=0 and no --gpu")
    print(f"figures: {out / 'results.json'}")
    return res


if __name__ == "__main__":
    main()
