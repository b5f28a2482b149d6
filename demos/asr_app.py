"""Gradio demo: upload or record speech, see its language, transcript and timed segments, download SRT and VTT.

    python demos/asr_app.py                                   # the model recipes/asr/train.py wrote to runs/asr
    python demos/asr_app.py --checkpoint whisper-small/ --port 7861   # a Hugging Face Whisper folder or OpenAI .pt
    python demos/asr_app.py --host 0.0.0.0 --max-seconds 120 --max-file-size 20mb

Serves on http://127.0.0.1:7860 (only this machine) unless --host says otherwise. With no model at
runs/asr it still starts, and says how to train one. The held-out clips of the built-in corpus
(data/asr_synth/heldout) are offered as examples when they are there.

One request at a time runs the model (decoding its audio included); up to 16 more wait their turn,
later ones are turned away. An upload is refused over --max-file-size (by gradio, before it is stored) and over
--max-seconds (from the file's header, before it is decoded). A microphone recording is uploaded as a 16 kHz wav
under the same size limit, so --max-file-size must hold --max-seconds of it (checked at start: 64 kB a second).
The same function is an API endpoint:

    Client(url).predict(handle_file("talk.flac"), "auto", "transcribe", True, api_name="/transcribe")
    -> (language, text, {"headers": [...], "data": [[start, end, text], ...]}, srt path, vtt path)
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing

# A local demo has no business phoning home: no usage analytics, no version check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402

from mm.asr.formats import format_timestamp, format_transcript, language_code, language_name, one_line  # noqa: E402
from mm.cli import add_serve_arguments, file_size, positive_float  # noqa: E402
from mm.media import SAMPLE_RATE, load_audio  # noqa: E402

DEFAULT_CHECKPOINT = "runs/asr"
DEFAULT_EXAMPLES = "data/asr_synth/heldout"
TRAIN_HINT = ("Train one with `python recipes/asr/train.py` (it builds the built-in 10-language corpus first, "
              "then trains a small model; minutes on a CPU) and restart this demo, or start it with "
              "`--checkpoint PATH`: a run folder, a Hugging Face Whisper folder or an OpenAI .pt file.")
CORPUS_HINT = ("Build the built-in corpus with `python -m data_tools.synthetic_asr --out=data/asr_synth` "
               "(`python recipes/asr/train.py` builds it too) to get held-out clips to try here.")
UPLOAD_NAME = "the uploaded audio"  # how messages call it: never the server's temp path
TASKS = ("transcribe", "translate")
SILENCE_DBFS = -60.0  # a recording whose loudest sample is below this holds nothing to transcribe
QUEUE_SIZE = 16  # requests waiting for the model; more are turned away
MAX_EXAMPLES = 10  # held-out clips offered, one per language
OUTPUT_MAX_AGE_S = 3600  # subtitle files (and gradio's copies of uploads) are deleted after an hour
# The browser encodes a microphone take as 16-bit wav at this rate before uploading it. gradio's default, 44.1 kHz,
# makes files 2.8x bigger than what the model hears (it resamples to SAMPLE_RATE anyway).
RECORDING_RATE = SAMPLE_RATE  # Hz
RECORDING_CHANNELS = 2  # the browser keeps the microphone's channels: most give one, some two
WAV_HEADER_BYTES = 44


# ---------------------------------------------------------------- model

def load_transcriber(checkpoint: str, device: str | None, max_seconds: float):
    """Transcriber.from_checkpoint(checkpoint), or None when nothing is at that path (the no-model page).
    A checkpoint that is there but cannot be loaded raises ValueError or OSError."""
    if not Path(checkpoint).exists():
        return None
    from mm.asr.transcriber import Transcriber  # torch and the model code, only once there is a model to load

    return Transcriber.from_checkpoint(checkpoint, device=device, max_seconds=max_seconds)


def no_model_message(checkpoint: str) -> str:
    return f"No speech recognition model at `{checkpoint}`. {TRAIN_HINT}"


def language_choices(transcriber) -> list[tuple[str, str]]:
    """The language dropdown's (label, value) pairs: auto-detect, then the model's languages by name."""
    codes = transcriber.languages if transcriber is not None else []
    return [("Detect automatically", "auto")] + [(f"{language_name(c).title()} ({c})", c) for c in codes]


# ---------------------------------------------------------------- held-out examples

def extract_examples(shards: Path, cache: Path, limit: int = MAX_EXAMPLES) -> list[tuple[Path, str]]:
    """[(clip.flac, "Language: its text")] for the first clip of each language in the shards under `shards`
    (key.flac + key.json, as data_tools.synthetic_asr writes them), up to `limit`, extracted to a folder under
    `cache` named by the shards' paths, sizes and times, so a rebuilt corpus is extracted afresh."""
    tars = sorted(shards.glob("shard-*.tar"))
    if not tars:
        return []
    cache.mkdir(parents=True, exist_ok=True)
    stamp = json.dumps([[str(t.resolve()), t.stat().st_size, t.stat().st_mtime_ns] for t in tars] + [limit])
    folder = cache / hashlib.sha1(stamp.encode()).hexdigest()[:16]
    index = folder / "examples.json"
    if not index.exists():
        clips = read_first_clips(tars, limit)
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=cache))  # renamed whole: never half-written
        for key, (flac, meta) in clips.items():
            (staging / f"{key}.flac").write_bytes(flac)
            meta["file"] = f"{key}.flac"
        (staging / "examples.json").write_text(json.dumps([m for _, m in clips.values()], ensure_ascii=False),
                                              encoding="utf-8")
        try:
            staging.rename(folder)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return [(folder / m["file"], f"{language_name(m['language']).title()}: {shorten(m['text'], 80)}")
            for m in json.loads(index.read_text(encoding="utf-8"))]


