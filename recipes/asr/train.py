"""Whisper-style multilingual speech recognition (encoder-decoder, optional CTC) on WebDataset audio shards.

    python recipes/asr/train.py                                   # built-in espeak corpus, small model, CPU ok
    python recipes/asr/train.py --config=whisper_base --train_data='/data/cv/{000..099}.tar' --eval_data=...
    python recipes/asr/train.py --init_from=/ckpt/whisper-small --train_data=...   # fine-tune a HF or .pt checkpoint
    torchrun --nproc_per_node=8 recipes/asr/train.py --config=whisper_small ...      # or accelerate launch
    python recipes/asr/train.py --resume=latest                   # continue a killed run, same samples
    python recipes/asr/train.py --help                            # every key, its type, default and meaning

From scratch, batches are duration buckets of up to max_batch_seconds of audio, with no padding to 30 s;
fine-tuning a pretrained Whisper pads every input to 30 s (what it was trained on; see pad_to_30s).
The run ends with CER, WER and language-ID accuracy per language on the held-out data, and exports
the model as a Hugging Face Whisper directory and an OpenAI .pt file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing

from mm.asr.convert import export_hf, export_openai, load_checkpoint_tokenizer, load_whisper  # noqa: E402
from mm.asr.data import asr_collate, asr_decoder, mel_seconds, read_transcripts  # noqa: E402
from mm.asr.tokenizer import TRAINED_LANGUAGES  # noqa: E402
from mm.asr.evaluate import evaluate_asr  # noqa: E402
from mm.asr.losses import ctc_loss, label_smoothed_ce  # noqa: E402
from mm.asr.metrics import format_scores  # noqa: E402
from mm.asr.model import SIZES, Whisper, dims_for  # noqa: E402
from mm.asr.tokenizer import AsrTokenizer, load_tokenizer, train_bpe  # noqa: E402
from mm.batching import BucketBatcher  # noqa: E402
from mm.config import ConfigError, parse_config, save_config  # noqa: E402
from mm.distributed import all_reduce_mean, barrier, close_distributed, init_distributed, no_sync, wrap_model  # noqa: E402
from mm.metrics import MetricsLogger, setup_logging  # noqa: E402
from mm.optim import param_groups, warmup_cosine  # noqa: E402
from mm.precision import check_finite, make_precision, optimizer_step  # noqa: E402
from mm.shards import LoaderPosition, ShardStream, check_stream_config, expand_shard_spec, make_loader  # noqa: E402
from mm.train_state import ResumeError, resume_train_state, save_train_state  # noqa: E402

log = logging.getLogger("mm.asr")
SYNTH_DIR = "data/asr_synth"


@dataclass
class ASRConfig:
    # --- data
    train_data: str = f"{SYNTH_DIR}/train"  # shard spec: path/folder/URL/pipe:, {000..099} braces, sources joined by ::
    train_weights: list[float] | None = None  # one weight per :: source (resampled mode only)
    eval_data: str | None = f"{SYNTH_DIR}/heldout"  # held-out shards scored per language (none: skip)
    synthetic_per_language: int = 600  # built-in corpus: training utterances per language (when train_data is it)
    synthetic_words: int = 60  # built-in corpus: vocabulary drawn from each language's word list
    resampled: bool = False  # draw shards with replacement (infinite stream) instead of epoch passes
    epoch_samples: int = 0  # samples per epoch across all ranks (0: one pass over the shards; resampled needs it)
    shuffle_buffer: int = 1000  # samples held in each worker's shuffle buffer
    num_workers: int = 0  # DataLoader workers per rank (0: in-process)
    max_seconds: float = 30.0  # longer utterances are skipped and counted (too_long)
    min_seconds: float = 0.0  # shorter utterances are skipped and counted
    max_batch_seconds: float = 24.0  # audio per batch, counted as padded length x utterances (GPU: ~600-1200)
    num_buckets: int = 10  # duration buckets, bounds estimated from the first shard
    default_language: str | None = None  # language of samples that name none (none: such samples are skipped)
    # --- targets and augmentation
    timestamp_prob: float = 0.5  # share of samples with segments trained with timestamp tokens (else notimestamps)
    speed_factors: list[float] = dataclasses.field(default_factory=lambda: [0.9, 1.0, 1.1])  # speed perturbation
    noise_prob: float = 0.0  # share of samples mixed with noise
    snr_db: list[float] = dataclasses.field(default_factory=lambda: [10.0, 30.0])  # noise SNR range, dB
    spec_augment: bool = False  # frequency and time masks on the log-mel (the GPU presets turn it on)
    # --- model and tokenizer
    model: str = "cpu_small"  # a named size (see --help of mm.asr.model: tiny ... large_v3, cpu_tiny, cpu_small)
    init_from: str | None = None  # a Hugging Face Whisper folder or an OpenAI .pt file to fine-tune (its tokenizer too)
    n_mels: int = 80  # log-mel bins (80, or 128 as large-v3); a checkpoint's own wins
    bpe_vocab: int = 500  # from scratch: byte-level BPE size trained on the transcripts (plus Whisper's specials)
    pad_to_30s: Literal["auto", "true", "false"] = "auto"  # auto: pad when fine-tuning a checkpoint, buckets otherwise
    ctc_weight: float = 0.3  # weight of the CTC loss on the encoder (0: no CTC head), as in OWSM
    label_smoothing: float = 0.1  # on the decoder's cross-entropy
    max_target_tokens: int = 448  # longer targets are skipped and counted
    # --- optimisation
    max_steps: int = 1800  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.05  # final lr as a fraction of the peak
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.05  # AdamW decay on weight matrices (not norms, biases, embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.98  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global grad norm (0: off)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model
    seed: int = 0  # model init, data order and augmentation
    # --- run
    out_dir: str = "runs/asr"  # checkpoints, metrics.jsonl, tensorboard/, tokenizer/, export/, config.yaml
    resume: str | None = None  # "latest" or a checkpoint path; required to reuse an out_dir with checkpoints
    resume_ignore_data: bool = False  # resume weights/optimizer/schedule but start the data afresh
    ckpt_every: int = 900  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    eval_every: int = 900  # steps between evaluations (0: only at the end)
    eval_batch_size: int = 64  # utterances per decoding batch
    eval_language: Literal["detect", "given"] = "detect"  # transcribe in the detected language, or the labelled one
    eval_ctc_weight: float = 0.5  # decoding joint with the CTC head, as ESPnet (0: decoder alone; no head: 0)
    eval_beam_size: int = 6  # the final evaluation's joint beam search (1: greedy, as the evaluations on the way)
    eval_length_bonus: float = 1.5  # added per token to a beam's score (without it, short hypotheses win)
    eval_languages_tried: int = 3  # final evaluation: a clip's language is chosen with its transcript among these
    log_every: int = 50  # steps between metrics.jsonl rows
    tensorboard: bool = True  # also log to <out_dir>/tensorboard
    wandb_project: str | None = None  # log to this wandb project (needs `pip install wandb`)


def check_config(cfg: ASRConfig) -> None:
    """What the types cannot say."""
    check_stream_config(cfg)
    for key in ("grad_accum", "max_steps", "ckpt_every", "log_every", "eval_batch_size", "num_buckets"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.model not in SIZES and not cfg.init_from:
        raise ConfigError(f"--model={cfg.model!r} is not a named size; choose from {sorted(SIZES)}")
    if not 0 <= cfg.ctc_weight < 1 or not 0 <= cfg.timestamp_prob <= 1 or not 0 <= cfg.noise_prob <= 1:
        raise ConfigError("--ctc_weight must be in [0, 1), --timestamp_prob and --noise_prob in [0, 1]")
    if not 0 <= cfg.eval_ctc_weight < 1:
        raise ConfigError(f"--eval_ctc_weight must be in [0, 1), got {cfg.eval_ctc_weight}")
    if cfg.eval_beam_size < 1 or cfg.eval_languages_tried < 1:
        raise ConfigError(f"--eval_beam_size and --eval_languages_tried must be at least 1, got "
                          f"{cfg.eval_beam_size} and {cfg.eval_languages_tried}")
    if (cfg.pad_to_30s == "true" or (cfg.pad_to_30s == "auto" and cfg.init_from)) and cfg.max_batch_seconds < 30:
        raise ConfigError(f"inputs padded to 30 s (--pad_to_30s={cfg.pad_to_30s}{', with --init_from' if cfg.init_from else ''}) "
                          f"count 30 s each: --max_batch_seconds={cfg.max_batch_seconds:g} fits none; use 30 x the "
                          f"batch size you want (e.g. 480 for 16)")
    if len(cfg.snr_db) != 2 or cfg.snr_db[0] > cfg.snr_db[1]:
        raise ConfigError(f"--snr_db is [low, high] in dB, got {cfg.snr_db}")
    if any(f <= 0 for f in cfg.speed_factors):
        raise ConfigError(f"--speed_factors must be positive, got {cfg.speed_factors}")


def ensure_builtin_data(cfg: ASRConfig, is_main: bool) -> None:
    """Build the espeak corpus when the config points at it and it is not there yet."""
    if cfg.train_data.startswith(SYNTH_DIR) and is_main:
        from data_tools.synthetic_asr import ensure_synthetic_asr
        info = ensure_synthetic_asr(SYNTH_DIR, per_language=cfg.synthetic_per_language,
                                    words_per_language=cfg.synthetic_words)
        log.info("built-in speech in %s: %s languages, %.2f h of training audio", SYNTH_DIR,
                 len(info["languages"]), info["train_hours"])
    barrier()


def build_tokenizer(cfg: ASRConfig, sources, saved: Path, is_main: bool) -> AsrTokenizer:
    """A resumed run's saved tokenizer; else a checkpoint's own; else a BPE trained now on the training
    transcripts (Whisper's special tokens appended). Saved in `saved`, which the export copies."""
    if is_main and not (cfg.resume and (saved / "vocab.json").exists()):
        if cfg.init_from:
            try:
                tokenizer = load_checkpoint_tokenizer(cfg.init_from)
            except (OSError, ValueError, ImportError) as e:
                raise SystemExit(f"--init_from: {e}")
        else:
            languages: set[str] = set()
            texts = read_transcripts([u for s in sources for u in s.urls], languages=languages)
            if not texts:
                raise SystemExit(f"no transcripts found in {cfg.train_data}")
            log.info("training a %d-token byte-level BPE on %d transcripts", cfg.bpe_vocab, len(texts))
            tokenizer = train_bpe(texts, cfg.bpe_vocab)
        tokenizer.save(saved)
        if not cfg.init_from:  # what the model will have heard: the languages a transcriber offers
            (saved / TRAINED_LANGUAGES).write_text(json.dumps(sorted(languages & set(tokenizer.languages))))
    barrier()
    return load_tokenizer(saved)


def bucket_bounds(sources, num_buckets: int, max_seconds: float) -> list[float]:
    """Duration bucket edges: equal-count quantiles of the first shard's durations (json "duration"), or
    even steps up to max_seconds when it has none."""
    from mm.batching import estimate_bucket_bounds
    from mm.shards import read_samples
    durations = []
    for sample in read_samples(sources[0].urls[:1], {"bad_shards": 0}):
        try:
            durations.append(float(json.loads(sample["json"])["duration"]))
        except Exception:  # noqa: BLE001 - no declared duration: fall back below
            break
        if len(durations) >= 2000:
            break
    if len(durations) < 20 * num_buckets:
        return [max_seconds * (i + 1) / num_buckets for i in range(num_buckets - 1)]
    return estimate_bucket_bounds(durations, num_buckets)


def check_samples_decode(sources, decode, n: int = 20) -> None:
    """Decode the first n samples of the first shard before training: when none decodes (a wrong language
    set, unreadable audio, a tokenizer that does not fit), stop now, with the reasons, instead of counting
    every sample of the corpus as bad."""
    from mm.shards import read_samples
    errors = []
    for i, sample in enumerate(read_samples(sources[0].urls[:1], {"bad_shards": 0})):
        try:
            decode(sample)
            return
        except Exception as e:  # noqa: BLE001 - collected for the message below
            errors.append(f"{type(e).__name__}: {e}")
        if i + 1 >= n:
            break
    if errors:
        raise SystemExit(f"none of the first {len(errors)} samples of {sources[0].urls[0]} decodes:\n  "
                         + "\n  ".join(errors[:5]))


def train_loss(model, batch: dict, cfg: ASRConfig, precision) -> tuple[torch.Tensor, dict]:
    """Label-smoothed cross-entropy on the decoder (+ ctc_weight x CTC on the encoder): (loss, parts)."""
    with precision.autocast():
        out = model(batch["mel"], batch["tokens"], batch["mel_lengths"], return_encoder=True)
    labels = batch["labels"]
    ce = label_smoothed_ce(out.logits, labels.clamp(min=0), labels >= 0, cfg.label_smoothing)
    if not cfg.ctc_weight:
        return ce, {"ce": ce.detach()}
    ctc = ctc_loss(out.ctc_logits, out.audio_mask, batch["ctc_targets"], batch["ctc_lengths"])
    return (1 - cfg.ctc_weight) * ce + cfg.ctc_weight * ctc, {"ce": ce.detach(), "ctc": ctc.detach()}


# ---------------------------------------------------------------------------- main

def main(argv: list[str]) -> dict:
    d = init_distributed()
    setup_logging(d.is_main)
    try:
        cfg = parse_config(ASRConfig, argv, preset_dir=ROOT / "recipes" / "asr" / "configs")
        check_config(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    t_start = time.perf_counter()

    # --- data, tokenizer, model, optimizer, schedule, precision
    ensure_builtin_data(cfg, d.is_main)
    sources = expand_shard_spec(cfg.train_data, cfg.train_weights)  # fails now, naming the spec, if empty
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer = build_tokenizer(cfg, sources, tokenizer_dir, d.is_main)
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        try:
            pretrained, dims = load_whisper(cfg.init_from)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--init_from: {e}")
        # a new CTC head over the text tokens (Whisper checkpoints have none) + the checkpoint's weights
        model = Whisper(dims, ctc=cfg.ctc_weight > 0, ctc_vocab=tokenizer.eot)
        missing, unexpected = model.load_state_dict(pretrained.state_dict(), strict=False)
        if unexpected or any(not k.startswith("ctc_head.") for k in missing):
            raise SystemExit(f"{cfg.init_from}: weights do not fit the model: missing {missing}, unexpected {unexpected}")
        del pretrained
    else:
        dims = dims_for(cfg.model, n_vocab=tokenizer.vocab_size, n_mels=cfg.n_mels)
        model = Whisper(dims, ctc=cfg.ctc_weight > 0, ctc_vocab=tokenizer.eot)  # CTC over the text tokens
    model = model.to(d.device)
    pad_to_30s = cfg.pad_to_30s == "true" or (cfg.pad_to_30s == "auto" and cfg.init_from is not None)
    # fused AdamW: one kernel for all parameters (3x faster than foreach on CPU, also on GPU)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, fused=True)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    precision = make_precision(cfg.precision, d.device)

    # --- resume (or not): everything that decides which samples come next, and how they are cut into batches
    data_setup = {k: getattr(cfg, k) for k in ("train_data", "train_weights", "seed", "num_workers", "resampled",
                                               "epoch_samples", "shuffle_buffer", "max_batch_seconds", "num_buckets",
                                               "max_seconds", "min_seconds")}
    data_setup["pad_to_30s"] = pad_to_30s
    if cfg.train_data.startswith(SYNTH_DIR):
        data_setup.update(synthetic_per_language=cfg.synthetic_per_language, synthetic_words=cfg.synthetic_words)
    try:
        resumed = resume_train_state(cfg.resume, ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                     data_setup=data_setup, ignore_data=cfg.resume_ignore_data, scaler=precision.scaler)
    except ResumeError as e:
        raise SystemExit(f"resume error: {e}")
    step = resumed.step if resumed else 0
    if d.is_main:
        save_config(cfg, out_dir / "config.yaml")
    train_model = wrap_model(model, d, "ddp")
    train_model = torch.compile(train_model) if cfg.compile else train_model
    log.info("model %s: %.2fM parameters (%s), vocab %d, %s, %d process(es), device %s, precision %s",
             cfg.init_from or cfg.model, sum(p.numel() for p in model.parameters()) / 1e6,
             ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(dims).items()), tokenizer.vocab_size,
             "30 s padded inputs" if pad_to_30s else "duration buckets", d.world_size, d.device, precision.name)

    # --- data: this rank's slice, continuing exactly where the checkpoint left it
    position = LoaderPosition(cfg.num_workers, resumed.data if resumed else None)
    data_seed = resumed.data_seed if resumed else cfg.seed
    decode = asr_decoder(tokenizer, dims.n_mels, train=True, max_seconds=cfg.max_seconds, min_seconds=cfg.min_seconds,
                         pad_to_30s=pad_to_30s, timestamp_prob=cfg.timestamp_prob, speed_factors=cfg.speed_factors,
                         noise_prob=cfg.noise_prob, snr_db=cfg.snr_db, spec_augment_on=cfg.spec_augment,
                         default_language=cfg.default_language, max_target_tokens=min(cfg.max_target_tokens,
                                                                                     dims.n_text_ctx),
                         ctc=cfg.ctc_weight > 0, max_frames=2 * dims.n_audio_ctx)
    check_samples_decode(sources, decode)
    bounds = [] if pad_to_30s else bucket_bounds(sources, cfg.num_buckets, cfg.max_seconds)
    batcher = BucketBatcher(mel_seconds, cfg.max_batch_seconds, bounds)
    dataset = ShardStream(sources, decode, asr_collate(tokenizer.eot), batcher, seed=data_seed, rank=d.rank,
                          world_size=d.world_size, num_workers=cfg.num_workers, resampled=cfg.resampled,
                          shuffle_buffer=cfg.shuffle_buffer, epoch_samples=cfg.epoch_samples or None)
    batches = iter(make_loader(dataset, cfg.num_workers, position))
    metrics = MetricsLogger(out_dir, cfg.tensorboard, cfg.wandb_project, dataclasses.asdict(cfg), enabled=d.is_main,
                            resume_step=step if resumed else None)

    def save(step: int) -> str:
        return str(save_train_state(ckpt_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                    position=position, data_setup=data_setup, config=dataclasses.asdict(cfg),
                                    keep=cfg.keep_checkpoints, data_seed=data_seed, scaler=precision.scaler,
                                    extra={"dims": dataclasses.asdict(dims)}))

    ctc_weight = cfg.eval_ctc_weight if cfg.ctc_weight else 0.0
    beam_size = cfg.eval_beam_size if ctc_weight else 1  # the beam search is the joint one

    def evaluate(final: bool) -> dict:
        """Greedy on the way; the final evaluation by beam search, as ESPnet's and OWSM's (several times slower)."""
        return evaluate_asr(model, tokenizer, cfg.eval_data, d.device, dims.n_mels, cfg.eval_batch_size,
                            cfg.max_seconds, pad_to_30s, cfg.eval_language, rank=d.rank, world_size=d.world_size,
                            autocast=precision.autocast, ctc_weight=ctc_weight, beam_size=beam_size if final else 1,
                            length_bonus=cfg.eval_length_bonus, languages_tried=cfg.eval_languages_tried)

    # --- the loop
    from tqdm import tqdm
    last_ckpt, results = str(resumed.path) if resumed else None, {}
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not d.is_main, dynamic_ncols=True, desc="asr")
    t_last, samples_since, audio_since = time.perf_counter(), 0, 0.0
    while step < cfg.max_steps:
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            batch, batch_state = next(batches)
            position.update(batch_state)
            batch = {k: v.to(d.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with no_sync(train_model, skip=micro < cfg.grad_accum - 1):
                loss, parts = train_loss(train_model, batch, cfg, precision)
                precision.backward(loss / cfg.grad_accum)
            step_loss = step_loss + loss.detach() / cfg.grad_accum
            samples_since += len(batch["texts"]) * d.world_size
            audio_since += sum(batch["durations"]) * d.world_size
        loss_value = float(all_reduce_mean(step_loss))  # the mean over micro-batches and ranks: logged and checked
        check_finite(loss_value, step, last_ckpt)
        result = optimizer_step(train_model.parameters(), optimizer, precision, cfg.grad_clip, step, last_ckpt)
        if not result.skipped:  # an fp16 overflow step changed no weights: the schedule waits for it too
            scheduler.step()
        step += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            row = {"loss": loss_value, **{k: float(v) for k, v in parts.items()}, "lr": scheduler.get_last_lr()[0],
                   "samples_per_s": samples_since / (now - t_last), "audio_s_per_s": audio_since / (now - t_last),
                   "batch_size": len(batch["texts"]), "grad_norm": result.grad_norm, "epoch": position.epoch,
                   "bad_samples": position.bad_samples, "too_long": position.count("too_long"),
                   "bad_shards": position.bad_shards}
            t_last, samples_since, audio_since = now, 0, 0.0
            metrics.log(step, row)
            bar.set_postfix(loss=f"{loss_value:.3f}", sps=f"{row['samples_per_s']:.0f}", bad=position.bad_samples)
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            last_ckpt = save(step)
        if cfg.eval_data and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            results = evaluate(final=step == cfg.max_steps)  # every rank decodes its slice
            metrics.log(step, {k: v for k, v in results.items() if isinstance(v, (int, float))})
            alone = (f" (decoder alone: CER {results['cer_mean_decoder_alone']:.4f})"
                     if "cer_mean_decoder_alone" in results else "")
            how = f"beam {results['eval_beam_size']}" if results["eval_beam_size"] > 1 else "greedy"
            bar.write(f"step {step} ({how}): CER {results['cer_mean']:.4f} (mean over languages), WER "
                      f"{results['wer']:.4f}, LID {results['lid_acc']:.4f}, RTF {results['rtf']:.4f}{alone}")
    bar.close()

    if d.is_main:
        export = out_dir / "export"
        ids = {"decoder_start_token_id": tokenizer.sot, "eos_token_id": tokenizer.eot, "pad_token_id": tokenizer.eot,
               "bos_token_id": tokenizer.eot}
        export_hf(model, export / "hf", tokenizer_dir=tokenizer_dir, **ids)
        export_openai(model, export / "whisper.pt")
        results = {k: v for k, v in results.items() if k != "examples"} | {
            "step": step, "checkpoint": last_ckpt, "export_hf": str(export / "hf"),
            "export_openai": str(export / "whisper.pt"), "bad_samples": position.bad_samples,
            "too_long": position.count("too_long"), "bad_shards": position.bad_shards,
            "wall_s": time.perf_counter() - t_start}
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        metrics.close()
        if "cer" in results:
            print(format_scores(results))
        if "cer_mean_decoder_alone" in results:
            how = (f"beam search ({beam_size} beams, length bonus {cfg.eval_length_bonus:g}) joint with the CTC head "
                   f"(--eval_ctc_weight={cfg.eval_ctc_weight:g})" if beam_size > 1 else
                   f"greedy, joint with the CTC head (--eval_ctc_weight={cfg.eval_ctc_weight:g})")
            lid = (f", the language of a clip unsure of it (P < 0.9) chosen with its transcript among the "
                   f"{cfg.eval_languages_tried} likeliest"
                   if beam_size > 1 and cfg.eval_language == "detect" and cfg.eval_languages_tried > 1 else "")
            print(f"the table: decoded by {how}{lid}; the decoder alone, greedy, as the exports decode in "
                  f"transformers or openai-whisper: CER {results['cer_mean_decoder_alone']:.4f} (mean over "
                  f"languages), WER {results['wer_decoder_alone']:.4f}, LID {results['lid_acc_decoder_alone']:.4f}")
        print(f"checkpoint: {last_ckpt}\nexport: {export / 'hf'} (Hugging Face), {export / 'whisper.pt'} (openai-whisper)")
    close_distributed()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
