"""Zero-shot top-k and retrieval recall against answers worked out by hand on tiny cases."""
import math

import pytest
import torch

from mm.clip.evaluate import retrieval_recall, zero_shot_accuracy


class Identity(torch.nn.Module):
    """A 'CLIP' whose image and text features are its inputs: the test chooses every cosine."""

    def encode_image(self, x):
        return x

    def encode_text(self, x):
        return x


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_zero_shot_top1_and_top5_by_hand():
    """6 classes, head = the 6 axes. Image features and where their label ranks (1 = best):
    [9,1,0,0,0,0] label 0: rank 1;  [5,6,0,0,0,0] label 0: rank 2;  [1,2,3,4,5,6] label 0: rank 6 (out of top 5);
    [0,0,0,0,1,7] label 4: rank 2;  [0,0,0,2,0,0] label 3: rank 1. So top-1 2/5, top-5 4/5."""
    head = torch.eye(6)
    feats = torch.tensor([[9., 1, 0, 0, 0, 0], [5, 6, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 7],
                          [0, 0, 0, 2, 0, 0]])
    labels = torch.tensor([0, 0, 0, 4, 3])
    batches = [(feats[:2], labels[:2]), (feats[2:], labels[2:])]  # batch boundaries change nothing
    got = zero_shot_accuracy(Identity(), head, batches, "cpu")
    assert got == {"zeroshot_top1": pytest.approx(2 / 5), "zeroshot_top5": pytest.approx(4 / 5), "zeroshot_n": 5}


def test_retrieval_recall_by_hand():
    """Unit vectors at angles; pair i is (image i, caption i). Images at 0, 90, 45 degrees, captions at 10, 70, 120.
    image->text: image 0 nearest caption 0 (10 deg away) yes; image 1 -> caption 1 (20 deg) yes; image 2 (45 deg)
    -> caption 1 (25 deg), then caption 0 (35), its own caption 2 only third (75): R@1 2/3, R@2 2/3.
    text->image: caption 0 -> image 0 yes; caption 1 -> image 1 (20 deg) yes; caption 2 (120 deg) -> image 1 (30 deg),
    then its own image 2 (75): R@1 2/3, R@2 3/3."""
    images = torch.tensor([unit(0), unit(90), unit(45)])
    captions = {f"c{i}": torch.tensor(unit(a)) for i, a in enumerate((10, 70, 120))}

    def tokenizer(texts):
        return torch.stack([captions[t] for t in texts])
    batches = [(images[:2], ["c0", "c1"]), (images[2:], ["c2"])]
    got = retrieval_recall(Identity(), tokenizer, batches, "cpu", ks=(1, 2))
    assert got == pytest.approx({"retrieval_i2t_r@1": 2 / 3, "retrieval_i2t_r@2": 2 / 3,
                                 "retrieval_t2i_r@1": 2 / 3, "retrieval_t2i_r@2": 1.0})
