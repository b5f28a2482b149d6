"""Transcribe audio files with a speech recogniser, score one on held-out shards, or serve it over HTTP.

    python -m mm.asr transcribe talk.flac                                   # the text on stdout
    python -m mm.asr transcribe recordings/ --format srt --output-dir subs  # subs/<name>.srt per file
    python -m mm.asr transcribe a.wav --language de --task translate --format all --output-dir out
    python -m mm.asr eval --data data/asr_synth/heldout --worst 10 --json scores.json
    python -m mm.asr eval --data data/asr_synth/heldout --ctc-weight 0.5   # as the recipe scores, with the CTC head
    python -m mm.asr serve --checkpoint runs/asr                            # see python -m mm.asr.server

The model comes from --checkpoint: a run folder of recipes/asr/train.py (default runs/asr), a Hugging
Face Whisper folder, or an OpenAI .pt file. Folders are searched recursively for audio files
(flac wav ogg opus mp3; m4a and webm are listed too, and fail with a message: we do not read them).
Files found under a folder keep their subfolders under --output-dir. A bad file does not stop the run:
the failures are listed at the end. Decoding options (--beam-size, --temperature, --initial-prompt, the
language, the task) are checked with the model before any file is read. Exit status: 0 ok; 1 some files
failed, or no usable model; 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mm.asr.formats import FORMATS, format_transcript, language_code
from mm.cli import add_device_argument, positive_int

WALKED_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3", ".m4a", ".webm")
TRAIN_HINT = "train one with `python recipes/asr/train.py`, or pass --checkpoint PATH"


def temperature(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):  # a negative one would invert the distribution; nan breaks it
        raise argparse.ArgumentTypeError(f"must be a number from 0 up, got {text}")
    return value


def ctc_weight(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="runs/asr", help="a run folder of recipes/asr/train.py, a Hugging Face "
                                                            "Whisper folder or an OpenAI .pt (default: %(default)s)")
    add_device_argument(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="recordings decoded together "
                                                                       "(default: %(default)s)")
    p.add_argument("--beam-size", type=positive_int, help="beam search width (default: the transcriber's)")
    p.add_argument("--temperature", type=temperature, help="this sampling temperature only, no fallback (default: "
                                                           "0, then hotter for a window whose decode fails)")
    p.add_argument("--initial-prompt", help="text prompting the first window: vocabulary, spelling, style")
    p.add_argument("--no-timestamps", action="store_true", help="decode without timestamp tokens")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mm.asr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="audio files or folders to text or subtitles")
    t.add_argument("inputs", nargs="+", help="audio files and/or folders (searched recursively)")
    t.add_argument("--language", default="auto", help="a code (en, de, ...), an English name, or auto (detect)")
    t.add_argument("--task", choices=("transcribe", "translate"), default="transcribe",
                   help="translate: into English (default: %(default)s)")
    t.add_argument("--format", choices=(*FORMATS, "all"), default="txt", help="(default: %(default)s)")
    t.add_argument("--output-dir", help="write <output-dir>/<name>.<format> per file (default: text to stdout)")
    add_model_args(t)
    e = sub.add_parser("eval", help="WER, CER and language ID per language on held-out shards")
    e.add_argument("--data", required=True, help="shards or a manifest, as the recipe's val_data")
    e.add_argument("--language", choices=("detect", "given"), default="detect",
                   help="decode in the detected language (end to end) or the sample's own (default: %(default)s)")
    e.add_argument("--worst", type=positive_int, default=10, help="show the N examples with the highest CER")
    e.add_argument("--json", help="also write the scores and the worst examples to this file")
    e.add_argument("--ctc-weight", type=ctc_weight, help="score as recipes/asr's final evaluation does: whole clips "
                   "(no timestamps) by beam search joint with the checkpoint's CTC head at this weight (e.g. 0.5; "
                   "--beam-size, default 6), an unsure clip's language chosen with its transcript. Needs a run "
                   "folder or one of its checkpoints/step_*.pt: the exports have no CTC head")
    add_model_args(e)
    sub.add_parser("serve", help="the OpenAI-compatible HTTP API (its options: python -m mm.asr serve --help)",
                   add_help=False)
    return p


def load_transcriber(checkpoint: str, device: str | None = None, max_seconds: float = 3600.0):
    """Transcriber.from_checkpoint, or None after saying on stderr what is wrong (and how to get a model)."""
    if not Path(checkpoint).exists():
        print(f"error: no checkpoint at {checkpoint}: {TRAIN_HINT}", file=sys.stderr)
        return None
    from mm.asr.transcriber import Transcriber  # torch and the model code, only once there is a model to load

    try:
        return Transcriber.from_checkpoint(checkpoint, device=device, max_seconds=max_seconds)
    except (ValueError, OSError) as e:  # our loaders' own messages name the file and what is wrong
        print(f"error: {e}", file=sys.stderr)
    except Exception as e:  # e.g. torch's unpickler on a file that is no checkpoint at all (KeyError)
        print(f"error: {checkpoint}: cannot load it as a checkpoint ({type(e).__name__}: {str(e)[:200]})",
              file=sys.stderr)
    return None


def decoding_options(args) -> dict:
    """The decoding options the user set (TranscribeOptions fields); the transcriber's defaults stand for the others."""
    chosen = {"beam_size": args.beam_size, "temperature": args.temperature, "initial_prompt": args.initial_prompt}
    return {k: v for k, v in chosen.items() if v is not None}


