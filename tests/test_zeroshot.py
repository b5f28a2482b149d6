"""mm.zeroshot: the Python API and the CLI, on a tiny CLIP trained by recipes/clip/train.py."""
import json
import logging
import os
import re
import subprocess
import warnings

import pytest
import torch
from PIL import Image

from mm.checkpoint import CheckpointError
from mm.clip.evaluate import build_zero_shot_head
from mm.zeroshot import (DEFAULT_TEMPLATES, ImageTooLarge, NotAnImage, ZeroShotClassifier, find_images, open_image,
                         parse_labels)
from mm.zeroshot.__main__ import main as cli_main
from mm.zeroshot.inputs import MAX_PROMPT_CHARS, check_templates, parse_templates
from tests.helpers import ROOT, exit_status
from tests.zeroshot_fixtures import (BAD_TEMPLATES, COLOURS, png_declaring, python, render_shapes, shape_png,
                                     write_checkpoint, write_hostile_checkpoint)


def test_trained_model_names_colours_of_fresh_shapes(classifier):
    """Newly rendered scenes (not in the training shards), 6 colour names as labels: far above chance (1/6)."""
    scenes = render_shapes(120, seed=1234)
    ranked = classifier.classify([img for img, _ in scenes], COLOURS, top_k=1, batch_size=32)
    accuracy = sum(r[0][0] == label.split()[0] for r, (_, label) in zip(ranked, scenes)) / len(scenes)
    assert accuracy >= 0.6, f"colour accuracy {accuracy:.2f}"


def test_classify_ranks_labels_with_probabilities(classifier, tmp_path):
    labels = ["red circle", "blue square", "green triangle"]
    path = shape_png(tmp_path / "red.png", "red", "circle")
    out = classifier.classify([path, str(path), Image.open(path)], labels, top_k=2)
    assert len(out) == 3 and all(len(r) == 2 for r in out)
    for ranked in out:
        assert ranked[0][0] == "red circle"
        assert ranked[0][1] >= ranked[1][1] and all(0.0 <= p <= 1.0 for _, p in ranked)
    full = classifier.classify(path, labels, top_k=10)  # one image still gives a list of one; k capped at 3
    assert len(full) == 1 and sorted(lab for lab, _ in full[0]) == sorted(labels)
    assert sum(p for _, p in full[0]) == pytest.approx(1.0, abs=1e-5)


def test_paths_pil_and_tensors_agree_whatever_the_batch_size(classifier, tmp_path):
    scenes = render_shapes(5, seed=7)
    paths = []
    for i, (img, _) in enumerate(scenes):
        img.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    pixels = torch.stack([classifier.preprocess(img) for img, _ in scenes])  # [5, 3, 32, 32]
    from_paths = classifier.classify(paths, COLOURS, top_k=6, batch_size=2)
    from_pil = classifier.classify([img for img, _ in scenes], COLOURS, top_k=6, batch_size=64)
    from_batch = classifier.classify(pixels, COLOURS, top_k=6)
    from_single = classifier.classify(list(pixels), COLOURS, top_k=6, batch_size=1)
    for other in (from_pil, from_batch, from_single):
        for a, b in zip(from_paths, other):
            assert [lab for lab, _ in a] == [lab for lab, _ in b]
            assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=1e-5)


def test_probabilities_are_softmax_of_scaled_cosine_similarity(classifier):
    img = render_shapes(1, seed=3)[0][0]
    labels = ["red", "blue", "a cat"]
    got = dict(classifier.classify(img, labels, templates=["{}"], top_k=3)[0])
    model = classifier.model
    with torch.no_grad():
        f = model.encode_image(classifier.preprocess(img)[None])
        f = f / f.norm(dim=-1, keepdim=True)
        t = model.encode_text(classifier.tokenizer(labels))
        t = t / t.norm(dim=-1, keepdim=True)
        want = (model.logit_scale.exp() * f @ t.T).softmax(-1)[0]
    assert [got[lab] for lab in labels] == pytest.approx(want.tolist(), abs=1e-5)


