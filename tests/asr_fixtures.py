"""What the decoding and transcription tests share: a tiny ASR model trained once per session that really
transcribes its training clips, those clips, and openai-whisper's Tokenizer interface over our tokenizer
(for parity with whisper.decoding and whisper.transcribe)."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mm.asr.convert import OpenAITokenizer
from tests.helpers import run_asr_recipe, tiny_asr_corpus

# recipes/asr's tiny preset, trained until it has learnt its 36 clips by heart (~45-65 s on 2 cores): no
# speed perturbation, no label smoothing, a higher learning rate; half the clips with segments are trained
# with timestamps, so both modes are learnt (the single-phrase clips only without).
TRAIN_STEPS = 700
TRAIN_ARGS = ["--config=tiny", "--eval_data=none", f"--max_steps={TRAIN_STEPS}", "--max_seconds=8", "--lr=4e-3",
              "--warmup_steps=20", "--speed_factors=1.0", "--label_smoothing=0", "--timestamp_prob=0.5",
              f"--ckpt_every={TRAIN_STEPS}", "--log_every=100"]


def trained_asr_run(tmp_path_factory) -> Path:
    """<base temp>/asr_trained_run: a recipes/asr run folder (config.yaml, tokenizer/, checkpoints/, export/hf,
    export/whisper.pt), trained by the first fixture of the session that asks and reused by the others
    (each test module declares its own fixture; results.json, written last, marks a finished run)."""
    corpus = tiny_asr_corpus(tmp_path_factory)
    out = tmp_path_factory.getbasetemp() / "asr_trained_run"
    if not (out / "results.json").is_file():
        run_asr_recipe([*TRAIN_ARGS, f"--train_data={corpus}/train", f"--out_dir={out}"])
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    return trained_asr_run(tmp_path_factory)


def training_clips(run: Path) -> list[tuple[np.ndarray, dict]]:
    """The run's training utterances: (float32 samples at 16 kHz, their json: text, language, [segments])."""
    import soundfile
    import yaml

    from mm.shards import read_samples

    config = yaml.safe_load((run / "config.yaml").read_text())
    clips = []
    for sample in read_samples(sorted(str(p) for p in Path(config["train_data"]).glob("*.tar")), {"bad_shards": 0}):
        audio, _ = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
        clips.append((audio, json.loads(sample["json"])))
    return clips


def heldout_clips(run: Path) -> list[tuple[str, bytes, dict]]:
    """The held-out utterances of the run's corpus, never heard in training: (key, flac bytes, their json)."""
    import yaml

    from mm.shards import read_samples

    heldout = Path(yaml.safe_load((run / "config.yaml").read_text())["train_data"]).parent / "heldout"
    return [(sample["__key__"], sample["flac"], json.loads(sample["json"]))
            for sample in read_samples(sorted(str(p) for p in heldout.glob("*.tar")), {"bad_shards": 0})]


def concatenate(clips: list[np.ndarray], gap_seconds: float,
                sample_rate: int = 16000) -> tuple[np.ndarray, list[float]]:
    """The clips with gap_seconds of silence before each: (audio, each clip's start in seconds)."""
    gap = np.zeros(round(gap_seconds * sample_rate), dtype=np.float32)
    pieces, starts, n = [], [], 0
    for clip in clips:
        pieces += [gap, clip]
        starts.append((n + len(gap)) / sample_rate)
        n += len(gap) + len(clip)
    return np.concatenate(pieces), starts


# ---------------------------------------------------------------- openai-whisper over our tokenizer

def use_our_tokenizer_in_openai(monkeypatch, tokenizer) -> None:
    """Make whisper.decoding and whisper.transcribe build OpenAITokenizer(tokenizer) instead of their own, and
    whisper.transcribe compute our log-mel (equal to theirs to 1e-4, but not bit for bit)."""
    import whisper.decoding

    from mm.asr.features import log_mel_spectrogram

    def get_tokenizer(multilingual, *, num_languages=99, language=None, task=None):
        return OpenAITokenizer(tokenizer, language, task)

    transcribe_module = sys.modules["whisper.transcribe"]  # `whisper.transcribe` is the function
    monkeypatch.setattr(whisper.decoding, "get_tokenizer", get_tokenizer)
    monkeypatch.setattr(transcribe_module, "get_tokenizer", get_tokenizer)
    monkeypatch.setattr(transcribe_module, "log_mel_spectrogram", log_mel_spectrogram)
