"""The collectives the recipes use, and evaluation sharded over 2 gloo ranks giving the 1-rank answer."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mm.clip.evaluate import retrieval_recall, zero_shot_accuracy
from mm.distributed import (all_gather_objects, all_reduce_mean, all_reduce_sum, broadcast_from_main,
                            gather_to_main)
from tests.test_evaluate import Identity

N = 9  # items in the toy evaluation: 5 on rank 0, 4 on rank 1


def problem():
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(N, 4, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(feats + 0.8 * torch.randn(N, 4, generator=g), dim=-1)
    labels = torch.randint(0, 6, (N,), generator=g)
    head = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    return feats, texts, labels, head


def evaluate(rank, world):
    feats, texts, labels, head = problem()
    mine = list(range(rank, N, world))  # how iterate_eval_batches shards: item i on rank i % world
    captions = {f"c{i}": texts[i] for i in range(N)}

    def tokenizer(names):
        return torch.stack([captions[n] for n in names])
    zs = zero_shot_accuracy(Identity(), head, [(feats[mine], labels[mine])], "cpu")
    rr = retrieval_recall(Identity(), tokenizer, [(feats[mine], [f"c{i}" for i in mine])], "cpu", ks=(1, 3))
    return {**zs, **rr}


def _worker(rank, world, init, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    got = {
        "mean": float(all_reduce_mean(torch.tensor(float(rank + 1)))),  # (1 + 2) / 2
        "sum": all_reduce_sum({"a": rank, "b": 10 * rank + 1}),
        "gathered": gather_to_main({"rank": rank}),
        "all": all_gather_objects(rank * 3),
        "chosen": broadcast_from_main(f"rank {rank}'s choice"),
        "eval": evaluate(rank, world),
    }
    torch.save(got, f"{out}{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_collectives_and_sharded_evaluation_over_two_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["mean"] == r1["mean"] == 1.5
    assert r0["sum"] == r1["sum"] == {"a": 1.0, "b": 12.0}
    assert r0["gathered"] == [{"rank": 0}, {"rank": 1}] and r1["gathered"] is None
    assert r0["all"] == r1["all"] == [0, 3]
    assert r0["chosen"] == r1["chosen"] == "rank 0's choice"
    alone = evaluate(0, 1)
    assert r0["eval"] == pytest.approx(alone) and r1["eval"] == pytest.approx(alone)  # every rank gets the whole answer
    assert alone["zeroshot_n"] == N
