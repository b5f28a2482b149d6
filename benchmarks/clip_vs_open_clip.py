"""Benchmark: our CLIP recipe vs open_clip_train, the same training work in one run on one machine.

Both train the same model config on the same WebDataset shards (the built-in synthetic data), with the
same batch size, number of samples, lr / warmup / cosine / weight decay / AdamW / grad clip and precision
(fp32 on CPU, bf16 autocast on GPU), one after the other, never at once. Then both final models are
scored by OUR zero-shot evaluator (mm/clip/evaluate.py) on the same held-out zero-shot shards.

    python benchmarks/clip_vs_open_clip.py --quick                 # smoke run, ~1 minute on 2 idle CPU cores
    python benchmarks/clip_vs_open_clip.py --wait_idle=600         # the recorded run: ~3 minutes a side on 2 cores
    python benchmarks/clip_vs_open_clip.py --mfu --model=ViT-B-32  # count training FLOPs/sample only, no training
    # GPU: bf16 autocast on both sides, MFU against --peak_tflops (default on CUDA: 989, H100 SXM dense bf16)
    python benchmarks/clip_vs_open_clip.py --model=ViT-B-32 --batch_size=256 --samples=59904 --workers=8 --our_workers=8

Throughput is steady state on the same samples for both: the first `--log_every` steps (startup, shuffle
buffer fill, first-touch allocations) are left out of both. Ours: metrics.jsonl `samples_per_s` rows
after the first. open_clip_train: its per-step log lines (`--log-every-n-steps 1`, each reporting
batch_size / that step's time, data loading included) after the same number of steps.
Writes <out>/results.json with every figure, and each side's full log under <out>.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mm.clip.evaluate import evaluate_clip  # noqa: E402
from mm.checkpoint import load_checkpoint  # noqa: E402
from mm.clip.model import MM_MODEL_CONFIGS, create_clip, load_clip  # noqa: E402

SYNTH_ROOT = "data/bench_clip"  # the built-in synthetic data, at the model's image size: data/bench_clip/<size>px
SYNTH_TRAIN = 60000  # one pass covers --samples; generated once per image size

# open_clip_train in a subprocess, with our JSON model configs registered in its model registry first
PEER_SHIM = "benchmarks/open_clip_train_shim.py"
# Nothing may reach the network: the tokenizer is open_clip's bundled BPE, no pretrained weights, no wandb.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false"}
# "Train Epoch: 0 [ 256/40064 (1%)] Data (t): 0.012 Batch (t): 0.431, 297.1/s, 297.1/s/gpu LR: ..."
PEER_STEP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,.* Loss: ([\d.]+)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=53760,
                   help="training samples per side, whole batches, at most one pass over the 60000 train samples")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--model", default="mm-tiny-rn-32",
                   help="open_clip model name or one of ours (mm/clip/model_configs)")
    p.add_argument("--workers", type=int, default=0,
                   help="open_clip_train --workers (0 works, data loads in-process; its fastest on 2 CPU cores)")
    p.add_argument("--our_workers", type=int, default=0, help="our recipe's num_workers (0 is its best CPU setting)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=None, help="default: 10%% of the steps")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--log_every", type=int, default=20,
                   help="steps between our metrics rows; also the steps left out of steady state")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak dense TFLOP/s for MFU (default on CUDA: 989, H100 SXM bf16; on CPU: no MFU)")
    p.add_argument("--wait_idle", type=float, default=0,
                   help="before each side, wait up to this many seconds for other processes to leave the CPU idle")
    p.add_argument("--out", default="runs/bench_clip", help="both runs, their logs and results.json go here")
    p.add_argument("--quick", action="store_true", help="smoke test: 1280 samples at batch 64")
    p.add_argument("--mfu", action="store_true", help="only count training FLOPs per sample for --model and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.batch_size, args.log_every = 1280, 64, 5
    if args.samples > SYNTH_TRAIN:  # open_clip_train ends its (non-resampled) epoch when the shards run out
        p.error(f"--samples={args.samples}: at most {SYNTH_TRAIN}, one pass over the built-in train shards")
    args.steps = args.samples // args.batch_size
    if args.steps <= 2 * args.log_every:
        p.error(f"--samples={args.samples} gives {args.steps} steps; need > {2 * args.log_every} (2 x log_every)")
    args.samples = args.steps * args.batch_size
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)
    return args


# ---------------------------------------------------------------------------- FLOPs and MFU

def count_train_flops_per_sample(model_name: str) -> dict[str, float]:
    """Model FLOPs to train on one (image, caption) pair: 3 x forward (backward ~ 2 x forward).

    Forward FLOPs are counted by torch's FlopCounterMode on a batch of one. Attention runs through the
    math SDPA backend while counting, because the CPU flash kernel has no FLOP formula (it would count 0).
    nn.MultiheadAttention's fused fast path is off while counting, and autograd stays on (either alone keeps an
    eval-mode model off it): the counter does not see that path. Under no_grad, ViT-B-32 counted 11.85 GFLOP
    forward instead of 14.78, none of the image tower's attention blocks (q/k/v, scores, out projection).
    The contrastive loss (B x B logits, O(B * embed_dim) per sample) is left out; it is < 0.1% here.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model, _, _, tokenizer, _ = create_clip(model_name)
    model.eval()  # a batch of one: BatchNorm in train mode refuses a 1x1 feature map of one sample
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images, texts = torch.randn(1, 3, size, size), tokenizer(["a photo of a red circle."])
    counter, fastpath = FlopCounterMode(display=False), torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:
            model(images, texts)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    forward = counter.get_total_flops()
    return {"forward_flops": forward, "train_flops": 3 * forward,
            "params": sum(p.numel() for p in model.parameters())}


