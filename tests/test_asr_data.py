"""mm/asr/data.py: the ASR decode stage (audio -> log-mel + Whisper targets) and the batch collate, on samples of
the tiny espeak corpus."""
import io
import json
import random
import zlib

import numpy as np
import pytest
import soundfile
import torch

from mm.asr.data import asr_collate, asr_decoder, mel_seconds, read_transcripts
from mm.asr.features import FRAMES_PER_SECOND, N_FRAMES
from mm.asr.tokenizer import TIME_PRECISION, train_bpe
from mm.batching import BucketBatcher, SampleTooLong
from mm.shards import LoaderPosition, ShardStream, expand_shard_spec, make_loader, read_samples
from tests.helpers import one_torch_thread, tiny_asr_corpus, write_tar  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_asr_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def raw(corpus) -> list[dict]:
    """The training shard's samples as the loader reads them (flac + json bytes)."""
    return list(read_samples([str(corpus / "train" / "shard-000000.tar")], {"bad_shards": 0}))


@pytest.fixture(scope="module")
def tok(corpus):
    return train_bpe(read_transcripts([str(corpus / "train" / "shard-000000.tar")]), 300)


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def with_segments(raw: list[dict], want: bool) -> list[dict]:
    return [s for s in raw if ("segments" in meta(s)) == want]


def decode_seeded(decode, sample: dict, seed: str):
    """decode(sample) with the global RNGs seeded as ShardStream seeds them per sample; they are restored after."""
    s = zlib.crc32(seed.encode())
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(s)
        random.seed(s)
        try:
            return decode(sample)
        finally:
            random.setstate(state)


def timestamp_seconds(tok, tokens) -> list[float]:
    return [(t - tok.timestamp_begin) * TIME_PRECISION for t in tokens.tolist() if t >= tok.timestamp_begin]


