"""Benchmark: our vision-chat recipe against TRL's SFTTrainer training a Hugging Face LlavaForConditionalGeneration of
the same dims, from the same weights, on the same conversations, in one run on one machine.

    python benchmarks/vlm_vs_trl.py                                  # 1,200 built-in conversations, batches of 8
    python benchmarks/vlm_vs_trl.py --samples=48 --batch_size=4      # smoke (what the test runs)

Needs `pip install trl` (it brings `datasets`); without it the TRL side is skipped, saying so.

The model, built once and given to both sides:
- vision: a CLIP ViT (transformers' CLIPVisionModel, random init; 64 px, patch 16, so 16 tokens an image), saved as
  a Hugging Face folder: ours loads it with --vision=hf:DIR, LLaVA holds the same config and weights. Tokens from the
  penultimate layer without CLS on both sides (LLaVA's vision_feature_layer=-2, select strategy "default").
- projector: LLaVA's Linear -> GELU -> Linear, with the same initial weights.
- LM: the recipe's tiny Llama dims (hidden 64, 2 layers) with a byte-level BPE trained on the conversations and
  ChatML; TRL's side gets the same template with {% generation %} markers, so both put the loss on the assistant
  turns and their <|im_end|> only.
Ours is the recipe itself, run as users run it (`--init_from` the composed model: packed, mm_varlen, its loader,
train-time random crops); TRL's is SFTTrainer with LLaVA's processor and DataCollatorForVisionLanguageModeling
(right padding, sdpa). Both: on the CPU in fp32, one epoch over the same conversations, batches of --batch_size
examples (ours packs about that many a step: --batch_size x the mean length, at least the longest conversation, so
a batch shorter than that is refused), AdamW (0.9, 0.95), the same lr for every part, warmup (10 steps, at most a
fifth of the run) then cosine to 5%, clip 1.0.
A check before training: on the same 4 conversations, both models give the same loss (same tokens, same labels,
same weights). Reported: examples/s and real (unpadded) tokens/s over the steps after the first few, the ratio,
and each side's mean training loss over the last steps (equal examples seen).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.clip_vs_open_clip import machine  # noqa: E402
from mm.checkpoint import atomic_write  # noqa: E402

IMAGE_SIZE, PATCH = 64, 16
DEFAULT_DATA = "data/vlm_synth"
# ChatML as mm.vlm.lm.CHATML_TEMPLATE renders it (image parts as <image>, parts joined by a newline, as
# mm.vlm.chat.template_messages does), with TRL's {% generation %} markers around each answer and its <|im_end|>.
TRL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% set ns = namespace(text='') %}"
    "{% if message['content'] is string %}{% set ns.text = message['content'] %}"
    "{% else %}{% for part in message['content'] %}"
    "{% if not loop.first %}{% set ns.text = ns.text + '\n' %}{% endif %}"
    "{% if part['type'] == 'image' %}{% set ns.text = ns.text + '<image>' %}"
    "{% else %}{% set ns.text = ns.text + part['text'] %}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ ns.text + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ ns.text + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1200, help="training conversations (the built-in ones, in order)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--skip_steps", type=int, default=3, help="first steps left out of the timing (warm-up)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"a chat data folder with train.jsonl ({DEFAULT_DATA}: made when missing)")
    p.add_argument("--work", default="runs/bench_vlm_vs_trl", help="models, data subset and both runs")
    p.add_argument("--sides", default="mm,trl")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    if unknown := set(sides) - {"mm", "trl"}:
        raise SystemExit(f"--sides: unknown {sorted(unknown)}; sides are mm and trl")
    if args.samples < args.batch_size * (args.skip_steps + 2):
        raise SystemExit(f"--samples={args.samples} leaves too few steps of {args.batch_size} to time after "
                         f"--skip_steps={args.skip_steps}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.data == DEFAULT_DATA:
        from data_tools.synthetic_vlm import ensure_synthetic_vlm
        ensure_synthetic_vlm(args.data)
    elif not (Path(args.data) / "train.jsonl").is_file():
        raise SystemExit(f"--data={args.data}: no train.jsonl there (python -m data_tools.synthetic_vlm --out=DIR)")
    subset = write_subset(Path(args.data) / "train.jsonl", work / "train.jsonl", args.samples)
    export, processor_dir = build_models(subset, work, args.seed)
    steps = args.samples // args.batch_size
    results = {"machine": machine(), "samples": args.samples, "batch_size": args.batch_size, "steps": steps,
               "lr": args.lr, "skip_steps": args.skip_steps}
    if "trl" in sides and not trl_available():
        print("trl side: skipped, trl is not installed (pip install trl)")
        sides.remove("trl")
    lengths, first = decode_ours(export, subset)
    results["tokens"], results["longest"] = sum(lengths), max(lengths)
    # ours packs batch_size x the mean length a step, but never less than --max_tokens (the longest sample):
    # below that it would take more examples a step than TRL's batch
    if args.batch_size * sum(lengths) / len(lengths) < max(lengths):
        raise SystemExit(f"--batch_size={args.batch_size}: {args.batch_size} conversations are fewer tokens than the "
                         f"longest one ({max(lengths)}), so ours would pack more of them a step than TRL's batch; "
                         f"give a larger --batch_size")
    results["warmup_steps"] = min(10, steps // 5)
    if "trl" in sides:
        results["parity_loss"] = check_same_model(export, processor_dir, subset, first)
        print(f"same model: loss on 4 conversations, ours {results['parity_loss']['mm']:.6f}, "
              f"LLaVA {results['parity_loss']['trl']:.6f}")
    for side in sides:
        run = run_mm if side == "mm" else run_trl
        results[side] = run(export, processor_dir, subset, work / side, args, steps, results["longest"])
        print(f"{side}: {results[side]['examples_per_s']:.2f} examples/s, {results[side]['tokens_per_s']:.0f} real "
              f"tokens/s, loss over the last steps {results[side]['final_loss']:.4f}")
    if "mm" in results and "trl" in results:
        results["ratio_examples_per_s"] = results["mm"]["examples_per_s"] / results["trl"]["examples_per_s"]
        print(f"ours / TRL: {results['ratio_examples_per_s']:.2f}x examples/s")
    atomic_write(work / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    return results


def trl_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("trl") is not None


def write_subset(source: Path, out: Path, n: int) -> Path:
    """The first n conversations, image paths made absolute (the subset lives elsewhere)."""
    lines = []
    with open(source, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            for message in record["messages"]:
                for part in message["content"] if isinstance(message["content"], list) else []:
                    if part.get("type") == "image_url":
                        part["image_url"]["url"] = str((source.parent / part["image_url"]["url"]).resolve())
            lines.append(json.dumps(record))
            if len(lines) == n:
                break
    if len(lines) < n:
        raise SystemExit(f"{source} has {len(lines)} conversations, fewer than --samples={n}")
    atomic_write(out, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return out


def build_models(subset: Path, work: Path, seed: int) -> tuple[Path, Path]:
    """The CLIP tower folder, the LM folder (weights, tokenizer, ChatML), our composed export (what --init_from
    takes) and the LLaVA processor folder. Returns (export, processor folder)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlavaProcessor

    from mm.vlm.lm import load_lm
    from mm.vlm.model import build_vlm, save_vlm
    from mm.vlm.vision import load_vision_tower
    from recipes.vlm.train import training_texts

    torch.manual_seed(seed)
    vision_dir, lm_dir = work / "vision", work / "lm"
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64,
                                            intermediate_size=256, num_hidden_layers=3, num_attention_heads=4))
    clip.save_pretrained(vision_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.save_pretrained(vision_dir)
    lm, tokenizer = load_lm("tiny", texts=training_texts([str(subset)]), vocab_size=1024, tokenizer_dir=lm_dir)
    lm.save_pretrained(lm_dir)
    model = build_vlm(load_vision_tower(f"hf:{vision_dir}", layer=-2), lm, tokenizer)  # adds <image>
    tokenizer.save_pretrained(lm_dir)
    export = save_vlm(model, tokenizer, work / "export", {"max_context": 512})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>", chat_template=TRL_TEMPLATE)
    processor.save_pretrained(work / "processor")
    return export, work / "processor"


def llava_from(export: Path):
    """LlavaForConditionalGeneration holding our export's weights: tower, projector and LM."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from mm.vlm.model import load_vlm
    ours, tokenizer, _ = load_vlm(export, attn_implementation="sdpa")
    lm = ours.lm
    config = LlavaConfig(vision_config=CLIPVisionConfig(**ours.vision.config["hf_config"]).to_dict(),
                         text_config=lm.config.to_dict(), image_token_id=ours.image_token_id,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=ours.tokens_per_image,
                         tie_word_embeddings=lm.config.tie_word_embeddings)
    config.text_config.model_type = "llama"
    llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower.load_state_dict(ours.vision.backbone.state_dict())
    projector = llava.model.multi_modal_projector
    projector.linear_1.load_state_dict(ours.projector.net[0].state_dict())
    projector.linear_2.load_state_dict(ours.projector.net[2].state_dict())
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    llava.config.text_config._attn_implementation = "sdpa"
    return llava, ours, tokenizer


def trl_examples(subset: Path, n: int | None = None) -> list[dict]:
    """Our chat JSONL -> TRL's vision rows: {"images": [PIL], "messages": [...]} with {"type": "image"} parts."""
    from PIL import Image
    rows = []
    with open(subset, encoding="utf-8") as f:
        for line in f:
            record, images, messages = json.loads(line), [], []
            for message in record["messages"]:
                content = message["content"]
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
                for part in [] if isinstance(content, str) else content:
                    if part["type"] == "image_url":
                        images.append(Image.open(part["image_url"]["url"]).convert("RGB"))
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": part["text"]})
                messages.append({"role": message["role"], "content": parts})
            rows.append({"images": images, "messages": messages})
            if n is not None and len(rows) == n:
                break
    return rows


def decode_ours(export: Path, subset: Path, keep: int = 4) -> tuple[list[int], list[dict]]:
    """Every conversation as ours tokenises it (eval transform): (each one's token count, images counted as their
    tokens; the first `keep` decoded samples). TRL's side counts the same tokens from its collator's masks, and
    check_same_model scores the kept samples."""
    from mm.shards import read_samples
    from mm.vlm.data import vlm_decoder
    from mm.vlm.model import load_vlm
    from mm.vlm.vision import image_transform

    model, tokenizer, _ = load_vlm(export)
    decode = vlm_decoder(tokenizer, image_transform(model.vision, train=False), image_tokens=model.tokens_per_image,
                         max_tokens=512)
    lengths, kept = [], []
    for raw in read_samples([str(subset)], {}):
        sample = decode(raw)
        lengths.append(len(sample["input_ids"]))
        if len(kept) < keep:
            kept.append(sample)
    return lengths, kept


@torch.no_grad()
def check_same_model(export: Path, processor_dir: Path, subset: Path, samples: list[dict]) -> dict:
    """Both sides' loss on the first conversations: ours (`samples`, decode_ours': our tokenisation, labels and eval
    transform, padded) and LLaVA's (TRL's collator). Equal losses mean the same tokens, labels, pixels and weights."""
    from transformers import AutoProcessor
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from mm.vlm.model import batch_loss, pad_batch

    llava, ours, tokenizer = llava_from(export)
    total, count = batch_loss(ours.eval(), pad_batch(samples, tokenizer.pad_token_id))
    collator = DataCollatorForVisionLanguageModeling(AutoProcessor.from_pretrained(processor_dir),
                                                     assistant_only_loss=True)
    batch = collator(trl_examples(subset, len(samples)))
    theirs = float(llava.eval()(**batch).loss)
    mine = float(total / count)
    if abs(mine - theirs) > 1e-3 * max(1.0, abs(mine)):
        raise SystemExit(f"not the same model: on the same {len(samples)} conversations ours gives loss {mine:.6f}, LLaVA "
                         f"{theirs:.6f} (tokens, labels, pixels or weights differ)")
    return {"mm": mine, "trl": theirs}


def run_mm(export: Path, processor_dir: Path, subset: Path, out: Path, args, steps: int, longest: int) -> dict:
    """The recipe, as a user runs it, from our export of the shared initial weights."""
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "recipes" / "vlm" / "train.py"), f"--init_from={export}",
           f"--train_data={subset}", "--eval_data=none", f"--out_dir={out}", f"--batch_size={args.batch_size}",
           "--n_epochs=1", f"--max_steps={steps}", "--lr_multiplier=1", f"--lr={args.lr}",
           f"--lr_projector={args.lr}", f"--lr_vision={args.lr}", f"--warmup_steps={min(10, steps // 5)}",
           "--log_every=1", "--tensorboard=false", f"--ckpt_every={steps}", f"--max_tokens={longest}",
           "--precision=fp32", f"--seed={args.seed}", "--freeze_vision=false"]  # the tower trains, as TRL's
    # on the CPU, as TRL's side (use_cpu=True): on a GPU machine ours would otherwise take the GPU and bf16
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    rows = [r for r in rows if "loss" in r]  # log_every=1: one row a step, its rates over that step
    seconds = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    timed = list(zip(rows[1:], seconds))[max(0, args.skip_steps - 1):]  # steps skip_steps + 1 .. the last, as TRL's
    total = sum(dt for _, dt in timed)
    examples = sum(r["samples_per_s"] * dt for r, dt in timed)
    return {"examples_per_s": examples / total, "examples_per_step": examples / len(timed),
            "tokens_per_s": sum(r["tokens_per_s"] * dt for r, dt in timed) / total, "timed_steps": len(timed),
            "final_loss": _tail_mean([r["loss"] for r in rows]), "losses": [r["loss"] for r in rows]}