def read_first_clips(tars: list[Path], limit: int, max_samples: int = 500) -> dict[str, tuple[bytes, dict]]:
    """{key: (flac bytes, {"language", "text"})} for the first clip of each language, up to `limit` clips,
    reading no more than `max_samples` samples."""
    pending: dict[str, dict[str, bytes]] = {}  # key -> the fields read so far
    chosen: dict[str, tuple[bytes, dict]] = {}
    seen = 0
    for tar in tars:
        with tarfile.open(tar) as f:
            for member in f:
                key, _, ext = member.name.rpartition(".")
                if ext not in ("flac", "json") or not member.isfile():
                    continue
                sample = pending.setdefault(key, {})
                sample[ext] = f.extractfile(member).read()
                if len(sample) < 2:
                    continue
                del pending[key]
                meta = json.loads(sample["json"])
                if meta["language"] not in {m["language"] for _, m in chosen.values()}:
                    chosen[Path(key).name] = (sample["flac"], {"language": meta["language"], "text": meta["text"]})
                seen += 1
                if len(chosen) >= limit or seen >= max_samples:
                    return chosen
    return chosen


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def find_examples(shards: str, cache: Path) -> tuple[list[tuple[Path, str]], str | None]:
    """(examples, None), or ([], what to tell the user) when there are none."""
    try:
        examples = extract_examples(Path(shards), cache)
    except (OSError, tarfile.TarError, ValueError, KeyError) as e:
        return [], f"Could not read the held-out clips in `{shards}` ({type(e).__name__}: {e}). {CORPUS_HINT}"
    if not examples:
        return [], f"No held-out clips at `{shards}`. {CORPUS_HINT}"
    return examples, None


# ---------------------------------------------------------------- one request

def upload_path(audio: dict | str | None, max_seconds: float) -> tuple[str, str]:
    """(the uploaded file's path, its original name) from gradio's unprocessed audio payload
    ({"path": ..., "orig_name": ...}) or a plain path; gr.Error when there is none."""
    import gradio as gr

    if not audio:  # also what a recording too big to upload leaves: gradio's page drops it without a word
        raise gr.Error("Upload an audio file or record from the microphone first. (A recording much longer "
                       f"than {max_seconds:g} s is too big for the page to send: record a shorter one.)")
    path = audio.get("path") if isinstance(audio, dict) else audio
    if not path:
        raise gr.Error("Send the audio as a file upload.")
    name = (audio.get("orig_name") if isinstance(audio, dict) else None) or Path(path).name
    return str(path), name


def chosen_language(transcriber, language: str | None, task: str) -> str | None:
    """The language code to decode in (None: detect it); ValueError for what the model cannot do."""
    if task not in TASKS:
        raise ValueError(f"unknown task {str(task)[:40]!r} (tasks: {', '.join(TASKS)})")
    from mm.asr.__main__ import unusable  # the CLI's words for an unknown language or an impossible task

    code = language_code(language)
    why_not = unusable(transcriber, code, task)
    if why_not:
        raise ValueError(why_not)
    return code


def recording_bytes(seconds: float) -> int:
    """The size of a `seconds` long microphone take as the page uploads it (wav, 16-bit, at most stereo)."""
    return WAV_HEADER_BYTES + math.ceil(seconds * RECORDING_RATE) * RECORDING_CHANNELS * 2


def check_limits(max_seconds: float, max_bytes: int) -> None:
    """ValueError when a recording within max_seconds could exceed the upload limit: gradio's page checks a
    take's size before sending it and, over the limit, keeps it on screen and sends nothing, with no message."""
    needed = recording_bytes(max_seconds)
    if max_bytes < needed:
        raise ValueError(f"--max-file-size of {max_bytes:,} bytes cannot hold a {max_seconds:g} s microphone "
                         f"recording ({needed:,} bytes as the page sends it: 16 kHz 16-bit wav, up to 2 channels); "
                         f"give --max-file-size {math.ceil(needed / 1024)}kb or more, or a smaller --max-seconds")