def mfu(samples_per_s: float, train_flops: float, peak_tflops: float | None) -> float | None:
    return samples_per_s * train_flops / (peak_tflops * 1e12) if peak_tflops else None


# ---------------------------------------------------------------------------- data

def synth_dir(model_name: str) -> Path:
    """The built-in data rendered at `model_name`'s input size (pre-resized, as the recipe makes it)."""
    size = create_clip(model_name).model.visual.image_size
    return ROOT / SYNTH_ROOT / f"{size if isinstance(size, int) else size[0]}px"


def prepare_train_spec(data: Path) -> str:
    """Generate the built-in shards in `data` if missing; return one brace spec naming every train shard."""
    from data_tools.synthetic_clip import ensure_synthetic_clip
    ensure_synthetic_clip(data, train=SYNTH_TRAIN, image_size=int(data.name[:-2]))
    names = sorted(f.name for f in (data / "train").glob("shard-*.tar"))
    expected = [f"shard-{i:06d}.tar" for i in range(len(names))]
    if names != expected:
        raise SystemExit(f"{data}/train holds {names[:3]}...; expected shard-000000.tar onwards, contiguous")
    return f"{data.relative_to(ROOT)}/train/shard-{{000000..{len(names) - 1:06d}}}.tar"


# ---------------------------------------------------------------------------- the two runs

def busy_cpu_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores, all processes), from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def children_cpu_seconds() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished children and their waited-for workers
    return r.ru_utime + r.ru_stime