def test_decoded_sample_shapes(raw, tok):
    sample = raw[0]
    audio_frames = soundfile.info(io.BytesIO(sample["flac"])).frames
    out = asr_decoder(tok, train=False, ctc=True)(sample)
    assert out["mel"].shape == (80, audio_frames // 160) and out["mel"].dtype == torch.float32
    assert out["tokens"].dtype == torch.long and out["tokens"].dim() == 1
    assert out["loss_mask"].dtype == torch.bool and out["loss_mask"].shape == out["tokens"].shape
    assert out["duration"] == audio_frames / 16000 == pytest.approx(meta(sample)["duration"], abs=1e-3)
    assert (out["language"], out["text"]) == (meta(sample)["language"], meta(sample)["text"])
    assert out["ctc_tokens"].tolist() == tok.encode(" " + meta(sample)["text"])
    assert "ctc_tokens" not in asr_decoder(tok, train=False)(sample)
    assert asr_decoder(tok, n_mels=128, train=False)(sample)["mel"].shape == (128, audio_frames // 160)
    padded = asr_decoder(tok, train=True, pad_to_30s=True, speed_factors=(1.1,))(sample)
    assert padded["mel"].shape == (80, N_FRAMES)  # fine-tuning mode: always 30 s of input
    assert padded["duration"] == pytest.approx(audio_frames / 16000 / 1.1, abs=1e-3)  # the speech, not the padding


def test_target_is_sot_language_transcribe_then_text_then_eot(raw, tok):
    decode = asr_decoder(tok, train=False)
    for sample in raw[:3]:
        out = decode(sample)
        lang = tok.language_token(meta(sample)["language"])
        assert out["tokens"][:4].tolist() == [tok.sot, lang, tok.transcribe, tok.no_timestamps]
        assert out["tokens"][-1] == tok.eot and (out["tokens"][1:-1] != tok.eot).all()
        assert tok.decode(out["tokens"]) == " " + meta(sample)["text"]
        assert out["loss_mask"].tolist() == [False] + [True] * (len(out["tokens"]) - 1)  # all but sot predicted


def test_timestamps_only_for_samples_with_segments_and_only_in_training(raw, tok):
    segmented, plain = with_segments(raw, True), with_segments(raw, False)
    assert segmented and plain
    always = asr_decoder(tok, train=True, timestamp_prob=1.0, speed_factors=(1.0,), spec_augment_on=False)
    for sample in segmented:
        tokens = always(sample)["tokens"]
        assert tok.no_timestamps not in tokens.tolist()
        starts_ends = [t for seg in meta(sample)["segments"] for t in (seg["start"], seg["end"])]
        assert timestamp_seconds(tok, tokens) == pytest.approx(starts_ends, abs=TIME_PRECISION / 2 + 1e-9)
        assert tokens[3] >= tok.timestamp_begin  # the first segment's start follows the task token
    for sample in plain:
        assert timestamp_seconds(tok, always(sample)["tokens"]) == []
    never = asr_decoder(tok, train=True, timestamp_prob=0.0, speed_factors=(1.0,), spec_augment_on=False)
    evaluation = asr_decoder(tok, train=False, timestamp_prob=1.0)
    for sample in segmented:
        for decode in (never, evaluation):
            tokens = decode(sample)["tokens"].tolist()
            assert tokens[3] == tok.no_timestamps and max(tokens) < tok.timestamp_begin


def test_speed_perturbation_scales_duration_and_segment_times(raw, tok):
    sample = with_segments(raw, True)[0]
    times = {}
    for factor in (1.0, 0.8, 1.25):
        out = asr_decoder(tok, train=True, timestamp_prob=1.0, speed_factors=(factor,), spec_augment_on=False)(sample)
        assert out["duration"] == pytest.approx(meta(sample)["duration"] / factor, abs=2e-3)
        assert mel_seconds(out) == pytest.approx(out["duration"], abs=0.01)
        times[factor] = timestamp_seconds(tok, out["tokens"])
    original = [t for seg in meta(sample)["segments"] for t in (seg["start"], seg["end"])]
    for factor in (0.8, 1.25):
        assert times[factor] == pytest.approx([t / factor for t in original], abs=TIME_PRECISION / 2 + 1e-6)
    assert times[0.8][-1] > times[1.0][-1] > times[1.25][-1]


def test_same_per_sample_seed_gives_the_same_augmentation(raw, tok):
    decode = asr_decoder(tok, train=True, noise_prob=0.5, timestamp_prob=0.5, ctc=True)
    sample = with_segments(raw, True)[0]
    a, b = decode_seeded(decode, sample, "0-0-0-7"), decode_seeded(decode, sample, "0-0-0-7")
    torch.testing.assert_close(a["mel"], b["mel"], rtol=0, atol=0)
    assert torch.equal(a["tokens"], b["tokens"]) and a["duration"] == b["duration"]
    others = [decode_seeded(decode, sample, f"0-0-0-{pos}") for pos in (8, 9, 10)]
    for c in others:  # another place in the stream: other SpecAugment masks at least
        assert c["mel"].shape != a["mel"].shape or not torch.equal(c["mel"], a["mel"])


def test_collate_pads_and_masks(raw, tok):
    decode = asr_decoder(tok, train=False, ctc=True)
    samples = [decode(s) for s in raw[:4]]
    batch = asr_collate(tok.eot)(samples)
    B, frames = 4, [s["mel"].shape[-1] for s in samples]
    lengths = [len(s["tokens"]) for s in samples]
    assert len(set(frames)) > 1 and len(set(lengths)) > 1  # the padding is exercised
    assert batch["mel"].shape == (B, 80, max(frames)) and batch["mel_lengths"].tolist() == frames
    assert batch["tokens"].shape == batch["labels"].shape == (B, max(lengths) - 1)
    for i, s in enumerate(samples):
        n = lengths[i]
        torch.testing.assert_close(batch["mel"][i, :, :frames[i]], s["mel"], rtol=0, atol=0)
        assert (batch["mel"][i, :, frames[i]:] == 0).all()
        assert batch["tokens"][i, :n - 1].tolist() == s["tokens"][:-1].tolist()
        assert (batch["tokens"][i, n:] == tok.eot).all()  # padding (never a target)
        assert batch["labels"][i, :n - 1].tolist() == s["tokens"][1:].tolist()  # next token at each position
        assert (batch["labels"][i, n - 1:] == -100).all()
        assert batch["ctc_targets"][i, :batch["ctc_lengths"][i]].tolist() == s["ctc_tokens"].tolist()
        assert (batch["ctc_targets"][i, batch["ctc_lengths"][i]:] == 0).all()
    assert (batch["tokens"][:, 0] == tok.sot).all() and not (batch["labels"] == tok.sot).any()
    assert batch["labels"][:, 0].tolist() == [tok.language_token(s["language"]) for s in samples]
    assert batch["ctc_lengths"].tolist() == [len(s["ctc_tokens"]) for s in samples]
    assert batch["texts"] == [s["text"] for s in samples] and batch["durations"] == [s["duration"] for s in samples]
    assert batch["languages"] == [s["language"] for s in samples]


def test_collate_labels_are_minus_100_where_the_loss_mask_is_off(tok):
    tokens, mask = tok.build_target("hello", "en", prev_text="before")  # <|startofprev|> ... sot: not predicted
    sample = {"mel": torch.ones(80, 10), "tokens": torch.tensor(tokens), "loss_mask": torch.tensor(mask),
              "language": "en", "text": "hello", "duration": 0.1}
    labels = asr_collate(tok.eot)([sample])["labels"][0].tolist()
    n_prev = tokens.index(tok.sot)
    assert labels[:n_prev] == [-100] * n_prev  # up to and including the sot position
    assert labels[n_prev:] == tokens[n_prev + 1:]


def test_unknown_or_missing_language_raises(raw, tok):
    sample = raw[0]
    unknown = {**sample, "json": json.dumps({**meta(sample), "language": "xx"}).encode()}
    with pytest.raises(ValueError, match="language 'xx' has no token"):
        asr_decoder(tok, train=False)(unknown)
    unlabelled = {**sample, "json": json.dumps({k: v for k, v in meta(sample).items() if k != "language"}).encode()}
    with pytest.raises(ValueError, match="no language"):
        asr_decoder(tok, train=False)(unlabelled)
    out = asr_decoder(tok, train=False, default_language="el")(unlabelled)
    assert out["language"] == "el" and out["tokens"][1] == tok.language_token("el")


def test_mel_seconds():
    assert mel_seconds({"mel": torch.zeros(80, 250)}) == 2.5
    assert mel_seconds({"mel": torch.zeros(128, 3000)}) == 30.0 == N_FRAMES / FRAMES_PER_SECOND


def tone_flac(seconds: float) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * 16000)) / 16000
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="FLAC")
    return buf.getvalue()


