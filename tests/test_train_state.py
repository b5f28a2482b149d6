"""mm/train_state.py: save and resume as library functions. One process here; 2 gloo processes for the
broadcast resume choice, per-rank data and RNG, and an FSDP2-sharded model through
torch.distributed.checkpoint."""
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mm import checkpoint as ckpt
from mm.optim import warmup_cosine
from mm.shards import LoaderPosition
from mm.train_state import ResumeError, load_model_weights, resume_train_state, save_train_state

SETUP = {"train_data": "data/x/{0..9}.tar", "seed": 0, "num_workers": 2}


def make_parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, warmup_cosine(opt, 2, 10)


def train_steps(model, opt, sched, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def position(batches=5):
    pos = LoaderPosition(2)
    for i in range(batches):
        pos.update({"worker": i % 2, "epoch": 0, "position": 10 * i, "held": [[0, 10 * i - 1]], "bad_samples": i,
                    "bad_shards": 0, "too_long": 0, "keys": ["x"]})
    return pos


def save(tmp_path, step, model, opt, sched, keep=0, setup=SETUP):
    return save_train_state(tmp_path, step, model=model, optimizer=opt, scheduler=sched, position=position(),
                            data_setup=setup, config={"lr": 0.1}, keep=keep, extra={"model_cfg": {"width": 8}})


def test_save_then_resume_restores_every_piece(tmp_path):
    model, opt, sched = make_parts()
    train_steps(model, opt, sched, 3)
    random.seed(123)
    torch.manual_seed(456)
    path = save(tmp_path, 3, model, opt, sched)
    expect_rng = (random.random(), torch.rand(2))

    model2, opt2, sched2 = make_parts(seed=99)
    resumed = resume_train_state("latest", tmp_path, model=model2, optimizer=opt2, scheduler=sched2, data_setup=SETUP)
    assert (resumed.step, resumed.path, resumed.data_seed) == (3, path, 0)
    assert resumed.data == position().state_dict() and resumed.extra == {"model_cfg": {"width": 8}}
    assert (random.random(), torch.rand(2))[0] == expect_rng[0]
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    train_steps(model, opt, sched, 2, seed=5)  # and training on from both gives the same weights
    train_steps(model2, opt2, sched2, 2, seed=5)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    saved = ckpt.load_checkpoint(path)
    assert saved["data_setup"] == {**SETUP, "world_size": 1} and saved["config"] == {"lr": 0.1}


def test_fresh_run_and_refusal_to_reuse_a_run_folder(tmp_path):
    model, opt, sched = make_parts()
    assert resume_train_state(None, tmp_path, model=model, optimizer=opt, scheduler=sched, data_setup=SETUP) is None
    assert resume_train_state("latest", tmp_path, model=model, optimizer=opt, scheduler=sched, data_setup=SETUP) is None
    save(tmp_path, 1, model, opt, sched)
    with pytest.raises(ResumeError, match="already holds checkpoints. Continue that run with --resume=latest"):
        resume_train_state(None, tmp_path, model=model, optimizer=opt, scheduler=sched, data_setup=SETUP)


@pytest.mark.parametrize("change, words", [
    ({"num_workers": 4}, "num_workers 2 -> 4"),
    ({"seed": 1}, "seed 0 -> 1"),
    ({"train_data": "data/y.tar"}, "train_data 'data/x/{0..9}.tar' -> 'data/y.tar'"),
])
def test_changed_data_setup_stops_the_resume_naming_the_difference(tmp_path, change, words):
    model, opt, sched = make_parts()
    save(tmp_path, 4, model, opt, sched)
    with pytest.raises(ResumeError, match=f"another data setup: {words}.*--resume_ignore_data"):
        resume_train_state("latest", tmp_path, model=model, optimizer=opt, scheduler=sched, data_setup={**SETUP, **change})
    resumed = resume_train_state("latest", tmp_path, model=model, optimizer=opt, scheduler=sched,
                                 data_setup={**SETUP, **change}, ignore_data=True)
    assert resumed.step == 4 and resumed.data is None  # weights etc. kept, the data starts afresh
    assert resumed.data_seed == {**SETUP, **change}["seed"] + 4  # not the order of step 0 again


def test_resume_skips_a_truncated_newest_checkpoint_and_cleans_orphans(tmp_path, caplog):
    model, opt, sched = make_parts()
    save(tmp_path, 1, model, opt, sched)
    save(tmp_path, 2, model, opt, sched)
    newest = tmp_path / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    (tmp_path / ".step_00000003.pt.x.tmp").write_bytes(b"half")
    resumed = resume_train_state("latest", tmp_path, model=model, optimizer=opt, scheduler=sched, data_setup=SETUP)
    assert resumed.step == 1 and "skipping checkpoint" in caplog.text and "step_00000002.pt" in caplog.text
    assert not (tmp_path / ".step_00000003.pt.x.tmp").exists()
    set_aside = tmp_path / "step_00000002.pt.unusable"  # no longer a checkpoint: not kept, its step writable again
    assert set_aside.exists() and [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    with pytest.raises(ResumeError, match="truncated or corrupt"):  # an explicit file is used or refused as it is
        resume_train_state(str(set_aside), tmp_path, model=model, optimizer=opt, scheduler=sched, data_setup=SETUP)
    assert set_aside.exists()


def test_the_current_config_decides_hyperparameters_on_resume(tmp_path, caplog):
    """A resumed run with a longer schedule and another lr and weight decay gets them (with a warning);
    the optimizer's moments and the schedule's position come from the checkpoint."""
    model, opt, sched = make_parts()
    train_steps(model, opt, sched, 3)
    save(tmp_path, 3, model, opt, sched)
    model2, _, _ = make_parts()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.05, weight_decay=0.3)
    sched2 = warmup_cosine(opt2, 2, 40)
    resume_train_state("latest", tmp_path, model=model2, optimizer=opt2, scheduler=sched2, data_setup=SETUP)
    assert opt2.param_groups[0]["weight_decay"] == 0.3 and sched2.base_lrs == [0.05]
    assert sched2.lr_lambdas[0].total == 40 and sched2.last_epoch == 3
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert "weight_decay 0.01 -> 0.3" in caplog.text and "schedule" in caplog.text


def test_a_crafted_checkpoint_is_refused_by_resume_and_runs_nothing(tmp_path):
    from tests.test_checkpoint import Payload
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "step": 1, "scheduler": Payload(marker)}, tmp_path / "step_00000001.pt")
    model, opt, sched = make_parts()
    with pytest.raises(ResumeError, match="could run code"):
        resume_train_state("latest", tmp_path, model=model, optimizer=opt, scheduler=sched, data_setup=SETUP)
    assert not marker.exists()


