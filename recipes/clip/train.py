"""Contrastive image-text pretraining (CLIP / SigLIP) on WebDataset shards.

    python recipes/clip/train.py                                  # built-in synthetic data, small model, CPU ok
    python recipes/clip/train.py --config=vit_b32 --train_data='/data/laion/{00000..09999}.tar'
    torchrun --nproc_per_node=8 recipes/clip/train.py --config=vit_b32 ...   # or accelerate launch
    python recipes/clip/train.py --resume=latest                  # continue a killed run, same samples
    python recipes/clip/train.py --help                           # every key, its type, default and meaning
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

from mm.batching import FixedBatcher  # noqa: E402
from mm.clip.data import split_train_transform, token_collate  # noqa: E402
from mm.clip.evaluate import evaluate_clip  # noqa: E402
from mm.clip.model import clamp_logit_scale, create_clip, export_clip, lock_image_tower  # noqa: E402
from mm.clip.step import contrastive_backward  # noqa: E402
from mm.config import ConfigError, parse_config, save_config  # noqa: E402
from mm.decoders import pair_decoder  # noqa: E402
from mm.distributed import all_reduce_mean, barrier, close_distributed, init_distributed, wrap_model  # noqa: E402
from mm.losses import contrastive_accuracy  # noqa: E402
from mm.metrics import MetricsLogger, append_jsonl, setup_logging, truncate_jsonl  # noqa: E402
from mm.optim import param_groups, warmup_cosine  # noqa: E402
from mm.precision import check_finite, make_precision, optimizer_step  # noqa: E402
from mm.shards import LoaderPosition, ShardStream, check_stream_config, expand_shard_spec, make_loader  # noqa: E402
from mm.train_state import ResumeError, full_state_dict, resume_train_state, save_train_state  # noqa: E402

log = logging.getLogger("mm.clip")
SYNTH_DIR = "data/clip_synth"


@dataclass
class CLIPConfig:
    # --- data
    train_data: str = f"{SYNTH_DIR}/train"  # shard spec: path/folder/URL/pipe:, {000..099} braces, sources joined by ::
    train_weights: list[float] | None = None  # one weight per :: source (resampled mode only)
    val_data: str | None = f"{SYNTH_DIR}/val"  # held-out image-caption shards for retrieval recall (none: skip)
    zeroshot_data: str | None = f"{SYNTH_DIR}/zeroshot"  # labelled shards + classnames.json + templates.json (none: skip)
    synthetic_train: int = 32000  # samples of built-in data to generate when train_data is the built-in path
    resampled: bool = False  # draw shards with replacement (infinite stream) instead of epoch passes
    epoch_samples: int = 0  # samples per epoch across all ranks (0: one pass over the shards; resampled needs it)
    shuffle_buffer: int = 2000  # samples held in each worker's shuffle buffer
    num_workers: int = 0  # DataLoader workers per rank (0: in-process, fastest on 2 CPU cores)
    log_samples: bool = False  # write every trained sample's key to <out_dir>/samples/rank<R>.jsonl (audit)
    # --- model
    model: str = "mm-tiny-rn-32"  # open_clip model name (ViT-B-32, ...), one of mm/clip/model_configs, or a .json path
    pretrained: str | None = None  # local open_clip checkpoint file to start from
    loss: Literal["clip", "siglip"] = "clip"  # clip (softmax InfoNCE) or siglip (sigmoid)
    lock_image: bool = False  # LiT: freeze the image tower
    grad_checkpointing: bool = False  # trade compute for activation memory
    compile: bool = False  # torch.compile the model
    channels_last: bool = True  # NHWC images and conv weights: ~20% faster conv towers on CPU (and on GPUs)
    # --- optimisation
    batch_size: int = 128  # per process, per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step, together ONE contrastive batch of grad_accum x batch_size
    max_steps: int = 550  # optimizer steps
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.02  # final lr as a fraction of the peak
    warmup_steps: int = 30  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on weight matrices (not norms, biases, embeddings, logit scale)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.98  # AdamW beta2
    eps: float = 1e-6  # AdamW epsilon
    grad_clip: float = 1.0  # max global grad norm (0: off)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU; fp16 uses a loss scaler
    seed: int = 0  # model init, data order and augmentation
    # --- run
    out_dir: str = "runs/clip"  # checkpoints, metrics.jsonl, tensorboard/, export/, config.yaml
    resume: str | None = None  # "latest" or a checkpoint path; required to reuse an out_dir with checkpoints
    resume_ignore_data: bool = False  # resume weights/optimizer/schedule but start the data afresh (new data or setup)
    ckpt_every: int = 275  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    eval_every: int = 275  # steps between evaluations (0: only at the end)
    log_every: int = 20  # steps between metrics.jsonl rows
    tensorboard: bool = True  # also log to <out_dir>/tensorboard
    wandb_project: str | None = None  # log to this wandb project (needs `pip install wandb`)


def check_config(cfg: CLIPConfig, world_size: int = 1) -> None:
    """What the types cannot say. (Allowed values of loss and precision are in their types.)"""
    check_stream_config(cfg)
    for key in ("batch_size", "grad_accum", "max_steps", "ckpt_every", "log_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be >= 1, got {getattr(cfg, key)}")


def ensure_builtin_data(cfg: CLIPConfig, image_size: int, is_main: bool) -> None:
    """Generate the synthetic shards when the config points at them and they are not there yet, rendered
    at the model's input size (pre-resized: nothing to shrink while training)."""
    if cfg.train_data.startswith(SYNTH_DIR) and is_main:
        from data_tools.synthetic_clip import ensure_synthetic_clip
        info = ensure_synthetic_clip(SYNTH_DIR, train=cfg.synthetic_train, image_size=image_size)
        log.info("built-in data in %s: %s", SYNTH_DIR, info)
    barrier()


