"""Contrastive losses: 2 processes (gloo) give the same loss and gradients as 1 with the same global batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mm.losses import clip_loss, siglip_loss

GLOBAL_B, D_IN, D = 8, 6, 4


def make_problem():
    """Two linear 'towers' and a fixed global batch; returns (towers, images, texts)."""
    g = torch.Generator().manual_seed(0)
    img_tower, txt_tower = torch.nn.Linear(D_IN, D), torch.nn.Linear(D_IN, D)
    with torch.no_grad():
        for p in [*img_tower.parameters(), *txt_tower.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
    return img_tower, txt_tower, torch.randn(GLOBAL_B, D_IN, generator=g), torch.randn(GLOBAL_B, D_IN, generator=g)


def loss_and_grads(kind, images, texts, img_tower, txt_tower):
    scale, bias = torch.tensor(7.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    img_f, txt_f = F.normalize(img_tower(images), dim=-1), F.normalize(txt_tower(texts), dim=-1)
    loss = clip_loss(img_f, txt_f, scale) if kind == "clip" else siglip_loss(img_f, txt_f, scale, bias)
    loss.backward()
    grads = [p.grad for p in [*img_tower.parameters(), *txt_tower.parameters()]] + [scale.grad]
    if kind == "siglip":
        grads.append(bias.grad)
    return loss.detach(), grads


def _worker(rank, world, kind, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    img_tower, txt_tower, images, texts = make_problem()
    b = GLOBAL_B // world
    loss, grads = loss_and_grads(kind, images[rank * b:(rank + 1) * b], texts[rank * b:(rank + 1) * b], img_tower, txt_tower)
    for t in [loss, *grads]:  # what DDP does with gradients (and what we log for the loss): the mean over ranks
        dist.all_reduce(t)
        t /= world
    if rank == 0:
        torch.save([loss, *grads], out_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_processes_equal_one(kind, tmp_path):
    img_tower, txt_tower, images, texts = make_problem()
    ref_loss, ref_grads = loss_and_grads(kind, images, texts, img_tower, txt_tower)

    mp.spawn(_worker, args=(2, kind, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    loss, *grads = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_clip_loss_is_low_for_matching_pairs_and_symmetric():
    f = F.normalize(torch.randn(16, 8), dim=-1)
    scale = torch.tensor(100.0)
    assert clip_loss(f, f, scale) < 0.01
    shuffled = f[torch.randperm(16)]
    assert clip_loss(f, shuffled, scale) > 1.0
    torch.testing.assert_close(clip_loss(f, shuffled, scale), clip_loss(shuffled, f, scale))


def test_siglip_matches_the_paper_formula():
    img, txt = F.normalize(torch.randn(5, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    logits = t * img @ txt.T + b
    z = 2 * torch.eye(5) - 1
    expected = -torch.log(torch.sigmoid(z * logits)).sum() / 5
    torch.testing.assert_close(siglip_loss(img, txt, t, b), expected)


def test_matches_open_clip_loss():
    from open_clip.loss import ClipLoss

    img, txt = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    torch.testing.assert_close(clip_loss(img, txt, torch.tensor(20.0)), ClipLoss()(img, txt, torch.tensor(20.0)))