def run_trl(export: Path, processor_dir: Path, subset: Path, out: Path, args, steps: int, longest: int) -> dict:
    """TRL's SFTTrainer on LlavaForConditionalGeneration with LLaVA's processor and TRL's vision collator."""
    from datasets import Dataset
    from transformers import AutoProcessor, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    llava, _, _ = llava_from(export)
    processor = AutoProcessor.from_pretrained(processor_dir)
    dataset = Dataset.from_list(trl_examples(subset))
    clock = []

    class Clock(TrainerCallback):
        def on_step_end(self, train_args, state, control, **kwargs):
            clock.append(time.perf_counter())

    tokens, padded = [], []

    config = SFTConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=steps,
                       learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr",
                       lr_scheduler_kwargs={"min_lr_rate": 0.05}, warmup_steps=min(10, steps // 5), adam_beta2=0.95,
                       weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                       assistant_only_loss=True, max_length=512, use_cpu=True, bf16=False, fp16=False,
                       dataloader_num_workers=0, seed=args.seed, data_seed=args.seed, remove_unused_columns=False)
    trainer = SFTTrainer(model=llava, args=config, train_dataset=dataset, processing_class=processor)
    collator_call = trainer.data_collator.__call__

    def counting(examples):
        batch = collator_call(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        padded.append(batch["attention_mask"].numel())
        return batch
    trainer.data_collator = counting
    trainer.add_callback(Clock())
    start = time.perf_counter()
    trainer.train()
    clock.insert(0, start)
    skip = args.skip_steps
    seconds = clock[-1] - clock[skip]
    timed_steps = len(clock) - 1 - skip
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"examples_per_s": timed_steps * args.batch_size / seconds, "tokens_per_s": sum(tokens[skip:]) / seconds,
            "timed_steps": timed_steps, "examples_per_step": float(args.batch_size), "final_loss": _tail_mean(losses),
            "losses": losses, "tokens": sum(tokens),
            "padding": 1 - sum(tokens) / max(1, sum(padded))}


def _tail_mean(values: list[float], n: int = 20) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


if __name__ == "__main__":
    main()