def wait_for_idle(max_wait_s: float, busy_cores: float = 0.25, window_s: float = 5.0) -> float:
    """Wait (up to max_wait_s) until other processes keep less than `busy_cores` cores busy over a window.
    Returns the busy cores of the last window."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = busy_cpu_seconds()
        time.sleep(window_s)
        busy = (busy_cpu_seconds() - before) / window_s
        if busy < busy_cores or time.monotonic() >= deadline:
            return busy
        print(f"  waiting for the machine to go idle: other processes use {busy:.2f} cores", flush=True)


def run_logged(cmd: list[str], log_path: Path, wait_idle_s: float) -> dict:
    """Run `cmd` from the repo root with stdout+stderr to `log_path`. Fails with the log's tail.

    Returns wall seconds and `other_cores`: the cores that processes other than this run kept busy
    during it, on average (machine busy CPU time minus the run's own). Above ~0.1 the timings are disturbed.
    """
    if wait_idle_s > 0:
        wait_for_idle(wait_idle_s)
    env = {**os.environ, **OFFLINE_ENV}
    print(f"  $ {' '.join(cmd)}\n  (log: {log_path})", flush=True)
    busy0, own0, t0 = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    with log_path.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    own = children_cpu_seconds() - own0
    other = max(0.0, (busy_cpu_seconds() - busy0 - own) / wall)
    print(f"  {wall:.0f} s wall, {own / wall:.2f} cores busy in the run, {other:.2f} cores busy elsewhere", flush=True)
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"command failed (exit {rc}):\n{tail}")
    return {"wall_s": wall, "cpu_cores_used": own / wall, "other_cores": other}


def run_ours(args, spec: str, precision: str, out: Path) -> dict:
    run_dir = out / "ours"
    cmd = [sys.executable, "recipes/clip/train.py", f"--train_data={spec}", f"--model={args.model}",
           f"--batch_size={args.batch_size}", f"--max_steps={args.steps}", f"--num_workers={args.our_workers}",
           f"--lr={args.lr}", f"--warmup_steps={args.warmup_steps}", "--min_lr_ratio=0",  # open_clip's cosine ends at 0
           f"--weight_decay={args.weight_decay}", "--beta1=0.9", "--beta2=0.98", "--eps=1e-6", "--grad_clip=1.0",
           f"--precision={precision}", "--seed=0", f"--log_every={args.log_every}",
           # like open_clip_train --epochs 1: one checkpoint and one evaluation, both at the end
           f"--ckpt_every={args.steps}", "--eval_every=0", "--val_data=none", "--tensorboard=false",
           f"--zeroshot_data={args.data / 'zeroshot'}",
           f"--out_dir={run_dir}"]
    run = run_logged(cmd, out / "ours.log", args.wait_idle)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "samples_per_s" in r]
    # each row covers the steps since the previous row; leave out the first row (steps 1..log_every)
    windows = [((row["step"] - prev["step"]) * args.batch_size, row["samples_per_s"])
               for prev, row in zip(rows, rows[1:])]
    recipe_results = json.loads((run_dir / "results.json").read_text())
    return {**run, **steady_state(windows), "steps": rows[-1]["step"], "final_loss": rows[-1]["loss"],
            "model_path": str(run_dir), "recipe_zeroshot_top1": recipe_results.get("zeroshot_top1")}


def run_peer(args, spec: str, precision: str, device: str, out: Path) -> dict:
    logs = out / "open_clip_train"
    cmd = [sys.executable, PEER_SHIM, str(MM_MODEL_CONFIGS.relative_to(ROOT)),
           "--train-data", spec, "--dataset-type", "webdataset", "--train-num-samples", str(args.samples),
           "--epochs", "1", "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--model", args.model, "--lr", str(args.lr), "--warmup", str(args.warmup_steps),
           "--wd", str(args.weight_decay), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
           "--grad-clip-norm", "1.0", "--precision", precision, "--device", device, "--seed", "0",
           # per-step log lines are our throughput probe; no --imagenet-val / --val-data: no evaluation;
           # --epochs 1 with the default --save-frequency 1 saves checkpoints/epoch_1.pt at the end
           "--log-every-n-steps", "1", "--report-to", "", "--logs", str(logs), "--name", "bench"]
    run = run_logged(cmd, out / "open_clip_train.log", args.wait_idle)
    per_step, final_loss = [], None  # (step, samples/s of that step's batch, data loading included)
    for line in (logs / "bench" / "out.log").read_text().splitlines():
        m = PEER_STEP_LINE.search(line)
        if m:
            per_step.append((int(m.group(1)) // args.batch_size, float(m.group(2))))
            final_loss = float(m.group(3))
    # the same windows as our metrics rows: steps log_every+1..2*log_every, ..., the rest up to the last step
    windows, n, seconds = [], 0, 0.0
    for step, sps in per_step:
        if step <= args.log_every:
            continue
        n, seconds = n + args.batch_size, seconds + args.batch_size / sps
        if step % args.log_every == 0 or step == args.steps:
            windows.append((n, n / seconds))
            n, seconds = 0, 0.0
    ckpt = logs / "bench" / "checkpoints" / "epoch_1.pt"
    return {**run, **steady_state(windows), "steps": per_step[-1][0], "final_loss": final_loss,
            "model_path": str(ckpt)}


def steady_state(windows: list[tuple[int, float]]) -> dict:
    """(samples, samples/s) per log window -> overall samples/s (total samples / total time), and the
    median window's samples/s, which a burst of load from another process on the machine moves less."""
    samples, seconds = sum(n for n, _ in windows), sum(n / sps for n, sps in windows)
    rates = sorted(sps for _, sps in windows)
    median = (rates[(len(rates) - 1) // 2] + rates[len(rates) // 2]) / 2
    return {"steady_samples": samples, "steady_s": seconds, "samples_per_s": samples / seconds,
            "median_window_samples_per_s": median, "windows": len(windows)}


# ---------------------------------------------------------------------------- evaluation (ours, for both)

def load_peer_model(ckpt_path: str, model_name: str, device):
    """open_clip_train's epoch_N.pt ({"state_dict": ...}, keys maybe 'module.'-prefixed) as an eval model."""
    model, _, pre_val, tokenizer, _ = create_clip(model_name)
    state = load_checkpoint(ckpt_path)["state_dict"]  # weights_only=True: open_clip_train saves plain state
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}
    model.load_state_dict(state)
    return model.to(device).eval(), pre_val, tokenizer


def score(model, preprocess, tokenizer, device, data: Path) -> dict[str, float]:
    """Zero-shot top-1/top-5 on <data>/zeroshot and retrieval R@1 on <data>/val, as the recipe scores."""
    return evaluate_clip(model, preprocess, tokenizer, device, str(data / "zeroshot"), str(data / "val"), recall_ks=(1,))


# ---------------------------------------------------------------------------- report

def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def print_table(res: dict) -> None:
    ours, peer = res["ours"], res["open_clip_train"]
    has_mfu = ours.get("mfu") is not None
    print(f"\n{'':18}{'samples/s':>10}{'median':>9}{'wall s':>8}{'loss':>8}{'zs top1':>9}{'zs top5':>9}"
          f"{'i2t R@1':>9}{'TFLOP/s':>9}{'others':>8}" + (f"{'MFU':>8}" if has_mfu else ""))
    for name, r in (("mm recipe", ours), ("open_clip_train", peer)):
        print(f"{name:18}{r['samples_per_s']:10.1f}{r['median_window_samples_per_s']:9.1f}{r['wall_s']:8.1f}"
              f"{r['final_loss']:8.3f}{r['zeroshot_top1']:9.4f}{r['zeroshot_top5']:9.4f}{r['retrieval_i2t_r@1']:9.4f}"
              f"{r['tflops']:9.4f}{r['other_cores']:8.2f}" + (f"{r['mfu']:8.2%}" if has_mfu else ""))
    print(f"{'ratio ours/peer':18}{res['ratio_samples_per_s']:10.3f}{res['ratio_median_window']:9.3f}"
          f"{res['ratio_wall']:8.3f}")
    cfg = res["config"]
    print(f"\nsamples/s: steady state over the same {ours['steady_samples']} samples each "
          f"(steps {cfg['log_every'] + 1}..{cfg['steps']}); median: the median {cfg['log_every']}-step window.\n"
          f"wall: the whole process, startup included.\n"
          f"others: CPU cores that other processes on the machine kept busy during the run (0 = undisturbed).\n"
          f"{cfg['model']}: {res['flops']['train_flops'] / 1e9:.4f} GFLOP per training sample (3 x forward)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    flops = count_train_flops_per_sample(args.model)
    print(f"{args.model}: {flops['params'] / 1e6:.2f}M parameters, forward {flops['forward_flops'] / 1e9:.4f} GFLOP "
          f"per sample, training {flops['train_flops'] / 1e9:.4f} GFLOP per sample (3 x forward)")
    if args.mfu:
        peak = args.peak_tflops or 989.0
        print(f"at {peak:g} peak TFLOP/s, 100% MFU is {peak * 1e12 / flops['train_flops']:.0f} samples/s; "
              f"MFU = samples/s x {flops['train_flops']:.4g} / {peak * 1e12:.4g}")
        return flops

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    peak = args.peak_tflops or (989.0 if cuda else None)
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    for sub in ("ours", "open_clip_train"):  # both CLIs refuse to reuse a run folder
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    data = args.data = synth_dir(args.model)
    spec = prepare_train_spec(data)
    print(f"{args.samples} samples = {args.steps} steps of {args.batch_size}, warmup {args.warmup_steps}, "
          f"lr {args.lr}, on {device}")

    print("[1/2] mm recipe", flush=True)
    ours = run_ours(args, spec, "bf16" if cuda else "fp32", out)
    print("[2/2] open_clip_train", flush=True)
    peer = run_peer(args, spec, "amp_bf16" if cuda else "fp32", device, out)

    print("scoring both with mm.clip.evaluate on the held-out zero-shot set", flush=True)
    ours.update(score(*load_clip(ours["model_path"], device), device, data))
    peer.update(score(*load_peer_model(peer["model_path"], args.model, device), device, data))
    if ours["recipe_zeroshot_top1"] is not None and abs(ours["recipe_zeroshot_top1"] - ours["zeroshot_top1"]) > 1e-9:
        print(f"warning: the recipe's own zero-shot top-1 {ours['recipe_zeroshot_top1']:.4f} differs from ours here")
    for r in (ours, peer):
        r["tflops"] = r["samples_per_s"] * flops["train_flops"] / 1e12
        r["mfu"] = mfu(r["samples_per_s"], flops["train_flops"], peak)

    res = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("mfu",)}, "command": " ".join(sys.argv),
           "machine": machine(), "device": device, "peak_tflops": peak, "flops": flops,
           "ours": ours, "open_clip_train": peer,
           "ratio_samples_per_s": ours["samples_per_s"] / peer["samples_per_s"],
           "ratio_median_window": ours["median_window_samples_per_s"] / peer["median_window_samples_per_s"],
           "ratio_wall": ours["wall_s"] / peer["wall_s"]}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print_table(res)
    print(f"figures: {out / 'results.json'}")
    return res


if __name__ == "__main__":
    main()