def test_label_heads_are_encoded_once_and_cached_lru(classifier, monkeypatch):
    import mm.zeroshot.classifier as module

    calls = []
    monkeypatch.setattr(module, "build_zero_shot_head",
                        lambda model, tok, names, templates, device: calls.append(names) or
                        build_zero_shot_head(model, tok, names, templates, device))
    clf = ZeroShotClassifier(classifier.model, classifier.preprocess, classifier.tokenizer, "cpu", cache_size=2)
    img = render_shapes(1, seed=5)[0][0]
    for _ in range(3):
        clf.classify([img, img], ["red", "blue"])
    assert calls == [["red", "blue"]]
    clf.classify(img, ["red", "blue"], templates=["{}"])  # other templates: another head
    clf.classify(img, ["green"])                          # third set evicts the least recent, (red, blue) x default
    clf.classify(img, ["red", "blue"], templates=["{}"])  # still cached
    assert len(calls) == 3 and clf.heads_built == 3
    clf.classify(img, ["red", "blue"])
    assert len(calls) == 4


def test_default_templates_are_used_and_averaged(classifier):
    head = classifier.text_head(["red"])
    want = build_zero_shot_head(classifier.model, classifier.tokenizer, ["red"], list(DEFAULT_TEMPLATES), "cpu")
    torch.testing.assert_close(head, want)
    assert len(DEFAULT_TEMPLATES) >= 3 and all("{}" in t for t in DEFAULT_TEMPLATES)


def test_bad_inputs_raise_errors_that_say_what_is_wrong(classifier, tmp_path):
    img = render_shapes(1, seed=2)[0][0]
    with pytest.raises(ValueError, match="no labels"):
        classifier.classify(img, [])
    with pytest.raises(ValueError, match="repeat"):
        classifier.classify(img, ["red", "red"])
    with pytest.raises(ValueError, match="not one string"):
        classifier.classify(img, "red,blue")
    with pytest.raises(ValueError, match=r"\{\}"):
        classifier.classify(img, ["red"], templates=["a photo"])
    with pytest.raises(ValueError, match="top_k"):
        classifier.classify(img, ["red"], top_k=0)
    with pytest.raises(ValueError, match=r"preprocessed \[3, 32, 32\]"):
        classifier.classify(torch.zeros(3, 64, 64), ["red"])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(NotAnImage, match="notes.png: not an image"):
        classifier.classify(tmp_path / "notes.png", ["red"])
    with pytest.raises(FileNotFoundError):
        classifier.classify(tmp_path / "missing.png", ["red"])


@pytest.mark.parametrize("template", list(BAD_TEMPLATES))
def test_templates_need_exactly_one_bare_placeholder(classifier, monkeypatch, template):
    """Refused with a message before any prompt is built: '{{}}{:>100000000}' never becomes 100 MB prompts."""
    import mm.zeroshot.classifier as module

    monkeypatch.setattr(module, "build_zero_shot_head", lambda *a: pytest.fail("prompts built from a bad template"))
    img = render_shapes(1, seed=2)[0][0]
    with pytest.raises(ValueError, match=re.escape(BAD_TEMPLATES[template])):
        classifier.classify(img, ["red", "blue"], templates=["a photo of a {}.", template])
    with pytest.raises(ValueError, match=re.escape(BAD_TEMPLATES[template])):
        check_templates([template])


def test_templates_may_hold_commas_and_escaped_braces(classifier):
    img = render_shapes(1, seed=2)[0][0]
    for templates in (["a photo of a {}, in the wild"], ["{{{}}}"], ["{{a}} {}", "{}"]):
        ranked = classifier.classify(img, ["red", "blue"], templates=templates)[0]
        assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="not one string"):  # one string would be read as one template per char
        classifier.classify(img, ["red"], templates="a photo of a {}")