# ---------------------------------------------------------------- 2 processes (gloo)

def _worker(rank, world, root, sharded):
    os.environ.update(MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=world)
    _run(rank, root, sharded)  # its models (DDP's reducer holds the process group) are gone once it returns
    dist.barrier()
    dist.destroy_process_group()


def _parts(sharded, seed=0):
    """(model, what the training step calls: FSDP2 shards the model in place, DDP wraps it; opt, sched)."""
    model, opt, sched = make_parts(seed)
    if not sharded:
        return model, torch.nn.parallel.DistributedDataParallel(model), opt, sched
    from mm.distributed import Dist, wrap_model
    wrap_model(model, Dist(dist.get_rank(), 2, 0, torch.device("cpu")), "fsdp", block_types=[torch.nn.Linear])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, model, opt, warmup_cosine(opt, 2, 10)


def _run(rank, root, sharded):
    """Train 3 steps, save; each rank on its own data; then rebuild from other seeds and resume."""
    ckpt_dir = f"{root}/ckpt"
    model, step_model, opt, sched = _parts(sharded)
    train_steps(step_model, opt, sched, 3, seed=rank)  # each rank its own batches; gradients averaged
    pos = LoaderPosition(1)
    pos.update({"worker": 0, "epoch": 0, "position": 7 + rank, "held": [], "bad_samples": rank, "bad_shards": 0,
                "too_long": 0, "keys": []})
    torch.manual_seed(1000 + rank)
    path = save_train_state(ckpt_dir, 3, model=model, optimizer=opt, scheduler=sched, position=pos,
                            data_setup=SETUP, config={}, keep=1)
    expect = torch.rand(3)
    if rank == 1:  # rank 1's own look at the folder would pick a decoy; only rank 0's choice may count
        ckpt.resume_candidates = lambda *args: [ckpt.Path(f"{root}/decoy/step_00000009.pt")]
    model2, step_model2, opt2, sched2 = _parts(sharded, seed=50 + rank)
    resumed = resume_train_state("latest", ckpt_dir, model=model2, optimizer=opt2, scheduler=sched2, data_setup=SETUP)
    got = torch.rand(3)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model2.state_dict().items()}
    train_steps(step_model, opt, sched, 2, seed=9 + rank)
    train_steps(step_model2, opt2, sched2, 2, seed=9 + rank)
    same = all(torch.equal(a.full_tensor() if hasattr(a, "full_tensor") else a,
                           b.full_tensor() if hasattr(b, "full_tensor") else b)
               for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    torch.save({"path": str(path), "resumed_path": str(resumed.path), "step": resumed.step, "data": resumed.data,
                "rng_ok": torch.equal(expect, got), "same": same, "full": full},
               f"{root}/rank{rank}.pt")


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "fsdp"])
def test_two_ranks_save_and_resume_each_their_own_state(tmp_path, sharded):
    mp.spawn(_worker, args=(2, str(tmp_path), sharded), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["path"] == r1["path"] == r0["resumed_path"] == r1["resumed_path"]
    assert r0["step"] == r1["step"] == 3
    assert r0["data"]["workers"][0]["position"] == 7 and r1["data"]["workers"][0]["position"] == 8  # own data
    assert r0["rng_ok"] and r1["rng_ok"]  # each rank's own RNG
    assert r0["same"] and r1["same"]  # training on from the resumed state equals training on uninterrupted
    saved = tmp_path / "ckpt" / "step_00000003"
    if sharded:  # each rank wrote its own shard; no rank gathered the whole model to save it
        assert saved.is_dir() and sorted(p.name for p in saved.iterdir()) == [
            ".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"]
        weights, rest = load_model_weights(saved)  # and one process can read it back whole, for export
        for k, v in r0["full"].items():
            torch.testing.assert_close(weights[k], v)
        assert rest["step"] == 3 and [d["workers"][0]["position"] for d in rest["data"]] == [7, 8]
    else:
        assert (tmp_path / "ckpt" / "step_00000003.pt").is_file()
