"""benchmarks/asr_decode.py end to end on a tiny random model and six clips: every side runs and is scored, the
30 s sides agree where they must, --gpu skips cleanly without CUDA, and the long-form throughput path runs (on CPU,
tiny dims). Speed is not checked."""
import io
import json

import numpy as np
import pytest

from tests.helpers import one_torch_thread, write_tar  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = {"en": ["the cat sat", "a dog ran far", "red hats"], "de": ["der hund lief", "rote hüte", "ein tag"]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(a recipes/asr-like run folder with a random cpu_tiny model in both export formats, its held-out shards)."""
    import soundfile
    import torch
    import yaml

    from mm.asr.convert import export_hf, export_openai
    from mm.asr.model import Whisper, dims_for
    from mm.asr.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("asr_decode")
    run, data = root / "run", root / "heldout"
    data.mkdir()
    tokenizer = train_bpe([t for texts in TEXTS.values() for t in texts] * 20, 300)
    tokenizer.save(run / "tokenizer")
    (run / "config.yaml").write_text(yaml.safe_dump({"pad_to_30s": "auto", "init_from": None}))
    torch.manual_seed(0)
    model = Whisper(dims_for("cpu_tiny", n_vocab=tokenizer.vocab_size, n_mels=80))
    with torch.no_grad():  # text tokens' logits well apart (no near-ties) and far above the specials' (eot's too)
        model.decoder.token_embedding.weight[:tokenizer.eot] *= 50
    export_openai(model, run / "export" / "whisper.pt")
    ids = {"decoder_start_token_id": tokenizer.sot, "eos_token_id": tokenizer.eot, "pad_token_id": tokenizer.eot,
           "bos_token_id": tokenizer.eot}
    export_hf(model, run / "export" / "hf", tokenizer_dir=run / "tokenizer", **ids)
    rng, samples = np.random.default_rng(0), []
    for language, texts in TEXTS.items():
        for i, text in enumerate(texts):
            audio = (0.1 * rng.standard_normal(16000 + 4000 * i)).astype(np.float32)
            flac = io.BytesIO()
            soundfile.write(flac, audio, 16000, format="FLAC")
            meta = {"text": text, "language": language, "duration": len(audio) / 16000}
            samples.append({"__key__": f"{language}{i}", "flac": flac.getvalue(), "json": json.dumps(meta)})
    write_tar(data / "shard-000000.tar", samples)
    return run, data


def test_every_side_runs_and_the_30s_sides_agree(tiny_run, tmp_path, capsys):
    from benchmarks.asr_decode import SIDES, main

    run, data = tiny_run
    res = main([f"--run={run}", f"--data={data}", "--max_new_tokens=5", "--batch_size=2", "--gpu", "--threads=1",
                f"--out={tmp_path}"])
    sides = res["sides"]
    assert list(sides) == list(SIDES)
    assert max(res["logit_max_diff"].values()) < 1e-4  # one set of weights in three implementations
    for name, row in sides.items():
        assert len(row["texts"]) == 6 and row["wall_s"] > 0 and row["audio_s"] == pytest.approx(7.5), name
        assert row["capped"] == 6 and row["tokens"] == 5 * 6 and row["wer"] > 0, name  # eot is never likeliest
    # both pad each window's log-mel with zeros to 3000 frames and decode greedily: the same text, clip for clip
    assert sides["mm 30s"]["texts"] == sides["openai"]["texts"]
    assert sides["mm"]["ratio_vs_mm"] == 1.0
    assert len(res["verdict"]) == 2
    assert res["hf_features_check"] == {"clips": 6, "same_as_hf": 6}  # hf: our decode on its silence-padded input
    out = capsys.readouterr().out
    assert "same as openai" in out and "figures:" in out
    if "gpu" not in res:
        assert "--gpu: skipped, CUDA is not available" in out
    assert json.loads((tmp_path / "results.json").read_text())["sides"]["hf"]["texts"] == sides["hf"]["texts"]


def test_long_form_throughput_path_on_cpu(tiny_run):
    from benchmarks.asr_decode import load_clips, long_files, longform_throughput

    clips = load_clips(tiny_run[1])
    audios = long_files(clips, n_files=2, minutes=0.75)  # 45 s each: two windows
    assert [len(a) for a in audios] == [720000, 720000] and not np.array_equal(audios[0], audios[1])
    for precision in ("fp32", "bf16 autocast", "bf16 weights"):
        r = longform_throughput("cpu_tiny", "cpu", audios, batch_size=2, tokens=3, precision=precision)
        assert r["windows"] == r["segments"] == 4  # each window decoded once, to one segment
        assert r["audio_h"] == pytest.approx(90 / 3600) and r["audio_hours_per_hour"] > 0