def test_prompt_length_is_bounded(classifier):
    img = render_shapes(1, seed=2)[0][0]
    label = "x" * (MAX_PROMPT_CHARS - len("a ") + 1)  # the prompt "a xxx...": one character over
    with pytest.raises(ValueError, match=f"the limit is {MAX_PROMPT_CHARS:,}"):
        classifier.classify(img, [label], templates=["a {}"])
    assert classifier.classify(img, [label[1:]], templates=["a {}"])[0][0][0] == label[1:]  # exactly at the limit
    with pytest.raises(ValueError, match="the limit is"):
        check_templates(["{}" + "y" * MAX_PROMPT_CHARS], ["z"])  # with any label at all


def test_parse_templates_reads_json_or_lines_never_commas():
    assert parse_templates("a photo of a {}, in the wild") == ["a photo of a {}, in the wild"]
    assert parse_templates(" a {}, here\n\n{}, there \n") == ["a {}, here", "{}, there"]
    assert parse_templates('["a {}, b", "{}"]') == ["a {}, b", "{}"]
    with pytest.raises(ValueError, match="list of strings"):
        parse_templates('["a {}", 3]')
    with pytest.raises(ValueError, match="JSON"):
        parse_templates('["a {}",')


def test_open_image_refuses_bombs_before_decoding(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_declaring(100_000, 100_000, rows=1))  # 10 gigapixels in a few KB
    with pytest.raises(ImageTooLarge):
        open_image(tmp_path / "huge.png")
    bomb = png_declaring(2000, 2000)  # 12 MB of pixels in ~12 KB
    assert len(bomb) < 50_000
    with pytest.raises(ImageTooLarge, match="2000x2000"):
        open_image(bomb, max_pixels=1_000_000)
    assert open_image(bomb, max_pixels=4_000_000).size == (2000, 2000)
    with pytest.raises(NotAnImage, match="could not decode"):
        open_image(png_declaring(64, 64)[:-40])  # truncated pixel data


def test_parse_labels_and_find_images(tmp_path):
    assert parse_labels("cat, dog ,, cat,\n bird") == ["cat", "dog", "bird"]
    assert parse_labels('["a, b", "c"]') == ["a, b", "c"]
    assert parse_labels(["x", " ", "y"]) == ["x", "y"] and parse_labels("  ") == []
    with pytest.raises(ValueError, match="JSON"):
        parse_labels('["a", ')
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.png", "sub/readme.txt"):
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images([tmp_path])]
    assert found == ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.png"]
    with pytest.raises(FileNotFoundError, match="nope"):
        find_images([tmp_path / "nope"])


def test_from_checkpoint_reads_run_folder_export_and_step_file(trained_clip, classifier):
    img = render_shapes(1, seed=11)[0][0]
    want = classifier.classify(img, COLOURS, top_k=6)[0]
    step_file = sorted((trained_clip / "checkpoints").glob("step_*.pt"))[-1]
    for path in (trained_clip / "export", step_file):
        got = ZeroShotClassifier.from_checkpoint(path, device="cpu").classify(img, COLOURS, top_k=6)[0]
        assert [lab for lab, _ in got] == [lab for lab, _ in want]
        assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)


def test_from_pretrained_loads_a_local_open_clip_weights_file(tmp_path):
    import open_clip

    torch.manual_seed(0)
    from mm.clip.model import resolve_model_name
    model, _, preprocess = open_clip.create_model_and_transforms(resolve_model_name("mm-test-micro"))  # registers ours
    torch.save({"state_dict": model.state_dict()}, tmp_path / "weights.pt")  # open_clip_train's layout
    img = render_shapes(1, seed=4)[0][0]
    direct = ZeroShotClassifier(model, preprocess, open_clip.get_tokenizer("mm-test-micro"), "cpu")
    loaded = ZeroShotClassifier.from_pretrained("mm-test-micro", tmp_path / "weights.pt", device="cpu")
    a, b = direct.classify(img, COLOURS, top_k=6)[0], loaded.classify(img, COLOURS, top_k=6)[0]
    assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=1e-6)
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        ZeroShotClassifier.from_pretrained("mm-test-micro", tmp_path / "missing.pt")


