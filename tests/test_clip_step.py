"""Contrastive gradient accumulation: grad_accum=4 micro-batches of B give the gradients of one batch of 4B."""
import pytest
import torch

from mm.clip.model import create_clip
from mm.clip.step import contrastive_backward
from mm.precision import make_precision

B = 4


def batch(n, seed=0):
    """n random 32-px images and n distinct captions, tokenized."""
    g = torch.Generator().manual_seed(seed)
    parts = create_clip("mm-test-micro")
    texts = parts.tokenizer([f"a photo of thing number {i}" for i in range(n)])
    return torch.randn(n, 3, 32, 32, generator=g), texts


def grads_after(kind, micro_batches):
    torch.manual_seed(0)
    model = create_clip("mm-test-micro", siglip=kind == "siglip").model  # a ViT: no batch statistics
    loss, _ = contrastive_backward(model, micro_batches, kind, make_precision("fp32", "cpu"))
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_accumulated_gradients_equal_one_big_batch(kind):
    images, texts = batch(4 * B)
    big_loss, big = grads_after(kind, [(images, texts)])
    micro = [(images[i:i + B], texts[i:i + B]) for i in range(0, 4 * B, B)]
    acc_loss, acc = grads_after(kind, micro)
    torch.testing.assert_close(acc_loss, big_loss, rtol=1e-5, atol=1e-6)
    assert acc.keys() == big.keys() and "logit_scale" in acc
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_plain_accumulation_would_differ():
    """The test above can fail: summing 4 separate contrastive losses of B is not the loss of 4B."""
    images, texts = batch(4 * B)
    _, big = grads_after("clip", [(images, texts)])
    torch.manual_seed(0)
    model = create_clip("mm-test-micro").model
    for i in range(0, 4 * B, B):
        contrastive_backward(model, [(images[i:i + B], texts[i:i + B])], "clip", make_precision("fp32", "cpu"))
    plain = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert not torch.allclose(plain["visual.proj"] / 4, big["visual.proj"], rtol=1e-3, atol=1e-5)


def test_batchnorm_running_stats_move_once_per_micro_batch():
    """The cached pass of accumulation must not update BatchNorm's running statistics a second time."""
    torch.manual_seed(0)
    model = create_clip("mm-tiny-rn-32").model
    bn = model.visual.bn1
    images, texts = batch(4 * B)
    images = torch.nn.functional.interpolate(images, size=32)
    micro = [(images[i:i + B], texts[i:i + B]) for i in range(0, 4 * B, B)]
    contrastive_backward(model, micro, "clip", make_precision("fp32", "cpu"))
    assert int(bn.num_batches_tracked) == 4