def check_size(path: str, max_bytes: int, name: str) -> None:
    """gradio refuses bigger uploads already; this covers files that reach us another way."""
    try:
        size = os.path.getsize(path)
    except OSError:  # its message would hold the server's path
        raise FileNotFoundError(f"{name}: no such file") from None
    if size > max_bytes:
        raise ValueError(f"{name}: {size:,} bytes exceeds the limit of {max_bytes:,}")


def check_not_silent(samples: np.ndarray, name: str) -> None:
    """ValueError for a recording whose loudest sample is below SILENCE_DBFS: a model would only invent words."""
    peak = float(np.abs(samples).max())
    if peak < 10 ** (SILENCE_DBFS / 20):
        level = f"{20 * np.log10(peak):.0f} dBFS" if peak > 0 else "digital silence"
        raise ValueError(f"{name}: silent ({level} at its loudest, below {SILENCE_DBFS:g} dBFS): "
                         "nothing to transcribe. Check the microphone, or upload a recording with speech.")


def describe_language(transcript, chosen: str | None) -> str:
    name = f"{language_name(transcript.language).title()} ({transcript.language})"
    if chosen is not None:
        return f"{name}, as chosen"
    return f"{name}, detected with probability {transcript.language_prob:.0%}"


def segment_rows(transcript) -> list[list[str]]:
    """[[start, end, text]] per segment, times as "MM:SS.mmm"."""
    return [[format_timestamp(s.start), format_timestamp(s.end), one_line(s.text)] for s in transcript.segments]


def write_subtitles(transcript, upload_name: str, out_root: Path) -> tuple[str, str]:
    """<out_root>/<new folder>/<upload's stem>.srt and .vtt, after deleting folders older than OUTPUT_MAX_AGE_S."""
    for old in out_root.glob("*"):
        with contextlib.suppress(OSError):  # another demo process may be pruning it too
            if time.time() - old.stat().st_mtime > OUTPUT_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
    stem = re.sub(r"[^\w.-]+", "_", Path(upload_name).stem)[:60].strip("._") or "transcript"
    folder = out_root / uuid.uuid4().hex
    folder.mkdir(parents=True)
    paths = []
    for fmt in ("srt", "vtt"):
        path = folder / f"{stem}.{fmt}"
        path.write_text(format_transcript(transcript, fmt), encoding="utf-8")
        paths.append(str(path))
    return paths[0], paths[1]


def make_transcribe(transcriber, max_seconds: float, max_bytes: int, out_root: Path, checkpoint: str):
    """transcribe(audio payload, language, task, timestamps) -> (language, text, segment rows, srt, vtt);
    gr.Error, which the page shows and the app outlives, for anything it cannot do."""
    import gradio as gr

    def transcribe(audio: dict | str | None, language: str, task: str, timestamps: bool):
        if transcriber is None:
            raise gr.Error(no_model_message(checkpoint), duration=None)
        path, name = upload_path(audio, max_seconds)
        if not isinstance(timestamps, bool):  # preprocess=False: nothing else checks the API's values
            raise gr.Error(f"timestamps: true or false, not {str(timestamps)[:40]!r}")
        try:
            code = chosen_language(transcriber, None if language is None else str(language), task)
            check_size(path, max_bytes, UPLOAD_NAME)
            samples = load_audio(path, SAMPLE_RATE, max_seconds, name=UPLOAD_NAME)  # header checked before decoding
            check_not_silent(samples, UPLOAD_NAME)
            transcript = transcriber.transcribe(samples, language=code, task=task, timestamps=timestamps)
        except (ValueError, FileNotFoundError) as e:  # NotAudio, EmptyAudio, AudioTooLong, language, task: all say why
            raise gr.Error(str(e)) from None
        if not transcript.text.strip():
            gr.Warning("No speech recognised in the audio.")
        srt, vtt = write_subtitles(transcript, name, out_root)
        return describe_language(transcript, code), transcript.text.strip(), segment_rows(transcript), srt, vtt

    return transcribe


# ---------------------------------------------------------------- the page