def evaluate(cfg: CLIPConfig, model, preprocess, tokenizer, device) -> dict[str, float]:
    model.eval()
    out = evaluate_clip(model, preprocess, tokenizer, device, cfg.zeroshot_data, cfg.val_data)
    model.train()
    return out


# ---------------------------------------------------------------------------- main

def main(argv: list[str]) -> dict:
    d = init_distributed()
    setup_logging(d.is_main)
    try:
        cfg = parse_config(CLIPConfig, argv, preset_dir=ROOT / "recipes" / "clip" / "configs")
        check_config(cfg, d.world_size)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"

    # --- model, data, optimizer, schedule, precision
    torch.manual_seed(cfg.seed)
    clip = create_clip(cfg.model, cfg.pretrained, siglip=cfg.loss == "siglip")
    size = clip.model.visual.image_size
    ensure_builtin_data(cfg, size if isinstance(size, int) else size[0], d.is_main)
    sources = expand_shard_spec(cfg.train_data, cfg.train_weights)  # fails now, naming the spec, if empty
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = clip.model.to(d.device, memory_format=memory_format)
    if cfg.lock_image:
        lock_image_tower(model)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    # fused AdamW: one kernel for all parameters (3x faster than foreach on CPU here, also on GPU)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, fused=True)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    precision = make_precision(cfg.precision, d.device)

    # --- resume (or not): every piece of train state comes back, or a clear error says why it cannot
    # everything that decides which samples come next (batch size may change: a FixedBatcher holds nothing)
    data_setup = {k: getattr(cfg, k) for k in ("train_data", "train_weights", "seed", "num_workers", "resampled",
                                               "epoch_samples", "shuffle_buffer")}
    if cfg.train_data.startswith(SYNTH_DIR):
        data_setup["synthetic_train"] = cfg.synthetic_train
    try:
        resumed = resume_train_state(cfg.resume, ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                     data_setup=data_setup, ignore_data=cfg.resume_ignore_data, scaler=precision.scaler)
    except ResumeError as e:
        raise SystemExit(f"resume error: {e}")
    step = resumed.step if resumed else 0
    if d.is_main:
        save_config(cfg, out_dir / "config.yaml")
    # DDP: CLIP towers fit on one GPU; FSDP (wrap_model(..., "fsdp")) is for the multi-billion LMs of vision chat,
    # and FSDP2 cannot shard open_clip's 0-dim logit_scale
    train_model = wrap_model(model, d, "ddp")
    train_model = torch.compile(train_model) if cfg.compile else train_model
    log.info("model %s: %.2fM parameters, loss=%s, %d process(es), device %s, precision %s",
             cfg.model, sum(p.numel() for p in model.parameters()) / 1e6, cfg.loss, d.world_size, d.device, precision.name)

    # --- data: this rank's slice, continuing exactly where the checkpoint left it
    position = LoaderPosition(cfg.num_workers, resumed.data if resumed else None)
    data_seed = resumed.data_seed if resumed else cfg.seed
    train_transform, finish_images = split_train_transform(clip.preprocess_train)  # uint8 crops; normalised per batch
    dataset = ShardStream(sources, pair_decoder(train_transform), token_collate(clip.tokenizer),
                          FixedBatcher(cfg.batch_size), seed=data_seed, rank=d.rank, world_size=d.world_size,
                          num_workers=cfg.num_workers, resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer,
                          epoch_samples=cfg.epoch_samples or None)
    batches = iter(make_loader(dataset, cfg.num_workers, position))
    metrics = MetricsLogger(out_dir, cfg.tensorboard, cfg.wandb_project, dataclasses.asdict(cfg), enabled=d.is_main,
                            resume_step=step if resumed else None)
    keys_log = out_dir / "samples" / f"rank{d.rank}.jsonl" if cfg.log_samples else None
    if keys_log is not None:
        keys_log.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(keys_log, step)

    def save(step: int) -> str:
        return str(save_train_state(ckpt_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                    position=position, data_setup=data_setup, config=dataclasses.asdict(cfg),
                                    keep=cfg.keep_checkpoints, data_seed=data_seed, scaler=precision.scaler,
                                    extra={"model_cfg": clip.model_cfg}))

    # --- the loop
    from tqdm import tqdm
    last_ckpt, results = str(resumed.path) if resumed else None, {}
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not d.is_main, dynamic_ncols=True, desc="clip")
    t_last, samples_since = time.perf_counter(), 0
    while step < cfg.max_steps:
        micro = []
        for _ in range(cfg.grad_accum):
            (images, texts), batch_state = next(batches)
            position.update(batch_state)
            if keys_log is not None:
                append_jsonl(keys_log, {"step": step + 1, "keys": batch_state["keys"]})
            images = finish_images(images.to(d.device, non_blocking=True)).contiguous(memory_format=memory_format)
            micro.append((images, texts.to(d.device, non_blocking=True)))
            samples_since += len(images) * d.world_size
        loss, out = contrastive_backward(train_model, micro, cfg.loss, precision)
        loss_value = float(all_reduce_mean(loss))  # the mean over ranks: what is logged and checked
        check_finite(loss_value, step, last_ckpt)
        result = optimizer_step(train_model.parameters(), optimizer, precision, cfg.grad_clip, step, last_ckpt)
        if not result.skipped:  # an fp16 overflow step changed no weights: the schedule waits for it too
            scheduler.step()
        clamp_logit_scale(model)
        step += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            sps, t_last, samples_since = samples_since / (now - t_last), now, 0
            row = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "samples_per_s": sps,
                   "logit_scale": float(out["logit_scale"].detach()), "grad_norm": result.grad_norm,
                   "batch_acc": contrastive_accuracy(out["image_features"].float(), out["text_features"].float()),
                   "epoch": position.epoch, "bad_samples": position.bad_samples, "bad_shards": position.bad_shards,
                   **({"fp16_scale": result.scale, "fp16_skipped": precision.skipped_total} if result.scale else {})}
            metrics.log(step, row)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{row['lr']:.2e}", sps=f"{sps:.0f}", bad=position.bad_samples)
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            last_ckpt = save(step)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            results = evaluate(cfg, model, clip.preprocess_val, clip.tokenizer, d.device)  # every rank, sharded
            metrics.log(step, results)
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float)))
    bar.close()

    weights = full_state_dict(model)
    if d.is_main:
        export_dir = export_clip(model, clip.model_cfg, out_dir / "export", weights)
        results.update({"step": step, "checkpoint": last_ckpt, "export": str(export_dir),
                        "bad_samples": position.bad_samples, "bad_shards": position.bad_shards})
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        metrics.close()
        if "zeroshot_top1" in results:
            print(f"final zero-shot top-1: {results['zeroshot_top1']:.4f} (top-5 {results['zeroshot_top5']:.4f})")
        print(f"checkpoint: {last_ckpt}\nexport (open_clip local-dir): {export_dir}")
    close_distributed()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