def test_utterance_over_max_seconds_is_counted_too_long(raw, tok, tmp_path):
    """ASRConfig.max_seconds: "longer utterances are skipped and counted (too_long)"."""
    long = {"__key__": "long", "flac": tone_flac(6.0), "json": json.dumps({"text": "a long one", "language": "en"})}
    write_tar(tmp_path / "shard.tar", [long] + [{k: v for k, v in s.items() if not k.startswith("__url")}
                                                 for s in raw[:12]])
    decode = asr_decoder(tok, train=False, max_seconds=5.0)
    stream = ShardStream(expand_shard_spec(str(tmp_path / "shard.tar")), decode, asr_collate(tok.eot),
                         BucketBatcher(mel_seconds, 8.0, []), num_workers=0, shuffle_buffer=0)
    _, state = next(iter(make_loader(stream, 0, LoaderPosition(0))))
    assert (state["too_long"], state["bad_samples"]) == (1, 0)


def test_a_slowed_down_utterance_still_fits_the_encoder(tok):
    sample = {"__key__": "long", "flac": tone_flac(29.0), "json": json.dumps({"text": "a long one", "language": "en"})}
    decode = asr_decoder(tok, train=True, max_seconds=30.0, speed_factors=(0.9,), spec_augment_on=False)
    with pytest.raises(SampleTooLong, match="exceed the encoder's 3000"):  # the loader counts it as too_long
        decode(sample)
    assert decode({**sample, "flac": tone_flac(26.0)})["mel"].shape[-1] <= N_FRAMES
