"""SemDeDup: with a crafted embedder (an image's colour picks its embedding), exactly one member of each planted
group is kept and no distinct item is dropped, over several clusters and blocks; a chain A~B~C keeps C (the
reference code drops it); the keep order; and a real (untrained) CLIP from open_clip weights on disk, end to end
through the command line."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest

from data_tools.curate import semdedup
from data_tools.curate.report import Report
from data_tools.curate.semdedup import SemDedupConfig, row_chunks
from tests.curate_fixtures import image_bytes, keys, pair, read_output, read_report, step_report, write_shards

DIM = 16


class TableEmbedder:
    """A crafted embedder: the image's (red, green) at pixel (0, 0) looks its embedding up in `table`."""

    def __init__(self, table: dict[tuple[int, int], np.ndarray]):
        self.table = {k: (v / np.linalg.norm(v)).astype(np.float32) for k, v in table.items()}

    def embed_images(self, images):
        return np.stack([self.table[im.getpixel((0, 0))[:2]] for im in images])

    def embed_texts(self, texts):
        raise AssertionError("semdedup embeds images only")


def planted(group_sizes: list[int], seed: int = 0) -> tuple[list[dict], TableEmbedder, dict[str, int]]:
    """Samples in shuffled order: group g has group_sizes[g] near-identical members (cosine > 0.99 with each
    other), groups are far apart (random directions in 16-d). Returns (samples, embedder, key -> group)."""
    rng = np.random.default_rng(seed)
    jitter = rng.normal(size=DIM)
    table, members = {}, []
    for g, size in enumerate(group_sizes):
        base = rng.normal(size=DIM)
        base /= np.linalg.norm(base)
        for j in range(size):
            table[(g, j)] = base + 0.01 * j * jitter / np.linalg.norm(jitter)
            members.append((g, j))
    random.Random(seed).shuffle(members)
    samples = [pair(f"{i:06d}", image_bytes((g, j, 0), size=(8, 8)), f"g{g}") for i, (g, j) in enumerate(members)]
    return samples, TableEmbedder(table), {s["__key__"]: g for s, (g, _) in zip(samples, members)}


def run(samples, embedder, **cfg) -> tuple[list[dict], Report]:
    report = Report("semdedup")
    kept = list(semdedup.apply(samples, SemDedupConfig(batch_size=5, **cfg), report, embedder=embedder))
    assert report.n_in == report.n_out + sum(report.drops.values()) == len(samples)
    return kept, report


@pytest.mark.parametrize("cfg", [
    {},                                                   # 60 samples: 6 clusters, one block
    {"min_cluster_size": 2, "block_size": 3},             # 30 clusters, blocks of 3 rows
    {"n_clusters": 1, "block_size": 4, "keep": "first"},  # one cluster walked in blocks of 4
])
def test_keeps_exactly_one_of_each_group_and_every_distinct_item(cfg, tmp_path):
    sizes = [1] * 20 + [2] * 8 + [3] * 4 + [4] * 2 + [6]  # 20 distinct items, 15 groups: 60 samples
    samples, embedder, group = planted(sizes)
    kept, report = run(samples, embedder, tmp_dir=str(tmp_path), **cfg)
    assert sorted(group[k] for k in keys(kept)) == list(range(len(sizes)))  # one per group, singletons all kept
    assert report.drops == {"semantic_duplicate": sum(sizes) - len(sizes)}
    kept_keys = set(keys(kept))
    for ex in report.to_dict()["examples"]["semantic_duplicate"]:
        of = ex["detail"].split()[1]  # "of <key> (cosine 0.9999)"
        assert of in kept_keys and group[of] == group[ex["key"]]
    assert keys(kept) == sorted(keys(kept))  # input order
    assert list(tmp_path.iterdir()) == []  # the spill is removed


def test_a_chain_keeps_what_is_not_close_to_a_kept_item():
    # A~B and B~C exceed 1 - eps = 0.95, A~C does not. The reference code drops C for resembling B, which
    # is itself dropped (SemDeDup #8); compared with KEPT items only, C stays.
    angle = {0: 0.0, 1: 0.25, 2: 0.5}  # cos 0.25 = 0.969, cos 0.5 = 0.878
    table = {(r, 0): np.r_[np.cos(a), np.sin(a), np.zeros(DIM - 2)] for r, a in angle.items()}
    samples = [pair(k, image_bytes((r, 0, 0), size=(8, 8)), k) for r, k in enumerate("ABC")]
    kept, report = run(samples, TableEmbedder(table), keep="first")
    assert keys(kept) == ["A", "C"]
    assert report.to_dict()["examples"]["semantic_duplicate"][0]["detail"] == "of A (cosine 0.9689)"