@pytest.fixture
def hostile_run(tmp_path):
    """(run folder, its checkpoints/step_00000001.pt whose unpickling would `touch` marker, marker)."""
    marker = tmp_path / "pwned"
    step = write_hostile_checkpoint(tmp_path / "run", marker)
    return tmp_path / "run", step, marker


def test_from_checkpoint_refuses_a_checkpoint_that_would_run_code(hostile_run):
    run, step, marker = hostile_run
    for path in (run, step):  # the run folder resolves to its newest step_*.pt
        with pytest.raises(CheckpointError, match="refused") as e:
            ZeroShotClassifier.from_checkpoint(path, device="cpu")
        assert str(step) in str(e.value) and "could run code" in str(e.value)
    assert not marker.exists()


def test_from_checkpoint_explains_a_checkpoint_that_is_not_a_clip_run(tmp_path):
    no_cfg = write_checkpoint(tmp_path / "a", {"model": {}})
    with pytest.raises(ValueError, match="no model config"):
        ZeroShotClassifier.from_checkpoint(no_cfg, device="cpu")
    for i, cfg in enumerate([{}, {"embed_dim": 8}, "ViT-B-32"]):  # used to escape as KeyError/TypeError
        path = write_checkpoint(tmp_path / f"b{i}", {"model": {}, "extra": {"model_cfg": cfg}})
        with pytest.raises(CheckpointError, match="cannot rebuild a CLIP model") as e:
            ZeroShotClassifier.from_checkpoint(path, device="cpu")
        assert str(path) in str(e.value)


def make_colour_folder(root, per_class=6, seed=21):
    """root/<colour>/<i>.png: scenes of one colour per folder (any shape), plus junk the evaluation must skip."""
    from data_tools.synthetic_clip import make_sample
    import random

    rng, counts = random.Random(seed), {c: 0 for c in COLOURS}
    for c in COLOURS:
        (root / c).mkdir(parents=True)
    while min(counts.values()) < per_class:
        img, _, label = make_sample(rng, 32, multi_prob=0.0)
        colour = label.split()[0]
        if counts[colour] < per_class:
            img.save(root / colour / f"{counts[colour]}.png")
            counts[colour] += 1
    (root / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "red" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_evaluate_folder_reports_accuracy_and_saves_confusion_png(classifier, tmp_path):
    folder = make_colour_folder(tmp_path / "colours")
    result = classifier.evaluate_folder(folder, out_png=tmp_path / "out" / "confusion.png")
    assert result["n"] == 36 and result["labels"] == sorted(COLOURS)
    assert result["skipped"] == [str(folder / "red" / "broken.png")]
    assert result["top1"] >= 0.5 and result["top5"] >= result["top1"]
    confusion = torch.tensor(result["confusion"])
    assert confusion.shape == (6, 6) and confusion.sum(dim=1).tolist() == [6] * 6
    assert confusion.diagonal().sum() / 36 == pytest.approx(result["top1"])
    assert all(v["n"] == 6 for v in result["per_class"].values())
    png = tmp_path / "out" / "confusion.png"
    assert result["confusion_png"] == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 200
        im.verify()
    with pytest.raises(ValueError, match="2 labels for 6 class folders"):
        classifier.evaluate_folder(folder, labels=["a", "b"])


# ---------------------------------------------------------------------------- CLI

def run_cli(capsys, *argv):
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_classifies_files_and_folders_to_json(trained_clip, tmp_path, capsys):
    (tmp_path / "imgs" / "nested").mkdir(parents=True)
    shape_png(tmp_path / "imgs" / "a.png", "red")
    shape_png(tmp_path / "imgs" / "nested" / "b.png", "blue", "square")
    single = shape_png(tmp_path / "c.png", "green", "triangle")
    code, out, _ = run_cli(capsys, str(tmp_path / "imgs"), str(single), "--labels", "red,blue,green",
                           "--top-k", "2", "--checkpoint", str(trained_clip))
    assert code == 0
    rows = json.loads(out)
    assert [r["image"] for r in rows] == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "nested" / "b.png"),
                                          str(single)]
    assert all(len(r["predictions"]) == 2 for r in rows)
    assert [r["predictions"][0]["label"] for r in rows] == ["red", "blue", "green"]


