"""Whisper's audio front end (log-mel spectrogram) and the waveform / spectrogram augmentations of the ASR recipe.

The constants and `log_mel_spectrogram` follow openai/whisper's audio.py, so a checkpoint trained by
OpenAI or converted by Hugging Face hears the same features from us (tests check both to 1e-4).

Randomness: every augmentation takes an explicit CPU `torch.Generator` and draws only from it (torch's
global RNG is left as it was), so the output is a function of (input, generator state). A loader that
seeds one generator per sample (from the run's seed, the epoch and the sample's index) thus makes a
resumed run repeat the augmentations of an uninterrupted one exactly.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio

from mm.media import SAMPLE_RATE

N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms between frames
CHUNK_LENGTH = 30  # seconds of audio the encoder hears at once
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-second chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a 30-second chunk
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
N_FREQS = N_FFT // 2 + 1  # 201 STFT bins


# ---------------------------------------------------------------- log-mel spectrogram

@lru_cache(maxsize=None)
def _slaney_mel_filters(n_mels: int) -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels) (Slaney scale and area norm): float32 [n_mels, 201].

    Computed here rather than by librosa because importing librosa.filters loads numba, a second or more
    in every loader worker; openai/whisper avoids it the same way (it ships these values in an .npz).
    """
    def hz_to_mel(hz):  # linear below 1 kHz, logarithmic above
        hz = np.asarray(hz, dtype=np.float64)
        log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(hz >= 1000.0, log_part, hz * 3.0 / 200.0)

    def mel_to_hz(mel):
        return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), mel * 200.0 / 3.0)

    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FREQS)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))  # [n_mels + 2]
    widths = np.diff(edges_hz)
    ramps = edges_hz[:, None] - fft_hz[None, :]  # [n_mels + 2, 201]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    area_norm = 2.0 / (edges_hz[2:] - edges_hz[:-2])  # each filter has unit area, as librosa's norm="slaney"
    return (triangles * area_norm[:, None]).astype(np.float32)


@lru_cache(maxsize=None)
def _mel_filters_on(n_mels: int, device: str) -> torch.Tensor:
    return torch.from_numpy(_slaney_mel_filters(n_mels)).to(device)


def mel_filters(n_mels: int, device: str | torch.device | None = None) -> torch.Tensor:
    """The mel filterbank that projects STFT power onto mel bins: float32 [n_mels, 201], cached per (n_mels, device).

    Equal to librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels), which is what Whisper's
    mel_filters.npz holds; Whisper models use 80 (up to large-v2) or 128 (large-v3) bins.
    """
    if n_mels not in (80, 128):
        raise ValueError(f"n_mels must be 80 or 128 (Whisper's filterbanks), got {n_mels}")
    return _mel_filters_on(n_mels, str(torch.device(device or "cpu")))


def log_mel_spectrogram(audio: torch.Tensor | np.ndarray, n_mels: int = 80, padding: int = 0) -> torch.Tensor:
    """Whisper's log-mel features of 16 kHz audio [T] or [B, T] -> [n_mels, frames] or [B, n_mels, frames].

    frames = (T + padding) // HOP_LENGTH: the STFT is centred (reflect padding), giving one frame more,
    and Whisper drops the last one. `padding` zero samples are appended first (Whisper pads 30 s of
    zeros, then cuts the frames it needs). Values are log10 power, floored at 8 (80 dB) below the
    utterance's peak, then scaled to about -1..1 by (x + 4) / 4. A batch is floored per utterance,
    so each row equals the utterance alone (openai-whisper's own batched call floors at the batch's
    peak; Hugging Face's extractor floors per utterance, as here).
    The computation runs on audio's device; T + padding must exceed N_FFT // 2 = 200 samples.
    """
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    if audio.shape[-1] <= N_FFT // 2:
        raise ValueError(f"audio of {audio.shape[-1]} samples is too short: the STFT needs more than {N_FFT // 2}")
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft[..., :-1].abs() ** 2  # [..., 201, frames]
    mel = mel_filters(n_mels, audio.device) @ power  # [..., n_mels, frames]
    log_spec = mel.clamp(min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)  # per utterance
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def num_frames(num_samples: int) -> int:
    """How many log-mel frames `num_samples` of audio give (log_mel_spectrogram's frames)."""
    return num_samples // HOP_LENGTH


def pad_or_trim(array: torch.Tensor | np.ndarray, length: int = N_SAMPLES, axis: int = -1):
    """`array` cut or zero-padded (at the end) to `length` along `axis`; a Tensor or a NumPy array, as given.

    With the defaults, audio [..., T] becomes the 30 s [..., 480000] that Whisper's encoder expects
    (the fine-tune mode); pad_or_trim(mel, N_FRAMES) does the same to a spectrogram [..., frames].
    """
    size = array.shape[axis]
    if torch.is_tensor(array):
        if size > length:
            return array.narrow(axis, 0, length)
        if size < length:
            widths = [0, 0] * (array.dim() - axis % array.dim())  # F.pad lists (left, right) from the last dim back
            widths[-1] = length - size
            return F.pad(array, widths)
        return array
    if size > length:
        return np.take(array, np.arange(length), axis=axis)
    if size < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - size)
        return np.pad(array, widths)
    return array


# ---------------------------------------------------------------- augmentation (waveform)

