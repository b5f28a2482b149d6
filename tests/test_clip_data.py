"""The train image transform split in two (uint8 crops in the loader, normalisation per batch): the same
numbers as open_clip's own transform for the same crop, the same crop distribution, and a fallback."""
import random

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

from mm.clip.data import UInt8Crop, as_float, split_train_transform
from mm.clip.model import create_clip


@pytest.fixture(scope="module")
def preprocess():
    return create_clip("mm-tiny-rn-32").preprocess_train


def photo(w=40, h=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.to_pil_image(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))


def test_same_numbers_as_open_clip_for_the_same_crop(preprocess, monkeypatch):
    fast, finish = split_train_transform(preprocess)
    assert isinstance(fast, UInt8Crop) and fast.size == (32, 32)
    img = photo()
    box = (3, 2, 3 + 33, 2 + 27)  # left, top, right, bottom
    monkeypatch.setattr(fast, "crop_box", lambda w, h: box)
    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(lambda *a: (2, 3, 27, 33)))  # i, j, h, w
    ours = finish(fast(img)[None])[0]
    theirs = preprocess(img)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape == (3, 32, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_crops_follow_torchvisions_distribution_and_repeat_under_a_seed(preprocess):
    fast, _ = split_train_transform(preprocess)
    random.seed(5)
    boxes = [fast.crop_box(64, 48) for _ in range(2000)]
    random.seed(5)
    assert [fast.crop_box(64, 48) for _ in range(2000)] == boxes  # the loader's per-sample seed fixes the crop
    areas = [(r - l) * (b - t) / (64 * 48) for l, t, r, b in boxes]
    ratios = [(r - l) / (b - t) for l, t, r, b in boxes]
    assert 0.86 < min(areas) and max(areas) < 1.04  # scale (0.9, 1.0), up to rounding
    assert 0.7 < min(ratios) and max(ratios) < 1.4  # ratio (3/4, 4/3), up to rounding
    assert all(0 <= l < r <= 64 and 0 <= t < b <= 48 for l, t, r, b in boxes)
    assert len(set(boxes)) > 100  # random, not one fixed crop


def test_other_transforms_are_kept_as_they_are():
    jitter = T.Compose([T.RandomResizedCrop(32), T.ColorJitter(0.4), T.ToTensor()])
    transform, finish = split_train_transform(jitter)
    assert transform is jitter and finish is as_float
    x = torch.rand(2, 3, 4, 4)
    assert finish(x) is x


@pytest.mark.parametrize("fmt, key", [("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"), ("GIF", "gif"),
                                      ("TIFF", "tiff"), ("WEBP", "webp")])
def test_the_loader_reads_every_image_type_the_writer_accepts(preprocess, fmt, key):
    """One list of image types (mm.media): a shard field named by any of them decodes."""
    import io

    from data_tools import write_shards
    from mm.decoders import pair_decoder
    from mm.media import IMAGE_EXTENSIONS, IMAGE_KEYS

    assert write_shards.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS and key in IMAGE_KEYS
    buf = io.BytesIO()
    photo().save(buf, format=fmt)
    image, caption = pair_decoder(preprocess)({"__key__": "k", key: buf.getvalue(), "txt": b"a cat"})
    assert image.shape == (3, 32, 32) and caption == "a cat"