def test_cli_labels_file_templates_file_and_table(trained_clip, tmp_path, capsys):
    img = shape_png(tmp_path / "x.png", "yellow", "star")
    (tmp_path / "labels.txt").write_text("# colours\nyellow\npurple\n\norange\n")
    (tmp_path / "templates.txt").write_text("a {} shape\n{}\n")
    code, out, _ = run_cli(capsys, str(img), "--labels-file", str(tmp_path / "labels.txt"), "--templates-file",
                           str(tmp_path / "templates.txt"), "--format", "table", "--top-k", "3",
                           "--checkpoint", str(trained_clip))
    assert code == 0
    line, = out.strip().splitlines()
    assert line.startswith(str(img)) and line.split()[1] == "yellow"
    assert all(name in line for name in ("purple", "orange"))


def test_cli_eval_folder_writes_confusion_png(trained_clip, tmp_path, capsys):
    folder = make_colour_folder(tmp_path / "colours", per_class=2)
    code, out, _ = run_cli(capsys, "--eval-folder", str(folder), "--confusion-png", str(tmp_path / "cm.png"),
                           "--checkpoint", str(trained_clip))
    assert code == 0
    result = json.loads(out)
    want = ZeroShotClassifier.from_checkpoint(trained_clip, device="cpu").evaluate_folder(folder)
    assert result["n"] == want["n"] == 12 and result["labels"] == want["labels"]
    assert result["top1"] == pytest.approx(want["top1"]) and result["top5"] == pytest.approx(want["top5"])
    assert result["confusion"] == want["confusion"] and result["per_class"] == want["per_class"]
    assert result["skipped"] == want["skipped"] == [str(folder / "red" / "broken.png")]
    with Image.open(tmp_path / "cm.png") as im:
        assert im.format == "PNG"


def test_cli_bad_input_exits_nonzero_with_a_message(trained_clip, tmp_path, capsys):
    img = shape_png(tmp_path / "x.png")
    (tmp_path / "fake.png").write_text("hello")
    ckpt = ["--checkpoint", str(trained_clip)]
    cases = [([str(img), *ckpt], "no labels given"),
             ([str(img), "--labels", " , ", *ckpt], "no labels given"),
             ([*ckpt, "--labels", "a"], "no images given"),
             ([str(tmp_path / "fake.png"), "--labels", "a", *ckpt], "not an image"),
             ([str(tmp_path / "missing.png"), "--labels", "a", *ckpt], "no such file")]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and out == "", (argv, err)
    with pytest.raises(SystemExit, match="python recipes/clip/train.py"):
        cli_main([str(img), "--labels", "a", "--checkpoint", str(tmp_path / "no_run")])


@pytest.mark.parametrize("template", ["{} {x}", "{{}}{:>100000000}", "{}{"])
def test_cli_refuses_a_bad_templates_file_before_loading_the_model(tmp_path, capsys, monkeypatch, template):
    import mm.zeroshot.__main__ as cli

    monkeypatch.setattr(cli, "load_classifier", lambda args: pytest.fail("model loaded for a bad template"))
    img = shape_png(tmp_path / "x.png")
    (tmp_path / "templates.txt").write_text(f"a photo of a {{}}, in the wild\n{template}\n")
    code, out, err = run_cli(capsys, str(img), "--labels", "red", "--templates-file", str(tmp_path / "templates.txt"))
    assert code == 2 and out == "" and BAD_TEMPLATES[template] in err and template in err
    (tmp_path / "empty.txt").write_text("# nothing but a comment\n")
    code, _, err = run_cli(capsys, str(img), "--labels", "red", "--templates-file", str(tmp_path / "empty.txt"))
    assert code == 2 and "no templates" in err