def speed_perturb(audio: torch.Tensor, factor: float, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Audio [T] played `factor` times faster -> [about T / factor]; pitch moves with it, as on tape.

    Kaldi's and Lhotse's speed perturbation: the samples are read as if recorded at sample_rate * factor
    and resampled to sample_rate. Factors like 0.9 and 1.1 keep the rate ratio small (10:9, 11:10), so
    the polyphase resampler stays cheap.
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    source_rate = round(sample_rate * factor)
    if source_rate == sample_rate:
        return audio
    return torchaudio.functional.resample(audio, orig_freq=source_rate, new_freq=sample_rate)


def _coloured_noise(num_samples: int, colour: str, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise [num_samples] whose power falls as 1/f^0 (white), 1/f (pink) or 1/f^2 (brown)."""
    exponents = {"white": 0.0, "pink": 1.0, "brown": 2.0}
    if colour not in exponents:
        raise ValueError(f"noise colour must be one of {sorted(exponents)}, got {colour!r}")
    white = torch.randn(num_samples, generator=generator)
    if colour == "white":
        return white
    freqs = torch.fft.rfftfreq(num_samples)
    freqs[0] = 1.0  # DC: zeroed below, so no division by zero
    spectrum = torch.fft.rfft(white) / freqs ** (exponents[colour] / 2)  # power ~ f^-a: amplitude ~ f^(-a/2)
    spectrum[0] = 0  # no DC offset (it would dominate brown noise)
    return torch.fft.irfft(spectrum, n=num_samples)


def add_noise(audio: torch.Tensor, snr_db: float, generator: torch.Generator, noise: torch.Tensor | None = None,
              colour: str = "white") -> torch.Tensor:
    """Audio [T] plus noise scaled so that 10 log10(P_audio / P_noise) = snr_db -> [T].

    The noise is `noise` (a clip [N], looped if shorter than T and cropped at an offset drawn from
    `generator`) or, without one, Gaussian noise of `colour` ("white", "pink", "brown") drawn from it.
    Silent audio, or a silent noise clip, comes back unchanged. `generator` must be a CPU generator.
    """
    T = audio.shape[-1]
    if noise is None:
        noise = _coloured_noise(T, colour, generator)
    else:
        noise = noise.reshape(-1).float().cpu()
        if len(noise) == 0:
            raise ValueError("the noise clip is empty")
        noise = noise.repeat(-(-T // len(noise)) + 1)  # +1: room for any offset below
        offset = int(torch.randint(len(noise) - T + 1, (1,), generator=generator))
        noise = noise[offset:offset + T]
    signal_power = audio.float().pow(2).mean()
    noise_power = noise.pow(2).mean()
    if signal_power == 0 or noise_power == 0:
        return audio
    scale = torch.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return audio + (scale * noise).to(audio.device, audio.dtype)


def augment_audio(audio: torch.Tensor, generator: torch.Generator, speed_factors: tuple[float, ...] = (0.9, 1.0, 1.1),
                  noise_prob: float = 0.5, snr_db_range: tuple[float, float] = (10.0, 30.0),
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """One training sample's waveform augmentation: audio [T] -> [T'] (T' = T unless the speed changed).

    Picks a speed factor uniformly from `speed_factors`, then with probability `noise_prob` adds noise
    (the `noise` clip, or white noise) at an SNR drawn uniformly from `snr_db_range` dB. The three choices
    are always drawn, in that order, so each is independent of the others' outcome.
    """
    factor = speed_factors[int(torch.randint(len(speed_factors), (1,), generator=generator))]
    noisy = bool(torch.rand(1, generator=generator) < noise_prob)
    low, high = snr_db_range
    snr_db = low + (high - low) * float(torch.rand(1, generator=generator))
    audio = speed_perturb(audio, factor)
    return add_noise(audio, snr_db, generator, noise=noise) if noisy else audio


# ---------------------------------------------------------------- augmentation (spectrogram)

def spec_augment(mel: torch.Tensor, generator: torch.Generator, freq_masks: int = 2, freq_width: int = 27,
                 time_masks: int = 2, time_width_ratio: float = 0.05) -> torch.Tensor:
    """SpecAugment's masking (Park et al. 2019) of a log-mel [n_mels, frames] -> a new [n_mels, frames].

    `freq_masks` bands of 0..freq_width mel bins and `time_masks` spans of 0..time_width_ratio * frames
    frames (at least 1), each at a uniformly drawn start. The time width scales with the length so a
    short utterance is not wiped out. Masked cells take the spectrogram's mean (a neutral level: 0 would
    be a fixed loudness in Whisper's scaling). torchaudio's masks draw from torch's global RNG, so they
    run under torch.random.fork_rng seeded from `generator`: the global RNG is left as it was, and the
    result depends on `generator` alone.
    """
    frames = mel.shape[-1]
    freq = torchaudio.transforms.FrequencyMasking(freq_mask_param=freq_width)
    time = torchaudio.transforms.TimeMasking(time_mask_param=max(1, int(time_width_ratio * frames)))
    fill = float(mel.mean())
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):  # CPU RNG only: torchaudio draws on the CPU even for a CUDA mel
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed, which would also reseed CUDA for good
        for _ in range(freq_masks):
            mel = freq(mel, mask_value=fill)
        for _ in range(time_masks):
            mel = time(mel, mask_value=fill)
    return mel
