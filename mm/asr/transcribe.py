"""Long-form transcription: whisper.transcribe's seek loop over 30-second windows, for one file or many.

    transcript = transcribe(model, tokenizer, audio)               # audio: float32 [T] at 16 kHz
    transcripts = transcribe_many(model, tokenizer, audios, batch_size=16)

Each step decodes the window starting at `seek` (a mel frame; 100 a second). The decoded timestamps say
where each segment starts and ends, relative to the window: offset by the window's start time, computed
from `seek` itself, so no error accumulates over an hour. The next window starts at the last complete
timestamp (the rest, cut mid-segment, is heard again), or after the whole window when the text ended
with a single timestamp or without any. A window whose decode looks wrong (gzip compression ratio too
high: a repetition loop; average log probability too low) is decoded again at the next temperature; one
the model calls silence (P(nospeech) high and log probability low) is skipped. The text so far is the
next window's prompt, dropped after a window that needed a high temperature (it may be wrong).

`transcribe_many` advances the seek loops of many files in lockstep: one batched decode per step for
all their windows (fallback re-decodes only the windows that need it), a new file taking the place of
a finished one. `transcribe` is transcribe_many of one file.

Not carried over from whisper.transcribe: word timestamps, clip_timestamps, carry_initial_prompt and
hallucination_silence_threshold. Segments without text (or of zero length) are dropped rather than kept
empty. A segment that no timestamp opens (from a model that says timestamps when asked for none) starts at its
window's start; whisper.transcribe reads its first text token as a time, before the window. VAD (optional) is an
energy threshold (librosa.effects.split): it cuts long silences before decoding and maps the timestamps back;
Silero VAD would be better at noise but needs a model download.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from mm.asr.decode import DecodingOptions, DecodingResult, check_options, decode, language_probs, resolve_language
from mm.asr.features import HOP_LENGTH, N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
from mm.asr.model import Whisper
from mm.media import SAMPLE_RATE

INPUT_STRIDE = 2  # mel frames per encoder position, i.e. per timestamp step
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp step


@dataclass
class Segment:
    id: int  # index in the transcript
    seek: int  # mel frame (10 ms) where its window began
    start: float  # seconds from the start of the audio
    end: float
    text: str  # as decoded: usually with a leading space
    tokens: list[int]  # text and timestamp tokens
    temperature: float  # of the decode that produced it
    avg_logprob: float  # of that window's decode
    compression_ratio: float
    no_speech_prob: float


@dataclass
class Transcript:
    text: str  # all segments' text, stripped
    language: str  # code, e.g. "en"
    language_prob: float  # the detected language's probability (1.0 when the language was given)
    segments: list[Segment]
    duration: float  # seconds of audio

    def to_dict(self) -> dict:
        """JSON-ready: plain types, segments as dicts."""
        return {"text": self.text, "language": self.language, "language_prob": self.language_prob,
                "duration": self.duration, "segments": [asdict(s) for s in self.segments]}


@dataclass(frozen=True)
class TranscribeOptions:
    # --- as whisper.transcribe
    temperature: float | tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # tried in turn while a decode fails
    compression_ratio_threshold: float | None = 2.4  # a decode whose text compresses better fails (a loop)
    logprob_threshold: float | None = -1.0  # a decode whose average log probability is lower fails
    no_speech_threshold: float | None = 0.6  # P(nospeech) above it and log probability below: silence, skipped
    condition_on_previous_text: bool = True  # prompt each window with the text before it
    prompt_reset_on_temperature: float = 0.5  # after a decode hotter than this, the prompt starts afresh
    initial_prompt: str | None = None  # text prompting the first window (vocabulary, spelling, style)
    # --- passed to each decode (see DecodingOptions)
    beam_size: int | None = None  # beams at temperature 0 (None: greedy)
    best_of: int | None = None  # samples at temperature > 0
    patience: float | None = None
    length_penalty: float | None = None
    suppress_tokens: str | Sequence[int] | None = "-1"
    suppress_blank: bool = True  # False for small BPEs that write a word's leading space alone (recipes/asr's)
    max_initial_timestamp: float | None = 1.0
    sample_len: int | None = None
    # --- ours
    pad_to_30s: bool = True  # encode each window as 30 s, zero-padded (Whisper's checkpoints); False: only the
    # window's own frames (models trained on unpadded clips, as recipes/asr from scratch)
    vad: bool = False  # cut silences longer than vad_min_silence before decoding (energy threshold)
    vad_top_db: float = 40.0  # VAD: frames this many dB below the loudest are silence
    vad_min_silence: float = 1.0  # VAD: seconds; shorter pauses are kept
    vad_margin: float = 0.2  # VAD: seconds of silence kept around speech


# ---------------------------------------------------------------- one window's result

def needs_fallback(result: DecodingResult, options: TranscribeOptions) -> bool:
    """Whether to decode the window again, hotter: too repetitive or too unlikely, unless it is silence."""
    too_repetitive = (options.compression_ratio_threshold is not None
                      and result.compression_ratio > options.compression_ratio_threshold)
    too_unlikely = options.logprob_threshold is not None and result.avg_logprob < options.logprob_threshold
    silence = (options.no_speech_threshold is not None and result.no_speech_prob > options.no_speech_threshold
               and too_unlikely)
    return (too_repetitive or too_unlikely) and not silence


def is_silence(result: DecodingResult, options: TranscribeOptions) -> bool:
    """Whether to skip the window: P(nospeech) above the threshold, unless the text is likely enough."""
    if options.no_speech_threshold is None or result.no_speech_prob <= options.no_speech_threshold:
        return False
    return options.logprob_threshold is None or result.avg_logprob <= options.logprob_threshold


def split_window(tokens: list[int], timestamp_begin: int, segment_size: int) -> tuple[list[tuple], int]:
    """A window's tokens -> ([(start, end, tokens)], frames to advance); times in seconds from the window's
    start, segment_size the window's frames of audio (whisper.transcribe's arithmetic):

    - with complete segments (<|t0|> text <|t1|>, pairs of consecutive timestamps between them): one each;
      advance to the last complete timestamp, or past the window if the tokens end in a lone timestamp
      (nothing more was said);
    - otherwise one segment for the whole window (ending at its last timestamp, if any), and advance
      past the window."""
    is_timestamp = [t >= timestamp_begin for t in tokens]
    single_ending = is_timestamp[-2:] == [False, True]
    slices = [i + 1 for i in range(len(tokens) - 1) if is_timestamp[i] and is_timestamp[i + 1]]
    if slices and not single_ending and tokens[slices[-1] - 1] == timestamp_begin:
        # the last complete timestamp is <|0.00|> (e.g. "<|0.00|><|0.00|> text"): seeking to it would decode
        # the same window again, for ever (openai-whisper and transformers do); read it as one segment instead
        slices = []
    if not slices:
        duration = segment_size * HOP_LENGTH / SAMPLE_RATE
        stamps = [t for t in tokens if t >= timestamp_begin]
        if stamps and stamps[-1] != timestamp_begin:
            duration = (stamps[-1] - timestamp_begin) * TIME_PRECISION
        return [(0.0, duration, tokens)], segment_size
    if single_ending:
        slices.append(len(tokens))
    segments, last = [], 0
    for cut in slices:
        piece = tokens[last:cut]  # ends in a timestamp; starts in one, unless it is a stray-timestamp window's first
        # Without timestamps (<|notimestamps|>) nothing makes the first token a timestamp, and a weak model may
        # still say "text <|1.00|><|1.00|> text": the first piece then starts at the window's start. openai-whisper
        # reads its first text token as a time: a start before the window, negative in the first one.
        start = (piece[0] - timestamp_begin) * TIME_PRECISION if piece[0] >= timestamp_begin else 0.0
        segments.append((start, (piece[-1] - timestamp_begin) * TIME_PRECISION, piece))
        last = cut
    if single_ending:
        return segments, segment_size
    return segments, (tokens[last - 1] - timestamp_begin) * INPUT_STRIDE


# ---------------------------------------------------------------- one file's seek loop

@dataclass
class _Stream:
    """The seek loop of one file: its mel (+ 30 s of padding), where it stands, what it has found."""
    index: int  # the file's position in the input
    mel: torch.Tensor  # [n_mels, content_frames + N_FRAMES]
    language: str | None
    language_prob: float
    initial_prompt: list[int]
    seek: int = 0
    tokens: list[int] = field(default_factory=list)  # initial prompt + every kept segment's tokens
    segments: list[Segment] = field(default_factory=list)
    prompt_reset_since: int = 0

    def __post_init__(self):
        self.tokens = list(self.initial_prompt)

    @property
    def content_frames(self) -> int:
        return self.mel.shape[-1] - N_FRAMES

    @property
    def done(self) -> bool:
        return self.seek >= self.content_frames

    def window(self) -> tuple[torch.Tensor, int]:
        """(mel [n_mels, N_FRAMES]: the window at seek, zero-padded, its frames of audio)."""
        size = min(N_FRAMES, self.content_frames - self.seek)
        return pad_or_trim(self.mel[:, self.seek:self.seek + size], N_FRAMES), size

    def prompt(self) -> list[int]:
        return self.tokens[self.prompt_reset_since:]

    def advance(self, result: DecodingResult, size: int, tokenizer, options: TranscribeOptions) -> None:
        """Take the decode of the window at seek (`size` frames of audio) and move on."""
        if is_silence(result, options):
            self.seek += size
            return
        offset = self.seek * HOP_LENGTH / SAMPLE_RATE  # seconds; from the frame index itself: no drift
        pieces, advance = split_window(result.tokens, tokenizer.timestamp_begin, size)
        window_s = size * HOP_LENGTH / SAMPLE_RATE
        for start, end, tokens in pieces:
            # a timestamp past the window's audio (a weak model's, or a sampled one) would give a segment that
            # ends after the recording: times are kept inside it (openai-whisper does not clamp them)
            start, end = min(start, window_s), min(end, window_s)
            text = tokenizer.decode([t for t in tokens if t < tokenizer.eot])
            if start == end or not text.strip():
                continue
            self.segments.append(Segment(
                id=len(self.segments), seek=self.seek, start=offset + start, end=offset + end, text=text,
                tokens=list(tokens), temperature=result.temperature, avg_logprob=result.avg_logprob,
                compression_ratio=result.compression_ratio, no_speech_prob=result.no_speech_prob))
            self.tokens += tokens
        self.seek += advance
        if not options.condition_on_previous_text or result.temperature > options.prompt_reset_on_temperature:
            self.prompt_reset_since = len(self.tokens)

    def transcript(self, tokenizer, duration: float) -> Transcript:
        text = tokenizer.decode(self.tokens[len(self.initial_prompt):]).strip()
        return Transcript(text=text, language=self.language or "en", language_prob=self.language_prob,
                          segments=self.segments, duration=duration)


# ---------------------------------------------------------------- batched steps

def _encode_inputs(mels: list[torch.Tensor], sizes: list[int], pad_to_30s: bool, device) -> tuple:
    """(mel [B, n_mels, F], mel_lengths [B] or None) for windows of `sizes` frames of audio."""
    batch = torch.stack(mels).to(device)
    if pad_to_30s:
        return batch, None
    width = max(1, max(sizes))
    return batch[..., :width], torch.tensor([max(1, s) for s in sizes], device=device)


def decode_with_fallback(model: Whisper, tokenizer, mel: torch.Tensor, mel_lengths: torch.Tensor | None,
                         prompts: list[list[int]], languages: list[str | None], decoding: DecodingOptions,
                         options: TranscribeOptions) -> list[DecodingResult]:
    """Decode windows mel [B, n_mels, F] at each temperature in turn; a window leaves once its result is
    acceptable (see needs_fallback), and keeps its last result if none is. Beam search (beam_size,
    patience) runs at temperature 0 only, best_of at the others, as whisper.transcribe."""
    temperatures = (options.temperature,) if isinstance(options.temperature, (int, float)) else options.temperature
    results: list[DecodingResult | None] = [None] * mel.shape[0]
    todo = list(range(mel.shape[0]))
    for t in temperatures:
        if t > 0:
            current = replace(decoding, temperature=t, beam_size=None, patience=None)
        else:
            current = replace(decoding, temperature=t, best_of=None)
        index = torch.tensor(todo, device=mel.device)
        found = decode(model, tokenizer, mel[index], current, mel_lengths[index] if mel_lengths is not None else None,
                       prompts=[prompts[i] for i in todo], languages=[languages[i] for i in todo])
        for i, result in zip(todo, found):
            results[i] = result
        todo = [i for i, result in zip(todo, found) if needs_fallback(result, options)]
        if not todo:
            break
    return results


def _start_streams(model: Whisper, tokenizer, audios: list[np.ndarray], indices: list[int], language: str | None,
                   options: TranscribeOptions, initial_prompt: list[int]) -> list[_Stream]:
    """Mel of each file (with 30 s of padding) and its language: given, or detected from its first window."""
    device = next(model.parameters()).device
    mels = [log_mel_spectrogram(torch.as_tensor(audios[i]).to(device), model.dims.n_mels, padding=N_SAMPLES)
            for i in indices]
    streams = [_Stream(i, m, language, 1.0, initial_prompt) for i, m in zip(indices, mels)]
    if language is None and tokenizer.languages:
        sizes = [min(N_FRAMES, s.content_frames) for s in streams]
        mel, lengths = _encode_inputs([pad_or_trim(s.mel, N_FRAMES) for s in streams], sizes, options.pad_to_30s,
                                      device)
        with torch.no_grad():
            features, mask = model.embed_audio(mel, lengths)
        for stream, probs in zip(streams, language_probs(model, tokenizer, features, mask)):
            stream.language = max(probs, key=probs.get)
            stream.language_prob = probs[stream.language]
    return streams


def _decoding_options(task: str, timestamps: bool, options: TranscribeOptions) -> DecodingOptions:
    return DecodingOptions(task=task, without_timestamps=not timestamps, beam_size=options.beam_size,
                           best_of=options.best_of, patience=options.patience,
                           length_penalty=options.length_penalty, suppress_tokens=options.suppress_tokens,
                           suppress_blank=options.suppress_blank, max_initial_timestamp=options.max_initial_timestamp,
                           sample_len=options.sample_len)


def transcribe_many(model: Whisper, tokenizer, audios: Sequence[np.ndarray], language: str | None = None,
                    task: str = "transcribe", timestamps: bool = True, options: TranscribeOptions | None = None,
                    batch_size: int = 16, progress: bool = False) -> list[Transcript]:
    """Transcripts of many files (mono float32 [T] at 16 kHz each), their windows decoded batch_size at a
    time. language: a code (or English name) for all, or None to detect each file's from its first 30 s.
    task: "transcribe" or "translate" (into English). timestamps=False decodes text only: then each window
    is one segment."""
    options = options or TranscribeOptions()
    language = resolve_language(tokenizer, language)
    decoding = _decoding_options(task, timestamps, options)
    for t in (0.0, 1.0):  # the option checks of both kinds of decode, before any work
        check_options(replace(decoding, temperature=t, **({"best_of": None} if t == 0 else
                                                          {"beam_size": None, "patience": None})), tokenizer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not isinstance(options.temperature, (int, float)) and not options.temperature:
        raise ValueError("temperature: give at least one (a number or a tuple of them)")
    audios = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
    durations = [len(a) / SAMPLE_RATE for a in audios]
    maps: list[TimeMap | None] = [None] * len(audios)
    if options.vad:
        compacted = [remove_silence(a, options) for a in audios]
        audios, maps = [c[0] for c in compacted], [c[1] for c in compacted]
    initial_prompt = tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
    device = next(model.parameters()).device
    done: list[Transcript | None] = [None] * len(audios)
    pending, active = list(range(len(audios))), []
    from tqdm import tqdm
    bar = tqdm(total=sum(len(a) // HOP_LENGTH for a in audios), unit="frames", disable=not progress)
    while pending or active:
        joining, pending = pending[:batch_size - len(active)], pending[batch_size - len(active):]
        if joining:
            active += _start_streams(model, tokenizer, audios, joining, language, options, initial_prompt)
        for stream in [s for s in active if s.done]:
            done[stream.index] = stream.transcript(tokenizer, durations[stream.index])
        active = [s for s in active if not s.done]
        if not active:
            continue
        windows = [s.window() for s in active]
        mel, lengths = _encode_inputs([w for w, _ in windows], [n for _, n in windows], options.pad_to_30s, device)
        results = decode_with_fallback(model, tokenizer, mel, lengths, [s.prompt() for s in active],
                                       [s.language for s in active], decoding, options)
        for stream, (_, size), result in zip(active, windows, results):
            before = stream.seek
            stream.advance(result, size, tokenizer, options)
            bar.update(min(stream.content_frames, stream.seek) - before)
    bar.close()
    for transcript, time_map in zip(done, maps):
        if time_map is not None:
            time_map.apply(transcript)
    return done


def transcribe(model: Whisper, tokenizer, audio: np.ndarray, language: str | None = None, task: str = "transcribe",
               timestamps: bool = True, options: TranscribeOptions | None = None, progress: bool = False) -> Transcript:
    """The transcript of one file: mono float32 [T] at 16 kHz of any length (see transcribe_many)."""
    return transcribe_many(model, tokenizer, [audio], language, task, timestamps, options, 1, progress)[0]


# ---------------------------------------------------------------- VAD

@dataclass
class TimeMap:
    """Where the pieces of a compacted audio came from: piece k starts at compact[k] seconds in the compacted
    audio and at original[k] in the original."""
    compact: list[float]
    original: list[float]

    def __call__(self, t: float, end: bool = False) -> float:
        """The original time of compacted time t; at a boundary between pieces, a start belongs to the
        later piece and an end to the earlier one."""
        if not self.compact:
            return t
        find = bisect.bisect_left if end else bisect.bisect_right
        k = max(find(self.compact, t) - 1, 0)
        return self.original[k] + (t - self.compact[k])

    def apply(self, transcript: Transcript) -> None:
        for s in transcript.segments:
            s.start, s.end = round(self(s.start), 3), round(self(s.end, end=True), 3)


def speech_regions(audio: np.ndarray, top_db: float = 40.0, min_silence: float = 1.0,
                   margin: float = 0.2) -> list[tuple[int, int]]:
    """[(start, end)] sample ranges of audio [T] to keep: librosa.effects.split's non-silent intervals
    (frames within top_db of the loudest), each widened by `margin` seconds, merged across pauses shorter
    than min_silence seconds."""
    import librosa  # imported here: it loads numba, seconds that only VAD needs

    if len(audio) == 0 or not np.any(audio):
        return []
    pad, gap = round(margin * SAMPLE_RATE), round(min_silence * SAMPLE_RATE)
    regions: list[list[int]] = []
    for start, end in librosa.effects.split(audio, top_db=top_db).tolist():
        start, end = max(0, start - pad), min(len(audio), end + pad)
        if regions and start - regions[-1][1] < gap:
            regions[-1][1] = max(regions[-1][1], end)
        else:
            regions.append([start, end])
    return [(s, e) for s, e in regions]


def remove_silence(audio: np.ndarray, options: TranscribeOptions) -> tuple[np.ndarray, TimeMap]:
    """(the speech regions of audio [T] joined, the map from their times back to the original's)."""
    regions = speech_regions(audio, options.vad_top_db, options.vad_min_silence, options.vad_margin)
    if not regions:
        return np.zeros(0, dtype=np.float32), TimeMap([], [])
    lengths = [e - s for s, e in regions]
    compact = [sum(lengths[:k]) / SAMPLE_RATE for k in range(len(regions))]
    original = [s / SAMPLE_RATE for s, _ in regions]
    return np.concatenate([audio[s:e] for s, e in regions]), TimeMap(compact, original)