def check_decoding(transcriber, **decode) -> None:
    """ValueError now, before any file is read, for what the transcriber refuses (language, task, options):
    an empty batch runs all of its checks and decodes nothing."""
    transcriber.transcribe_batch([], **decode)


def find_audio(inputs: list[str]) -> tuple[list[tuple[Path, str]], dict[str, str]]:
    """([(file, output name without extension)], {input: why not}) for files and folders searched recursively."""
    found, missing = [], {}
    for p in map(Path, inputs):
        if p.is_dir():
            found += [(f, str(f.relative_to(p).with_suffix(""))) for f in sorted(p.rglob("*"))
                      if f.is_file() and f.suffix.lower() in WALKED_EXTENSIONS]
        elif p.is_file():
            found.append((p, p.stem))
        else:
            missing[str(p)] = "no such file or folder"
    return found, missing


def transcribe_files(transcriber, files: list[Path], batch_size: int, on_result, **decode) -> dict[str, str]:
    """Transcribe `files` batch by batch, calling on_result(path, transcript) for each; {path: error} for the rest."""
    from tqdm import tqdm

    from mm.media import SAMPLE_RATE, load_audio

    failures = {}
    with tqdm(total=len(files), unit="file", disable=None) as bar:
        for i in range(0, len(files), batch_size):
            loaded = []
            for path in files[i:i + batch_size]:
                try:
                    loaded.append((path, load_audio(path, SAMPLE_RATE, transcriber.max_seconds)))
                except (ValueError, OSError) as e:
                    failures[str(path)] = str(e)
            for path, result in transcribe_loaded(transcriber, loaded, batch_size, decode):
                if isinstance(result, Exception):
                    failures[str(path)] = describe(result)
                    continue
                try:
                    on_result(path, result)
                except OSError as e:  # an output that cannot be written
                    failures[str(path)] = describe(e)
            bar.update(len(files[i:i + batch_size]))
    return failures


def describe(e: Exception) -> str:
    """An error as the failure list shows it: our own messages as they are, anything else with its type."""
    return str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"


def failure_line(path: str, why: str) -> str:
    """`  path: why`, the path once (mm.media's messages begin with it already)."""
    return f"  {why}" if why.startswith(f"{path}: ") else f"  {path}: {why}"


def transcribe_loaded(transcriber, loaded: list, batch_size: int, decode: dict) -> list[tuple]:
    """[(path, transcript or the exception)]: the batch at once, file by file if that fails (to find the culprit)."""
    if not loaded:
        return []
    try:
        out = transcriber.transcribe_batch([a for _, a in loaded], batch_size=batch_size, **decode)
        return [(p, t) for (p, _), t in zip(loaded, out)]
    except Exception as e:
        if len(loaded) <= 1:
            return [(p, e) for p, _ in loaded]
        return [r for item in loaded for r in transcribe_loaded(transcriber, [item], 1, decode)]


def unusable(transcriber, language: str | None, task: str) -> str | None:
    """Why `transcriber` cannot do what was asked, or None."""
    if language is not None and language not in transcriber.languages:
        return f"{transcriber.name} does not know language {language!r} ({', '.join(transcriber.languages)})"
    if task == "translate" and not transcriber.can_translate:
        return f"{transcriber.name} cannot translate: it was trained to transcribe only"
    return None


def output_names(found: list[tuple[Path, str]], to_files: bool) -> tuple[dict[Path, str], dict[str, str]]:
    """({file: output name}, {file: why not}): each file once, and (to_files) never two writing one output."""
    names, owner, clashes = {}, {}, {}
    for path, name in found:
        if path in names:
            continue
        if to_files and owner.setdefault(name, path) != path:
            clashes[str(path)] = f"its output {name}.* would overwrite that of {owner[name]}"
        else:
            names[path] = name
    return names, clashes


def write_outputs(transcript, name: str, fmts: tuple[str, ...], output_dir: str | None, header: str = "") -> None:
    """<output_dir>/<name>.<fmt> for each format, or the first format on stdout when there is no output_dir."""
    if output_dir is None:
        from tqdm import tqdm
        tqdm.write(header + format_transcript(transcript, fmts[0]), file=sys.stdout, end="")  # around the bar
        return
    for fmt in fmts:
        out = Path(output_dir) / f"{name}.{fmt}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(format_transcript(transcript, fmt), encoding="utf-8")


