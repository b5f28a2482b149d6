"""A speech recogniser ready to use: a checkpoint, its tokenizer and the decoding settings that fit it.

    asr = Transcriber.from_checkpoint("runs/asr")          # or a Hugging Face Whisper folder, or a .pt file
    transcript = asr.transcribe("talk.flac", language="en")
    print(transcript.text, transcript.segments[0].start)

Audio comes as a path, encoded bytes (anything soundfile reads) or float32 samples at 16 kHz; it may be of
any length up to `max_seconds`. Decoding options are TranscribeOptions' fields, as keywords.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from mm.asr.convert import load_checkpoint_tokenizer, load_whisper
from mm.asr.decode import resolve_language
from mm.asr.model import ModelDimensions, Whisper
from mm.asr.tokenizer import TASKS, TRAINED_LANGUAGES, AsrTokenizer, load_tokenizer
from mm.asr.transcribe import Transcript, TranscribeOptions, transcribe_many
from mm.media import SAMPLE_RATE, AudioTooLong, EmptyAudio, load_audio

DEFAULT_MAX_SECONDS = 3600.0  # an hour: ~115 MB of samples, ~115 MB of log-mel


def _run_config(run_dir: Path) -> dict | None:
    """The resolved config recipes/asr saved in a run folder, or None if there is none."""
    import yaml

    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _find_run(path: Path) -> Path | None:
    """The recipes/asr run folder `path` is, or was exported to / checkpointed in (runs/x, runs/x/export/hf,
    runs/x/export/whisper.pt, runs/x/checkpoints/step_*.pt), judged by its config.yaml."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "tokenizer").is_dir():
            return candidate
    return None


def _load_train_state(path: Path) -> Whisper:
    """The model of a training checkpoint (recipes/asr's checkpoints/step_*.pt: its "model" weights and
    extra["dims"])."""
    from mm.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    dims = (state.get("extra") or {}).get("dims") if isinstance(state, dict) else None
    if dims is None or "model" not in state:
        raise ValueError(f"{path}: neither an OpenAI Whisper checkpoint nor a recipes/asr training checkpoint")
    weights = state["model"]
    ctc = "ctc_head.weight" in weights
    model = Whisper(ModelDimensions(**dims), ctc=ctc,
                    ctc_vocab=weights["ctc_head.weight"].shape[0] - 1 if ctc else None)
    model.load_state_dict(weights)
    return model.eval()


def load_model_and_tokenizer(path: str | Path, ctc_head: bool = False) -> tuple[Whisper, AsrTokenizer, Path | None]:
    """(model, tokenizer, run folder or None) from a recipes/asr run folder (its export/hf, else its newest
    checkpoint with its tokenizer/), a Hugging Face Whisper folder, an OpenAI .pt file or a training
    checkpoint of a run. ctc_head=True: a run folder gives its newest checkpoint even when it has export/hf,
    because only the checkpoints keep the CTC head (the export formats have none)."""
    from mm.checkpoint import list_checkpoints

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint (a run folder, a Hugging Face Whisper folder or a "
                                ".pt file)")
    run = _find_run(path)
    if path.is_dir() and not (path / "config.json").is_file() and run == path:
        if (path / "export" / "hf" / "config.json").is_file() and not ctc_head:
            path = path / "export" / "hf"
        else:
            found = [p for _, p in list_checkpoints(path / "checkpoints") if p.is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: a run folder without export/hf nor a checkpoint file in checkpoints/")
            return _load_train_state(found[-1]), load_tokenizer(path / "tokenizer"), run
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face Whisper folder (no config.json) nor a recipes/asr "
                                    "run folder (no config.yaml and tokenizer/)")
        model, _ = load_whisper(path)
        return model, load_tokenizer(path), run
    try:
        model, _ = load_whisper(path)
    except ValueError:
        if run is None:
            raise
        return _load_train_state(path), load_tokenizer(run / "tokenizer"), run
    tokenizer = load_tokenizer(run / "tokenizer") if run is not None else load_checkpoint_tokenizer(path)
    return model, tokenizer, run