@pytest.mark.parametrize("keep, kept_key", [("first", "A"), ("closest", "B"), ("farthest", "C")])
def test_keep_order_picks_which_member_survives(keep, kept_key):
    angle = {0: 0.0, 1: 0.02, 2: 0.1}  # one group; its centroid lies near 0.04, closest to B, farthest from C
    table = {(r, 0): np.r_[np.cos(a), np.sin(a), np.zeros(DIM - 2)] for r, a in angle.items()}
    samples = [pair(k, image_bytes((r, 0, 0), size=(8, 8)), k) for r, k in enumerate("ABC")]
    kept, _ = run(samples, TableEmbedder(table), keep=keep)
    assert keys(kept) == [kept_key]


def test_corrupt_images_are_counted_and_stats_reported():
    samples, embedder, _ = planted([1, 2])
    samples.insert(1, pair("broken", b"\xff\xd8 not a jpeg", "x", ext="jpg"))
    kept, report = run(samples, embedder)
    assert len(kept) == 2 and report.drops == {"semantic_duplicate": 1, "corrupt": 1}
    stats = report.to_dict()["stats"]
    assert stats["n_embedded"] == 3 and stats["n_clusters"] == 1 and stats["similarity_threshold"] == 0.95
    assert stats["nearest_kept_similarity"]["n"] == 2  # every item but the first of its cluster
    assert stats["nearest_kept_similarity"]["max"] > 0.99  # the planted pair


def test_empty_input_and_chunking():
    report = Report("semdedup")
    assert list(semdedup.apply(iter([]), SemDedupConfig(), report, embedder=TableEmbedder({}))) == []
    assert report.n_in == 0
    assert row_chunks(10, 4) == [(0, 4), (4, 10)]
    assert row_chunks(8, 4) == [(0, 4), (4, 8)]
    assert row_chunks(3, 4) == [(0, 3)]
    with pytest.raises(ValueError, match="eps must be in"):
        next(semdedup.apply(iter([]), SemDedupConfig(eps=0), report, embedder=TableEmbedder({})))


def test_command_line_with_open_clip_weights_on_disk_drops_only_the_planted_copies(tmp_path):
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from mm.clip.model import create_clip
    from tests.zeroshot_fixtures import render_shapes

    def png(image: Image.Image, level: int) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=level)
        return buf.getvalue()

    torch.manual_seed(0)  # an untrained micro CLIP, as open_clip weights on disk: it embeds, it has not learned
    save_file(create_clip("mm-test-micro").model.state_dict(), str(tmp_path / "micro.safetensors"))
    rendered = render_shapes(20, seed=11)
    samples = [pair(f"orig{i:02d}", png(im, 6), label) for i, (im, label) in enumerate(rendered)]
    # the same pixels under other bytes (a different zlib level) and byte-identical copies, under new keys
    samples += [pair(f"copy{i:02d}", png(rendered[i][0], 1), rendered[i][1]) for i in range(0, 10, 2)]
    samples += [dict(samples[i], __key__=f"same{i:02d}") for i in (1, 3, 5)]
    write_shards(tmp_path / "in", samples, per_shard=12)
    # this model packs distinct images within cosine 0.9998 of each other: only copies pass 0.99999
    assert semdedup.main([str(tmp_path / "in"), f"--output={tmp_path / 'out'}", "--checkpoint=open_clip:mm-test-micro",
                          f"--pretrained={tmp_path / 'micro.safetensors'}", "--eps=1e-5", "--keep=first",
                          "--device=cpu", "--batch_size=16"]) == 0
    assert sorted(keys(read_output(tmp_path / "out"))) == [f"orig{i:02d}" for i in range(20)]
    step = step_report(read_report(tmp_path / "out"), "semdedup")
    assert (step["n_in"], step["n_out"], step["drops"]) == (28, 20, {"semantic_duplicate": 8})


def test_spill_gives_back_samples_rows_and_keys_exactly(tmp_path):
    from data_tools.curate.spill import Spill

    samples = [{"__key__": f"dir/a.b.{i}", "__url__": "pipe:cat x.tar", "jpg": bytes([i]) * 3, "json": b"{}"}
               for i in range(5)]
    with Spill(str(tmp_path), dim=3) as spill:
        for i, s in enumerate(samples):
            spill.add(s, [i, i + 0.5, -i])
        rows = spill.rows()
        assert len(rows) == 5 and rows[1:3].tolist() == [[1, 1.5, -1], [2, 2.5, -2]]
        assert rows[np.array([4, 0])][:, 0].tolist() == [4, 0] and rows[:, 2].tolist() == [0, -1, -2, -3, -4]
        assert [spill.key(i) for i in (4, 0, 2)] == ["dir/a.b.4", "dir/a.b.0", "dir/a.b.2"]
        assert list(spill.samples()) == samples
    with Spill(str(tmp_path), dim=3) as spill, pytest.raises(ValueError, match="3 wide"):
        spill.add(samples[0], [1, 2])
    assert list(tmp_path.iterdir()) == []  # both removed on close
