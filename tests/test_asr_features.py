"""mm.asr.features: the log-mel front end against Hugging Face's and openai-whisper's; the augmentations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mm.asr.features import (FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, add_noise,
                             augment_audio, log_mel_spectrogram, mel_filters, num_frames, pad_or_trim, speed_perturb,
                             spec_augment)


def speechlike(seconds: float = 2.0, seed: int = 0) -> torch.Tensor:
    """A chirp under a fading envelope plus a little noise, [seconds * 16000] (not a multiple of the hop)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE) + 77) / SAMPLE_RATE
    chirp = torch.sin(2 * torch.pi * (200 + 900 * t) * t) * (0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t))
    return 0.3 * chirp + 0.01 * torch.randn(len(t), generator=g)


@pytest.fixture(scope="module")
def hf_extractor():
    transformers = pytest.importorskip("transformers")
    return {n: transformers.WhisperFeatureExtractor(feature_size=n) for n in (80, 128)}


def test_constants_are_whispers():
    audio = pytest.importorskip("whisper.audio")
    assert (SAMPLE_RATE, HOP_LENGTH, N_SAMPLES, N_FRAMES, FRAMES_PER_SECOND) == (
        audio.SAMPLE_RATE, audio.HOP_LENGTH, audio.N_SAMPLES, audio.N_FRAMES, audio.FRAMES_PER_SECOND)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_librosa_and_whisper_npz(n_mels):
    librosa = pytest.importorskip("librosa")
    whisper_audio = pytest.importorskip("whisper.audio")
    ours = mel_filters(n_mels)
    assert ours.shape == (n_mels, 201) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels), atol=1e-7)
    np.testing.assert_allclose(ours.numpy(), whisper_audio.mel_filters("cpu", n_mels).numpy(), atol=1e-7)
    assert mel_filters(n_mels) is ours  # cached
    with pytest.raises(ValueError, match="80 or 128"):
        mel_filters(64)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_equals_hf_extractor_on_30s(hf_extractor, n_mels):
    audio = speechlike()
    hf = hf_extractor[n_mels](audio.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    ours = log_mel_spectrogram(pad_or_trim(audio), n_mels)
    assert ours.shape == hf.shape == (n_mels, N_FRAMES)
    np.testing.assert_allclose(ours.numpy(), hf, atol=1e-4)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_unpadded_equals_hf_longest(hf_extractor, n_mels):
    """padding="longest": one clip is not padded at all; in a batch, each row is zero-padded to the longest,
    so a shorter clip agrees with ours up to its last frame (whose window reaches past the clip's end, into
    HF's zeros where we reflect). HF's attention mask counts the frames whose centre lies in the clip,
    ceil(T / 160) (capped at the batch's frames): for a padded clip, one more than num_frames(T) = T // 160
    when T is not a multiple of the hop."""
    long, short = speechlike(2.0), speechlike(0.8, seed=1)
    extract = hf_extractor[n_mels]
    one = extract(long.numpy(), sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="np").input_features[0]
    ours = log_mel_spectrogram(long, n_mels)
    assert ours.shape == one.shape == (n_mels, num_frames(len(long))) and num_frames(len(long)) == len(long) // 160
    np.testing.assert_allclose(ours.numpy(), one, atol=1e-4)

    batch = extract([long.numpy(), short.numpy()], sampling_rate=SAMPLE_RATE, padding="longest",
                    return_attention_mask=True, return_tensors="np")
    assert batch.attention_mask.sum(-1).tolist() == [num_frames(len(long)), -(-len(short) // HOP_LENGTH)]
    frames = num_frames(len(short))
    np.testing.assert_allclose(log_mel_spectrogram(short, n_mels)[:, :-1].numpy(),
                               batch.input_features[1][:, :frames - 1], atol=1e-4)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_equals_openai_whisper(n_mels):
    whisper_audio = pytest.importorskip("whisper.audio")
    audio = speechlike(1.0)
    for padding in (0, 1000):
        reference = whisper_audio.log_mel_spectrogram(audio, n_mels, padding=padding)
        np.testing.assert_allclose(log_mel_spectrogram(audio, n_mels, padding).numpy(), reference.numpy(), atol=1e-4)
    # NumPy in, as mm.media.load_audio gives
    np.testing.assert_allclose(log_mel_spectrogram(audio.numpy()).numpy(),
                               whisper_audio.log_mel_spectrogram(audio).numpy(), atol=1e-4)


def test_batch_is_floored_per_utterance():
    loud, quiet = speechlike(0.5), 1e-3 * speechlike(0.5, seed=1)
    batch = log_mel_spectrogram(torch.stack([loud, quiet]))
    assert batch.shape == (2, 80, num_frames(len(loud)))
    torch.testing.assert_close(batch[0], log_mel_spectrogram(loud))
    torch.testing.assert_close(batch[1], log_mel_spectrogram(quiet))


def test_too_short_audio_is_refused():
    with pytest.raises(ValueError, match="too short"):
        log_mel_spectrogram(torch.zeros(200))
    assert log_mel_spectrogram(torch.zeros(100), padding=160).shape == (80, 1)


def test_pad_or_trim_tensor_and_numpy():
    x = torch.arange(10.0)
    assert pad_or_trim(x, 4).tolist() == [0, 1, 2, 3]
    assert pad_or_trim(x, 12).tolist() == list(range(10)) + [0, 0]
    assert pad_or_trim(x, 10) is x
    assert pad_or_trim(x).shape == (N_SAMPLES,)
    m = torch.ones(2, 80, 5)
    assert pad_or_trim(m, 7).shape == (2, 80, 7) and pad_or_trim(m, 3, axis=1).shape == (2, 3, 5)
    assert pad_or_trim(m, 4, axis=0)[2:].abs().sum() == 0
    a = np.ones((3, 5), dtype=np.float32)
    assert pad_or_trim(a, 8).shape == (3, 8) and pad_or_trim(a, 2, axis=0).shape == (2, 5)
    assert isinstance(pad_or_trim(a, 8), np.ndarray)


# ---------------------------------------------------------------- augmentation

def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    return float(10 * torch.log10(clean.pow(2).mean() / (noisy - clean).pow(2).mean()))


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_changes_length_by_the_factor(factor):
    audio = speechlike(1.0)
    out = speed_perturb(audio, factor)
    assert abs(len(out) - len(audio) / factor) <= 1
    assert speed_perturb(audio, 1.0) is audio
    with pytest.raises(ValueError):
        speed_perturb(audio, 0.0)


@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
def test_add_noise_hits_the_snr(colour):
    audio = speechlike(1.0)
    for target in (0.0, 10.0, 25.0):
        out = add_noise(audio, target, generator(0), colour=colour)
        assert out.shape == audio.shape and abs(snr_db(audio, out) - target) < 0.5


def test_add_noise_loops_a_given_clip_and_keeps_silence():
    audio, clip = speechlike(1.0), torch.randn(3000, generator=generator(5))  # clip shorter than the audio
    out = add_noise(audio, 15.0, generator(1), noise=clip)
    assert abs(snr_db(audio, out) - 15.0) < 0.5
    torch.testing.assert_close(out, add_noise(audio, 15.0, generator(1), noise=clip))
    assert not torch.equal(out, add_noise(audio, 15.0, generator(2), noise=clip))  # another crop offset
    silence = torch.zeros(1000)
    assert torch.equal(add_noise(silence, 10.0, generator(0)), silence)


def test_augment_audio_repeats_with_the_seed():
    audio = speechlike(1.0)
    outs = {seed: augment_audio(audio, generator(seed), noise_prob=0.5) for seed in range(6)}
    for seed, out in outs.items():
        torch.testing.assert_close(out, augment_audio(audio, generator(seed), noise_prob=0.5))
    assert len({(len(o), round(float(o.sum()), 4)) for o in outs.values()}) > 1  # seeds differ
    lengths = {len(o) for o in outs.values()}
    assert lengths <= {len(speed_perturb(audio, f)) for f in (0.9, 1.0, 1.1)}
    assert torch.equal(augment_audio(audio, generator(0), speed_factors=(1.0,), noise_prob=0.0), audio)


def test_spec_augment_repeats_with_the_seed_and_leaves_global_rng():
    mel = log_mel_spectrogram(speechlike(1.0))
    state = torch.random.get_rng_state()
    out = spec_augment(mel, generator(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(out, spec_augment(mel, generator(3)))
    assert not torch.equal(out, spec_augment(mel, generator(4)))
    assert out.shape == mel.shape and not torch.equal(out, mel)


@pytest.mark.parametrize("frames_seconds", [0.5, 3.0])
def test_spec_augment_masks_stay_within_their_widths(frames_seconds):
    g = generator(0)
    mel = torch.randn(80, int(frames_seconds * FRAMES_PER_SECOND), generator=g)  # no two cells equal
    fill = float(mel.mean())
    max_time = max(1, int(0.05 * mel.shape[1]))
    masked_any = False
    for seed in range(20):
        out = spec_augment(mel, generator(seed), freq_masks=1, freq_width=27, time_masks=1, time_width_ratio=0.05)
        assert out.shape == mel.shape
        changed = out != mel
        assert torch.all(out[changed] == fill)
        rows = changed.all(dim=1).nonzero().flatten()
        cols = changed.all(dim=0).nonzero().flatten()
        assert len(rows) <= 27 and len(cols) <= max_time
        for band in (rows, cols):  # one mask each: a contiguous band
            assert len(band) == 0 or band[-1] - band[0] + 1 == len(band)
        # every changed cell lies in a masked row or column
        assert torch.equal(changed, changed.all(dim=1, keepdim=True) | changed.all(dim=0, keepdim=True))
        masked_any |= bool(len(rows) or len(cols))
    assert masked_any


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_features_and_masks_on_cuda_equal_cpu():
    audio = speechlike(1.0)
    mel = log_mel_spectrogram(audio.cuda(), 128)
    assert mel.device.type == "cuda"
    torch.testing.assert_close(mel.cpu(), log_mel_spectrogram(audio, 128), atol=1e-4, rtol=0)
    masked = spec_augment(mel, generator(0))
    assert masked.device.type == "cuda"
    assert torch.equal((masked != mel).cpu(), spec_augment(mel.cpu(), generator(0)) != mel.cpu())