class Transcriber:
    """A model and its tokenizer on a device, with the settings that fit the checkpoint.

    Attributes: name, device, model, tokenizer, languages (codes the model can be told or detect),
    can_translate, max_seconds (longer audio raises mm.media.AudioTooLong), defaults (TranscribeOptions
    fields this checkpoint needs, e.g. pad_to_30s=False for a model trained on unpadded clips)."""

    def __init__(self, model: Whisper, tokenizer: AsrTokenizer, name: str = "whisper",
                 device: str | torch.device | None = None, max_seconds: float = DEFAULT_MAX_SECONDS,
                 can_translate: bool | None = None, defaults: dict | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer, self.name, self.max_seconds = tokenizer, name, max_seconds
        self.languages = list(tokenizer.languages)
        self.can_translate = bool(self.languages) if can_translate is None else can_translate
        self.defaults = dict(defaults or {})

    def __repr__(self) -> str:
        return (f"Transcriber(name={self.name!r}, device={self.device}, languages={len(self.languages)}, "
                f"can_translate={self.can_translate})")

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        max_seconds: float = DEFAULT_MAX_SECONDS) -> "Transcriber":
        """Load a recipes/asr run folder (e.g. runs/asr: its export/hf, else its newest checkpoint and
        tokenizer/), a Hugging Face Whisper folder, or an OpenAI-format .pt file (its tokenizer from files
        beside it, else OpenAI's vocabulary). A checkpoint of one of our runs (the folder, its exports or
        its checkpoints) takes its settings from the run's config.yaml: a model trained from scratch on
        unpadded clips decodes unpadded windows; its own small BPE often writes a word's leading space as a
        token of its own, so the blank first token is allowed (suppress_blank=False); and it is not offered
        translation (the recipe never trains it)."""
        model, tokenizer, run = load_model_and_tokenizer(path)
        path = Path(path)
        defaults, can_translate, name = {}, None, path.stem if path.is_file() else path.name
        config = _run_config(run) if run is not None else None
        if config is not None:
            name = run.name
            pad = config.get("pad_to_30s", "auto")
            defaults["pad_to_30s"] = pad == "true" or (pad == "auto" and bool(config.get("init_from")))
            if not config.get("init_from"):  # trained from scratch, with a BPE of its own
                can_translate = False  # the recipe never trains <|translate|>
                defaults["suppress_blank"] = False  # its BPE often writes a word's leading space alone
        transcriber = cls(model, tokenizer, name=name, device=device, max_seconds=max_seconds,
                          can_translate=can_translate, defaults=defaults)
        trained = run / "tokenizer" / TRAINED_LANGUAGES if run is not None else None
        if trained is not None and trained.is_file():  # offer (and accept) only what the model has heard
            heard = set(json.loads(trained.read_text()))
            transcriber.languages = [code for code in transcriber.languages if code in heard]
        return transcriber

    # ------------------------------------------------------------ checks

    def _load(self, audio, index: int | None = None) -> np.ndarray:
        """Mono float32 at 16 kHz from a path, bytes or samples; AudioTooLong / EmptyAudio / NotAudio."""
        name = None if index is None else f"audio {index}"
        if isinstance(audio, (str, Path, bytes, bytearray)):
            return load_audio(audio, SAMPLE_RATE, max_seconds=self.max_seconds,
                              name=name if isinstance(audio, (bytes, bytearray)) else None)
        samples = np.asarray(audio)
        if not np.issubdtype(samples.dtype, np.floating):
            raise ValueError(f"{name or 'audio'}: samples must be floats in -1..1 at {SAMPLE_RATE} Hz, got "
                             f"{samples.dtype} (pass encoded audio as bytes or a path)")
        samples = samples.astype(np.float32, copy=False)
        if samples.ndim != 1:
            raise ValueError(f"{name or 'audio'}: samples must be mono [T], got shape {samples.shape}")
        if samples.size == 0:
            raise EmptyAudio(f"{name or 'audio'}: no audio samples")
        if samples.size / SAMPLE_RATE > self.max_seconds:
            raise AudioTooLong(f"{name or 'audio'}: {samples.size / SAMPLE_RATE:.1f} s exceeds the limit of "
                               f"{self.max_seconds:g} s")
        return samples

    def _check(self, language: str | None, task: str, options: dict) -> tuple[str | None, TranscribeOptions]:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "translate" and not self.can_translate:
            raise ValueError(f"{self.name} cannot translate (it was not trained to); use task='transcribe'")
        fields = {f.name for f in dataclasses.fields(TranscribeOptions)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown options {unknown}; accepted: {', '.join(sorted(fields))}")
        language = resolve_language(self.tokenizer, language)
        if language is not None and language not in self.languages:
            raise ValueError(f"{self.name} was not trained on language {language!r}; it knows "
                             f"{', '.join(self.languages)}")
        return language, TranscribeOptions(**{**self.defaults, **options})

    # ------------------------------------------------------------ transcription

    def transcribe(self, audio, language: str | None = None, task: str = "transcribe", timestamps: bool = True,
                   **options) -> Transcript:
        """The Transcript of one recording: a path, encoded bytes, or float32 samples [T] at 16 kHz.
        language: a code or English name (None: detected); options: TranscribeOptions fields."""
        return self.transcribe_batch([audio], language, task, timestamps, batch_size=1, **options)[0]

    def transcribe_batch(self, audios, language: str | None = None, task: str = "transcribe",
                         timestamps: bool = True, batch_size: int = 16, **options) -> list[Transcript]:
        """Transcripts of many recordings, their windows decoded batch_size at a time (see transcribe)."""
        language, opts = self._check(language, task, options)
        samples = [self._load(a, i if len(audios) > 1 else None) for i, a in enumerate(audios)]
        return transcribe_many(self.model, self.tokenizer, samples, language, task, timestamps, opts, batch_size)
