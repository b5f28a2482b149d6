"""recipes/clip/train.py end to end on tiny data, as a user runs it: a fresh process for the end-to-end run, the
run a test kills and the torchrun launch; the script's main(argv) in this process for the others
(tests.helpers.run_recipe_in_process: the same output and exit status, without a fresh process's imports)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mm.checkpoint import list_checkpoints, load_checkpoint, read_safetensors
from tests.helpers import one_torch_thread  # noqa: F401 - a fixture
from tests.helpers import ROOT, SUBPROCESS_ENV, free_port, png_bytes, run_recipe, run_recipe_in_process, write_tar

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # runs in this process compute as a subprocess's do


def tiny_args(data, out, *extra):
    return ["--config=tiny", f"--train_data={data}/train", f"--val_data={data}/val",
            f"--zeroshot_data={data}/zeroshot", f"--out_dir={out}", *extra]


def run_here(args, check=True):
    return run_recipe_in_process("clip", args, check=check)


def test_end_to_end_writes_everything_and_exports_for_open_clip(synth_data, tmp_path):
    proc = run_recipe(tiny_args(synth_data, tmp_path / "run"))
    out = tmp_path / "run"
    assert "final zero-shot top-1:" in proc.stdout and "checkpoint:" in proc.stdout
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 6]
    assert (out / "config.yaml").read_text().count("model: mm-test-micro") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all(k in train_rows[0] for k in ("lr", "samples_per_s", "logit_scale", "bad_samples"))
    results = json.loads((out / "results.json").read_text())
    assert results["zeroshot_n"] == 72 and {"retrieval_i2t_r@1", "retrieval_t2i_r@5"} <= results.keys()
    from mm.clip.evaluate import evaluate_clip  # the figures are those of the exported model, recomputed
    from mm.clip.model import load_clip
    again = evaluate_clip(*load_clip(out / "export"), "cpu", f"{synth_data}/zeroshot", f"{synth_data}/val")
    assert again == pytest.approx({k: results[k] for k in again})

    import open_clip  # the export is open_clip's own local-dir format
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out / 'export'}")
    ours = load_checkpoint(out / "checkpoints" / "step_00000006.pt")["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ours[k])
    sd, _ = read_safetensors(out / "export" / "open_clip_model.safetensors")
    assert sd.keys() == ours.keys()


def test_killed_run_resumes_to_the_same_weights(synth_data, tmp_path):
    """SIGKILL a run after its first checkpoint, resume with --resume=latest: the final weights equal an
    uninterrupted run's, the samples trained on are the same ones in the same order, and metrics.jsonl
    has one row per step. The killed run is a real process; the others run here."""
    common = ["--max_steps=10", "--ckpt_every=3", "--keep_checkpoints=0", "--num_workers=2", "--batch_size=8",
              "--log_every=1", "--log_samples=true"]
    run_here(tiny_args(synth_data, tmp_path / "full", *common))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "recipes/clip/train.py"), *tiny_args(synth_data, killed, *common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **SUBPROCESS_ENV})
    while not list_checkpoints(killed / "checkpoints") and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [s for s, _ in list_checkpoints(killed / "checkpoints")]
    assert done and done[-1] < 10, f"the run was not killed mid-way (checkpoints {done})"

    refused = run_here(tiny_args(synth_data, killed, *common), check=False)
    assert refused.returncode != 0 and "--resume=latest" in refused.stderr
    run_here(tiny_args(synth_data, killed, *common, "--resume=latest"))
    a = load_checkpoint(tmp_path / "full/checkpoints/step_00000010.pt")
    b = load_checkpoint(killed / "checkpoints/step_00000010.pt")
    assert a["data"] == b["data"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)
    keys = [(tmp_path / "full" / "samples" / "rank0.jsonl").read_text(), (killed / "samples" / "rank0.jsonl").read_text()]
    assert keys[0] == keys[1] and keys[0].count("\n") == 10  # same samples, same order, none twice
    steps = [r["step"] for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 11))  # the steps trained again after the kill are not logged twice


def test_resume_refusals_name_the_problem_and_run_nothing(synth_data, tmp_path):
    """A changed data setup, a crafted checkpoint that would run code, a truncated newest checkpoint (every
    run in this process: what is checked is what the recipe refuses and says)."""
    run = tmp_path / "run"
    run_here(tiny_args(synth_data, run, "--max_steps=4", "--ckpt_every=2", "--keep_checkpoints=0"))
    changed = run_here(tiny_args(synth_data, run, "--max_steps=6", "--num_workers=2", "--resume=latest"), check=False)
    assert changed.returncode != 0 and "num_workers 0 -> 2" in changed.stderr and "--resume_ignore_data" in changed.stderr
    accepted = run_here(tiny_args(synth_data, run, "--max_steps=6", "--num_workers=2", "--resume=latest",
                                  "--resume_ignore_data=true"))
    assert "new data" in accepted.stderr and (run / "checkpoints" / "step_00000006.pt").exists()

    newest = run / "checkpoints" / "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:2000])  # truncated: resume falls back to step 4, saying so
    fallback = run_here(tiny_args(synth_data, run, "--max_steps=6", "--resume=latest"))  # step 4's setup
    assert "skipping checkpoint" in fallback.stderr and "resumed from" in fallback.stderr
    assert "step_00000004.pt at step 4" in fallback.stderr

    from tests.test_checkpoint import Payload
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "step": 9, "rng": Payload(marker)}, run / "checkpoints" / "step_00000009.pt")
    evil = run_here(tiny_args(synth_data, run, "--max_steps=12", "--resume=" + str(run / "checkpoints" / "step_00000009.pt")),
                    check=False)
    assert evil.returncode != 0 and "could run code" in evil.stderr and "Traceback" not in evil.stderr
    assert not marker.exists()


def test_starts_from_a_local_open_clip_checkpoint(synth_data, tmp_path):
    from mm.clip.model import create_clip
    src = create_clip("mm-test-micro")[0]
    with torch.no_grad():
        src.logit_scale.fill_(1.2345)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "start.pt")  # open_clip_train's checkpoint layout
    run_here(tiny_args(synth_data, tmp_path / "run", f"--pretrained={tmp_path / 'start.pt'}", "--max_steps=1",
                       "--lr=0", "--lock_image=true"))
    got = load_checkpoint(tmp_path / "run/checkpoints/step_00000001.pt")["model"]
    assert got["logit_scale"].item() == pytest.approx(1.2345)
    torch.testing.assert_close(got["visual.conv1.weight"], src.state_dict()["visual.conv1.weight"])


def test_siglip_loss_and_corrupt_training_sample(synth_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in (synth_data / "train").glob("*.tar"):
        (data / f.name).write_bytes(f.read_bytes())
    write_tar(data / "zz-bad.tar", [{"__key__": f"b{i}", "png": b"not an image" if i == 0 else png_bytes(size=32),
                                     "txt": "a red square"} for i in range(40)])
    run_here(["--config=tiny", f"--train_data={data}", "--val_data=none", "--zeroshot_data=none", "--loss=siglip",
              "--max_steps=25", "--batch_size=16", f"--out_dir={tmp_path / 'run'}"])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["bad_samples"] == 1  # 25 x 16 = 400 > 360 samples: every shard, the bad one included
    ck = load_checkpoint(tmp_path / "run/checkpoints/step_00000025.pt")
    assert "logit_bias" in ck["model"]


@pytest.mark.parametrize("args, message", [
    (["--bogus=1"], "unknown config key 'bogus'"),
    (["--batch_size=big"], "--batch_size: expected an integer"),
    (["--loss=triplet"], "accepted values are clip, siglip"),
    (["--train_data=/nonexistent/shard-{0..9}.tar"], "/nonexistent/shard-{0..9}.tar"),
])
def test_bad_config_fails_at_start_with_a_message(tmp_path, args, message):
    proc = run_here(["--config=tiny", f"--out_dir={tmp_path}", "--val_data=none", "--zeroshot_data=none", *args],
                    check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synth_data, tmp_path):
    proc = run_here(tiny_args(synth_data, tmp_path / "run", "--max_steps=40", "--ckpt_every=1", "--lr=1e30",
                              "--grad_clip=0", "--warmup_steps=1"), check=False)
    assert proc.returncode != 0 and "NonFiniteLossError" in proc.stderr and "last good checkpoint" in proc.stderr
    saved = list_checkpoints(tmp_path / "run/checkpoints")
    assert saved, "no checkpoint survived"
    state = load_checkpoint(saved[-1][1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert saved[-1][1].name in proc.stderr  # the message names it


def test_two_process_run_with_accumulation_and_checkpointing(synth_data, tmp_path):
    """torchrun with 2 CPU (gloo) ranks: one run, one writer, a data position per rank, and the two ranks
    trained on different samples (their sample logs are disjoint), together the global batch."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                           str(ROOT / "recipes/clip/train.py"), *tiny_args(synth_data, tmp_path / "run"),
                           "--grad_accum=2", "--grad_checkpointing=true", "--max_steps=4", "--log_samples=true"],
                          capture_output=True, text=True, env={**os.environ, **SUBPROCESS_ENV})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("final zero-shot top-1") == 1  # only rank 0 reports
    state = load_checkpoint(tmp_path / "run/checkpoints/step_00000004.pt")
    assert len(state["data"]) == 2 and len(state["rng"]) == 2
    assert [d["batches"] for d in state["data"]] == [8, 8]  # 4 steps x 2 micro-batches on each rank
    keys = [[k for row in map(json.loads, (tmp_path / f"run/samples/rank{r}.jsonl").read_text().splitlines())
             for k in row["keys"]] for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 4 * 2 * 16  # steps x micro-batches x batch_size
    assert not set(keys[0]) & set(keys[1]), "the two ranks trained on the same samples"
    assert len(set(keys[0]) | set(keys[1])) == 256  # 320 samples in the epoch: no sample twice in it
