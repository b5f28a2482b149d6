"""data_tools.write_shards: each input kind becomes shards that mm's loader reads back, bad items are counted."""
import collections
import csv
import functools
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import webdataset as wds
from PIL import Image

from data_tools.write_shards import detect_kind, main, resized_size, write_shards
from mm.decoders import TEXT_KEYS
from mm.media import IMAGE_KEYS
from mm.shards import read_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_image(path, size, mode="RGB", color=(200, 40, 40)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "RGBA":
        color = (*color, 0)  # fully transparent: must come out white, not the hidden red
    Image.new(mode, size, color).save(path)


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read_back(output, stats):
    """Samples of the shards stats.json lists, in order, via mm's own tar reader."""
    counts = collections.Counter()
    samples = list(read_samples([os.path.join(output, s) for s in stats["shards"]], counts))
    assert counts["bad_shards"] == 0
    return samples


def decoded(sample):
    """(caption, (w, h), RGB at the centre) of a written sample."""
    image = Image.open(io.BytesIO(sample["jpg"]))
    assert image.format == "JPEG" and image.mode == "RGB"
    return sample["txt"].decode(), image.size, image.getpixel((image.width // 2, image.height // 2))


def by_caption(samples):
    return {decoded(s)[0]: decoded(s)[1:] for s in samples}


@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL) of a local HTTP server on 127.0.0.1 serving that folder."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port():
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- folder of images with sidecar captions

def test_folder_writes_captioned_images_resized_and_counts_bad_ones(tmp_path):
    src, out = tmp_path / "photos", tmp_path / "shards"
    save_image(src / "cat.jpg", (400, 300))
    write_text(src / "cat.txt", "  a cat on a mat\n")
    save_image(src / "deep" / "er" / "dog.png", (200, 500), mode="RGBA")
    write_text(src / "deep" / "er" / "dog.txt", "a dog")
    save_image(src / "small.webp", (40, 30), mode="L", color=90)
    write_text(src / "small.txt", "a small grey square")
    save_image(src / "uncaptioned.jpg", (64, 64))
    write_text(src / "corrupt.jpg", "this is not a jpeg")
    write_text(src / "corrupt.txt", "never written")
    save_image(src / "blank.jpg", (64, 64))
    write_text(src / "blank.txt", " \n ")
    write_text(src / "notes.md", "not an image, ignored")

    stats = write_shards(str(src), str(out), image_size=64)

    assert stats["kind"] == "folder" and stats["written"] == 3 and stats["failed"] == 3
    assert stats["failures"] == {"no caption": 1, "unreadable image": 1, "empty caption": 1}
    assert {(e["source"], e["reason"]) for e in stats["examples"]} == {
        ("uncaptioned.jpg", "no caption"), ("corrupt.jpg", "unreadable image"), ("blank.jpg", "empty caption")}
    assert json.loads((out / "stats.json").read_text()) == stats

    samples = read_back(out, stats)
    assert all(set(s) == {"__key__", "__url__", "jpg", "txt"} for s in samples)
    got = by_caption(samples)
    assert set(got) == {"a cat on a mat", "a dog", "a small grey square"}
    assert got["a cat on a mat"][0] == (85, 64)  # shorter side to 64, aspect kept: 400x300 -> 85.3x64
    assert got["a dog"][0] == (64, 160)
    assert got["a dog"][1] == pytest.approx((255, 255, 255), abs=3)  # transparent -> white
    assert got["a small grey square"][0] == (40, 30)  # never upscaled
    assert got["a small grey square"][1] == pytest.approx((90, 90, 90), abs=3)  # grey L -> RGB


def test_rolls_shards_by_count_and_size_and_reads_back_through_webdataset(tmp_path):
    src = tmp_path / "photos"
    for i in range(5):
        save_image(src / f"img{i}.jpg", (32 + i, 32))
        write_text(src / f"img{i}.txt", f"caption {i}")

    stats = write_shards(str(src), str(tmp_path / "by_count"), max_count=2)
    assert stats["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(os.listdir(tmp_path / "by_count")) == stats["shards"] + ["stats.json"]
    urls = [str(tmp_path / "by_count" / s) for s in stats["shards"]]
    per_shard = [len(list(wds.WebDataset(u, shardshuffle=False))) for u in urls]
    assert per_shard == [2, 2, 1]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(5)]
    assert {s["txt"] for s in samples} == {f"caption {i}" for i in range(5)}
    assert all(isinstance(s["jpg"], Image.Image) for s in samples)
    assert any(k in samples[0] for k in IMAGE_KEYS) and any(k in samples[0] for k in TEXT_KEYS)

    tiny = write_shards(str(src), str(tmp_path / "by_size"), max_size_mb=1e-6)  # 1 byte: one sample a shard
    assert len(tiny["shards"]) == 5


def test_rerun_is_byte_identical_and_replaces_stale_shards(tmp_path):
    src, out = tmp_path / "photos", tmp_path / "shards"
    for i in range(4):
        save_image(src / f"img{i}.png", (50, 40 + i), color=(i * 60, 0, 0))
        write_text(src / f"img{i}.txt", f"caption {i}")
    first = write_shards(str(src), str(out), max_count=1)
    first_bytes = {s: (out / s).read_bytes() for s in first["shards"]}

    again = write_shards(str(src), str(out), max_count=1)
    assert again == first
    assert {s: (out / s).read_bytes() for s in again["shards"]} == first_bytes

    fewer = write_shards(str(src), str(out), max_count=2)  # 2 shards now: the old 3rd and 4th must go
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == fewer["shards"] == [
        "shard-000000.tar", "shard-000001.tar"]


def test_nothing_written_leaves_no_empty_shard(tmp_path):
    src, out = tmp_path / "photos", tmp_path / "shards"
    save_image(src / "a.jpg", (32, 32))
    stats = write_shards(str(src), str(out))
    assert stats["written"] == 0 and stats["shards"] == [] and stats["failures"] == {"no caption": 1}
    assert os.listdir(out) == ["stats.json"]


# ---------------------------------------------------------------- class folders

def test_classes_caption_by_class_name_with_label_json(tmp_path):
    src, out = tmp_path / "pets", tmp_path / "shards"
    save_image(src / "tabby_cat" / "z.png", (300, 120))
    save_image(src / "golden_retriever" / "x.jpg", (90, 70))
    save_image(src / "golden_retriever" / "nested" / "y.jpg", (91, 70))

    stats = write_shards(str(src), str(out), image_size=0)  # 0: keep original sizes

    assert stats["kind"] == "classes" and stats["written"] == 3 and stats["failed"] == 0
    assert stats["classes"] == ["golden_retriever", "tabby_cat"]
    samples = read_back(out, stats)
    assert all(set(s) == {"__key__", "__url__", "jpg", "txt", "json"} for s in samples)
    got = sorted((decoded(s)[0], decoded(s)[1], json.loads(s["json"])) for s in samples)
    assert got == [
        ("golden retriever", (90, 70), {"label": "golden_retriever", "label_index": 0}),
        ("golden retriever", (91, 70), {"label": "golden_retriever", "label_index": 0}),
        ("tabby cat", (300, 120), {"label": "tabby_cat", "label_index": 1}),
    ]


# ---------------------------------------------------------------- manifests

def test_csv_manifest_with_local_paths_and_urls(tmp_path, http_root):
    www, base_url = http_root
    save_image(www / "remote.jpg", (120, 100))
    data = tmp_path / "data"
    save_image(data / "imgs" / "local.jpg", (100, 300))
    save_image(tmp_path / "elsewhere" / "absolute.png", (50, 50))
    rows = [
        ("imgs/local.jpg", "a local image, with a comma"),
        (str(tmp_path / "elsewhere" / "absolute.png"), "an absolute path"),
        (f"{base_url}/remote.jpg", "a downloaded image"),
        (f"{base_url}/missing.jpg", "a 404"),
        (f"http://127.0.0.1:{closed_port()}/x.jpg", "an unreachable host"),
        ("imgs/not_there.jpg", "a missing file"),
        ("imgs/local.jpg", ""),
    ]
    with open(data / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)

    stats = write_shards(str(data / "manifest.csv"), str(tmp_path / "shards"), image_size=50)

    assert stats["kind"] == "manifest" and stats["written"] == 3
    assert stats["failures"] == {"download failed": 2, "missing file": 1, "empty caption": 1}
    reasons = {e["source"]: e["reason"] for e in stats["examples"]}
    assert reasons[f"{base_url}/missing.jpg"] == "download failed"
    assert reasons["imgs/not_there.jpg"] == "missing file"
    got = by_caption(read_back(tmp_path / "shards", stats))
    assert {c: size for c, (size, _) in got.items()} == {
        "a local image, with a comma": (50, 150), "an absolute path": (50, 50), "a downloaded image": (60, 50)}


def test_jsonl_and_tsv_manifests_with_custom_keys(tmp_path):
    save_image(tmp_path / "a.jpg", (20, 20))
    lines = [json.dumps({"url": "a.jpg", "text": "first"}), "{not json", "",
             json.dumps({"text": "no image"}), json.dumps({"url": "a.jpg", "text": ["a", "list"]}),
             json.dumps({"url": "a.jpg", "text": "second"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    stats = write_shards(str(tmp_path / "m.jsonl"), str(tmp_path / "j"), image_key="url", caption_key="text")
    assert stats["written"] == 2 and stats["failures"] == {"bad manifest row": 3}
    assert {e["source"] for e in stats["examples"]} == {"m.jsonl:2", "m.jsonl:4", "m.jsonl:5"}
    assert set(by_caption(read_back(tmp_path / "j", stats))) == {"first", "second"}

    (tmp_path / "m.tsv").write_text("url\ttext\na.jpg\ttab separated, commas kept\n")
    stats = write_shards(str(tmp_path / "m.tsv"), str(tmp_path / "t"), image_key="url", caption_key="text")
    assert set(by_caption(read_back(tmp_path / "t", stats))) == {"tab separated, commas kept"}


def test_manifest_without_the_named_columns_fails_listing_the_columns(tmp_path):
    (tmp_path / "m.csv").write_text("path,text\na.jpg,hello\n")
    with pytest.raises(ValueError, match=r"no column 'image' or 'caption'.*\['path', 'text'\]"):
        write_shards(str(tmp_path / "m.csv"), str(tmp_path / "out"))


# ---------------------------------------------------------------- detection, sizes, command line

def test_detect_kind(tmp_path):
    for name in ("m.csv", "m.TSV", "m.jsonl"):
        write_text(tmp_path / name, "")
        assert detect_kind(str(tmp_path / name)) == "manifest"
    save_image(tmp_path / "classes" / "cat" / "1.jpg", (8, 8))
    write_text(tmp_path / "classes" / ".DS_Store", "")
    assert detect_kind(str(tmp_path / "classes")) == "classes"
    save_image(tmp_path / "parts" / "00000" / "1.jpg", (8, 8))  # subfolders of captioned images
    write_text(tmp_path / "parts" / "00000" / "1.txt", "a caption")
    assert detect_kind(str(tmp_path / "parts")) == "folder"
    save_image(tmp_path / "flat" / "1.jpg", (8, 8))
    assert detect_kind(str(tmp_path / "flat")) == "folder"
    with pytest.raises(FileNotFoundError):
        detect_kind(str(tmp_path / "nope"))
    write_text(tmp_path / "m.txt", "")
    with pytest.raises(ValueError, match="not a manifest"):
        detect_kind(str(tmp_path / "m.txt"))


def test_resized_size():
    assert resized_size((400, 300), 256) == (341, 256)
    assert resized_size((300, 400), 256) == (256, 341)
    assert resized_size((200, 100), 256) == (200, 100)  # smaller: left alone
    assert resized_size((5000, 10), 4) == (2000, 4)
    assert resized_size((4000, 3000), 0) == (4000, 3000)


def test_main_prints_a_summary_and_runs_as_a_module(tmp_path, capsys):
    src, out = tmp_path / "photos", tmp_path / "shards"
    for i in range(3):
        save_image(src / f"{i}.jpg", (40, 40))
        write_text(src / f"{i}.txt", f"caption {i}")
    save_image(src / "lonely.jpg", (40, 40))

    main([f"--input={src}", f"--output={out}", "--max_count=2", "--kind=folder", "--shuffle=false"])
    assert capsys.readouterr().out.strip() == (
        f"wrote 3 samples in 2 shards to {out}; 1 failed: {{'no caption': 1}}")
    stats = json.loads((out / "stats.json").read_text())
    assert [decoded(s)[0] for s in read_back(out, stats)] == ["caption 0", "caption 1", "caption 2"]

    with pytest.raises(SystemExit, match="does not exist"):
        main([f"--input={tmp_path / 'nope'}", f"--output={out}"])

    run = subprocess.run([sys.executable, "-m", "data_tools.write_shards", f"--input={src}",
                          f"--output={tmp_path / 'cli'}", "--image_size=16"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("wrote 3 samples in 1 shards to ")