def run_transcribe(args) -> int:
    fmts = FORMATS if args.format == "all" else (args.format,)
    language = language_code(args.language)  # ValueError: a bad argument
    found, missing = find_audio(args.inputs)
    if not found:
        why = "; ".join(f"{path}: {reason}" for path, reason in missing.items()) or f"none in {', '.join(args.inputs)}"
        print(f"error: no audio files ({why})", file=sys.stderr)
        return 2
    transcriber = load_transcriber(args.checkpoint, args.device)
    if transcriber is None:
        return 1
    if (why := unusable(transcriber, language, args.task)) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    decode = dict(language=language, task=args.task, timestamps=not args.no_timestamps, **decoding_options(args))
    check_decoding(transcriber, **decode)  # ValueError: a bad argument, said once rather than for every file
    names, clashes = output_names(found, args.output_dir is not None)
    failures = {**missing, **clashes}

    def write(path: Path, transcript) -> None:
        header = f"==> {path} <==\n" if len(names) > 1 else ""
        write_outputs(transcript, names[path], fmts, args.output_dir, header)

    failures.update(transcribe_files(transcriber, list(names), args.batch_size, write, **decode))
    if failures:
        print(f"{len(failures)} of {len(names) + len(missing) + len(clashes)} inputs failed:", file=sys.stderr)
        for path, why in failures.items():
            print(failure_line(path, why), file=sys.stderr)
    return 1 if failures else 0


# ---------------------------------------------------------------- eval

def run_eval(args) -> int:
    from mm.asr.evaluate import evaluate_transcriber, format_eval

    if args.ctc_weight is not None:
        return run_joint_eval(args)
    transcriber = load_transcriber(args.checkpoint, args.device)
    if transcriber is None:
        return 1
    check_decoding(transcriber, timestamps=not args.no_timestamps, **decoding_options(args))
    result = evaluate_transcriber(transcriber, args.data, args.language, args.batch_size, args.worst,
                                  timestamps=not args.no_timestamps, **decoding_options(args))
    print(format_eval(result))
    if args.json:
        about = {"checkpoint": args.checkpoint, "model": transcriber.name, "data": args.data,
                 "language": args.language, "timestamps": not args.no_timestamps, **decoding_options(args)}
        Path(args.json).write_text(json.dumps({**about, **result}, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    return 0


def run_joint_eval(args) -> int:
    """The eval command with --ctc-weight: mm.asr.evaluate.evaluate_asr, as the recipe's final evaluation."""
    import torch

    from mm.asr.evaluate import evaluate_asr
    from mm.asr.metrics import format_scores
    from mm.asr.transcriber import load_model_and_tokenizer

    if args.temperature or args.initial_prompt or args.no_timestamps:
        raise ValueError("--ctc-weight decodes by joint beam search without timestamps: --temperature, "
                         "--initial-prompt and --no-timestamps do not apply")
    model, tokenizer, _ = load_model_and_tokenizer(args.checkpoint, ctc_head=True)
    if model.ctc_head is None:
        raise ValueError(f"{args.checkpoint}: no CTC head (exports have none, nor do models trained with "
                         "--ctc_weight=0): give a recipes/asr run folder or one of its checkpoints/step_*.pt")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = evaluate_asr(model.to(device).eval(), tokenizer, args.data, device, batch_size=args.batch_size,
                          language=args.language, ctc_weight=args.ctc_weight, beam_size=args.beam_size or 6)
    print(format_scores(result))
    print(f"real-time factor {result['rtf']:.4f} ({result['eval_utterances']} utterances, "
          f"{result['eval_audio_s']:.1f} s of audio); decoded by beam search ({result['eval_beam_size']} beams) "
          f"joint with the CTC head (weight {args.ctc_weight:g}); the decoder alone: CER "
          f"{result['cer_mean_decoder_alone']:.4f} (mean over languages)")
    if args.json:
        about = {"checkpoint": args.checkpoint, "data": args.data, "language": args.language,
                 "ctc_weight": args.ctc_weight}
        Path(args.json).write_text(json.dumps({**about, **result}, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from mm.asr.server import main as serve
        return serve(argv[1:], prog="python -m mm.asr serve")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "transcribe" and args.format == "all" and args.output_dir is None:
        parser.error("--format all needs --output-dir")
    if args.command == "eval" and args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: no folder to write it in")  # found out now, not after the evaluation
    if not Path(args.checkpoint).exists():  # first: without a model nothing else matters
        print(f"error: no checkpoint at {args.checkpoint}: {TRAIN_HINT}", file=sys.stderr)
        return 1
    try:
        return run_transcribe(args) if args.command == "transcribe" else run_eval(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