def build_demo(transcriber, checkpoint: str = DEFAULT_CHECKPOINT, examples_dir: str = DEFAULT_EXAMPLES,
               max_seconds: float = 600.0, max_bytes: int = 100 * 1024 ** 2, cache: Path | None = None):
    """The Blocks app: audio, language, task and timestamps in; language, text, a segment table and SRT/VTT
    files out; API name "transcribe". transcriber None: a page that says how to train a model."""
    import gradio as gr

    cache = cache or Path(tempfile.gettempdir()) / f"mm-asr-demo-{getpass.getuser()}"
    examples, examples_note = find_examples(examples_dir, cache / "examples")
    can_translate = transcriber is not None and transcriber.can_translate
    if transcriber is None:
        task_note = "No model loaded."
    else:
        task_note = ("translate: into English" if can_translate else
                     "This model was trained to transcribe only: it cannot translate.")

    with gr.Blocks(title="mm speech recognition", analytics_enabled=False,
                   delete_cache=(OUTPUT_MAX_AGE_S, OUTPUT_MAX_AGE_S)) as demo:
        gr.Markdown("## Speech recognition\nUpload a recording or record one, choose the language (or let the "
                    "model detect it), press **Transcribe**. "
                    + (f"Model: `{transcriber.name}`. " if transcriber is not None else "")
                    + f"Up to {max_seconds:g} s of audio (flac, wav, ogg, opus, mp3).")
        if transcriber is None:
            gr.Markdown(f"### No model yet\n{no_model_message(checkpoint)}", elem_id="no-model")
        with gr.Row():
            with gr.Column():
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="audio",
                                 waveform_options=gr.WaveformOptions(sample_rate=RECORDING_RATE))
                language = gr.Dropdown(language_choices(transcriber), value="auto", label="Language",
                                       elem_id="language")
                task = gr.Radio(list(TASKS), value="transcribe", label="Task", interactive=can_translate,
                                info=task_note, elem_id="task")
                timestamps = gr.Checkbox(value=True, label="Timestamps", elem_id="timestamps",
                                         info="decode timestamp tokens, which time each segment")
                button = gr.Button("Transcribe", variant="primary", elem_id="transcribe")
                if examples:
                    gr.Examples([[str(p)] for p, _ in examples], [audio], example_labels=[t for _, t in examples],
                                label="Held-out clips of the built-in corpus (never heard in training)",
                                cache_examples=False)
                else:
                    gr.Markdown(examples_note, elem_id="examples-note")
            with gr.Column():
                detected = gr.Textbox(label="Language of the audio", elem_id="detected")
                text = gr.Textbox(label="Transcript", lines=4, buttons=["copy"], elem_id="text")
                segments = gr.Dataframe(headers=["start", "end", "text"], datatype=["str", "str", "str"],
                                        label="Segments", interactive=False, wrap=True, elem_id="segments")
                with gr.Row():
                    srt = gr.File(label="SRT", elem_id="srt")
                    vtt = gr.File(label="VTT", elem_id="vtt")
        # preprocess=False: transcribe gets the uploaded file's path unopened (and the other inputs as sent), so
        # load_audio makes every check and words every message; gradio's own processing would otherwise be the
        # first to touch a bad file, with its generic "upstream app has raised an exception".
        button.click(make_transcribe(transcriber, max_seconds, max_bytes, cache / "outputs", checkpoint),
                     [audio, language, task, timestamps], [detected, text, segments, srt, vtt],
                     api_name="transcribe", preprocess=False)
    return demo


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a run folder of recipes/asr/train.py, a Hugging Face Whisper folder or an "
                                        f"OpenAI .pt (default: {DEFAULT_CHECKPOINT}, or a page saying how to make it)")
    add_serve_arguments(p, port=7860)
    p.add_argument("--max-seconds", type=positive_float, default=600.0,
                   help="longest audio accepted, in seconds (default: %(default)s)")
    p.add_argument("--max-file-size", type=file_size, default="100mb",
                   help="largest upload accepted: 25mb, 800kb, ... (default: %(default)s)")
    p.add_argument("--examples", default=DEFAULT_EXAMPLES, help="shards whose first clip per language is offered "
                                                                "as an example (default: %(default)s)")
    args = p.parse_args(argv)
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        p.error(f"--checkpoint {args.checkpoint}: no such file or folder")
    try:
        check_limits(args.max_seconds, args.max_file_size)
    except ValueError as e:
        p.error(str(e))
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    try:
        transcriber = load_transcriber(checkpoint, args.device, args.max_seconds)
    except (ValueError, OSError) as e:  # there, but unusable: refuse to start rather than serve a broken page
        sys.exit(f"error: {e}")
    except Exception as e:  # e.g. torch's unpickler on a file that is no checkpoint at all (KeyError)
        sys.exit(f"error: {checkpoint}: cannot load it as a checkpoint ({type(e).__name__}: {str(e)[:200]})")
    if transcriber is None:
        print(f"warning: {no_model_message(checkpoint)}", file=sys.stderr)
    demo = build_demo(transcriber, checkpoint, args.examples, args.max_seconds, args.max_file_size)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    demo.launch(server_name=args.host, server_port=args.port, share=False, max_file_size=args.max_file_size)


if __name__ == "__main__":
    main()