def run_module(*argv: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(python(*argv), cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def cli_exit_in_process(capsys, caplog, *argv: str) -> subprocess.CompletedProcess:
    """`python -m mm.zeroshot ARGV` that ends in SystemExit, run as cli_main(ARGV) in this process (without a
    fresh process's imports): its exit status, stdout and stderr as the interpreter would end on it, stderr
    holding what was printed there, warned (Python prints warnings on stderr), logged at WARNING or above (with no
    logging set up, Python prints those on stderr too) and SystemExit's message. Any other exception fails the
    test, as a traceback would."""
    capsys.readouterr()
    caplog.clear()
    with warnings.catch_warnings(record=True) as warned, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as e:
            cli_main(list(argv))
    out, err = capsys.readouterr()
    ignored_by_default = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    warned = [w for w in warned if not issubclass(w.category, ignored_by_default)]  # as Python's default filters
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    code, message = exit_status(e.value)
    stderr = "".join(f"{line}\n" for line in [*err.splitlines(), *map(str, warned), *logged,
                                                *([message] if message is not None else [])])
    return subprocess.CompletedProcess(argv, code, out, stderr)


def test_cli_refuses_a_checkpoint_that_would_run_code_in_one_line(hostile_run, tmp_path, capsys, caplog):
    """The run folder as a user passes it, in a fresh process; its step file, the same load, in this process."""
    run, step, marker = hostile_run
    img = shape_png(tmp_path / "x.png")
    argv = [str(img), "--labels", "a", "--checkpoint"]
    fresh = run_module("-m", "mm.zeroshot", *argv, str(run))
    for proc in (fresh, cli_exit_in_process(capsys, caplog, *argv, str(step))):
        assert proc.returncode != 0 and proc.stdout == ""
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert str(step) in proc.stderr and "refused" in proc.stderr
    assert not marker.exists()


def test_cli_explains_a_checkpoint_without_model_cfg_in_one_line(tmp_path, capsys, caplog):
    """The case that reaches open_clip in a fresh process, the other in this process."""
    img = shape_png(tmp_path / "x.png")
    for state, words, fresh in [({"model": {}}, "no model config", False),
                                ({"model": {}, "extra": {"model_cfg": {}}}, "cannot rebuild", True)]:
        run = tmp_path / words.replace(" ", "_")
        write_checkpoint(run, state)
        argv = [str(img), "--labels", "a", "--checkpoint", str(run)]
        proc = run_module("-m", "mm.zeroshot", *argv) if fresh else cli_exit_in_process(capsys, caplog, *argv)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        # (open_clip may log a WARNING line of its own first)
        error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and str(run) in error_lines[0] and words in error_lines[0], proc.stderr


def test_python_dash_m_mm_zeroshot_runs_as_a_user_runs_it(trained_clip, tmp_path):
    img = shape_png(tmp_path / "x.png", "red")
    ok = subprocess.run(python("-m", "mm.zeroshot", str(img), "--labels", "red,blue", "--checkpoint", str(trained_clip)),
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["predictions"][0]["label"] == "red"
    missing = subprocess.run(python("-m", "mm.zeroshot", str(img), "--labels", "red"), cwd=tmp_path,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert missing.returncode != 0 and "no CLIP checkpoint at runs/clip" in missing.stderr
    assert "python recipes/clip/train.py" in missing.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_it_gives_the_cpu_results(trained_clip, classifier):
    scenes = [img for img, _ in render_shapes(8, seed=9)]
    gpu = ZeroShotClassifier.from_checkpoint(trained_clip, device="cuda")
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    for a, b in zip(classifier.classify(scenes, COLOURS, top_k=6), gpu.classify(scenes, COLOURS, top_k=6, batch_size=3)):
        assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=1e-3)
