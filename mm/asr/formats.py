"""A transcript as text, JSON or subtitles, in openai-whisper's file formats.

    text = format_transcript(transcript, "srt")      # one of FORMATS

    txt   each segment's text, stripped, one per line
    json  Transcript.to_dict(), UTF-8 (not \\u-escaped)
    srt   cues numbered from 1, "00:00:01,000 --> 00:00:02,500" (hours always, comma)
    vtt   "WEBVTT" header, "00:01.000 --> 00:02.500" (hours only when > 0, dot)
    tsv   "start<TAB>end<TAB>text" header, then times in integer milliseconds

Times are rounded to the millisecond as openai-whisper rounds them (round(seconds * 1000)), so its
files and ours agree byte for byte on ordinary text. Where whisper would write a broken file we do
not: a line break inside a segment's text becomes a space (it would end an SRT/VTT cue or a TSV row,
or split a txt line), a tab becomes a space in TSV (as whisper does), "-->" becomes "->" in subtitles
(as whisper does), VTT escapes "&" and "<" (cue markup otherwise), and a segment with no text gets no
subtitle cue (an empty cue ends early in some players).

Also the language names OpenAI's API answers with ("en" -> "english") and the codes users may type.
"""
from __future__ import annotations

import json
import re

from mm.asr.tokenizer import LANGUAGES

FORMATS = ("txt", "json", "srt", "vtt", "tsv")
_LINE_BREAK = re.compile(r"\s*[\r\n\u2028\u2029]+\s*")


def format_transcript(transcript, fmt: str) -> str:
    """The transcript (a mm.asr.transcribe.Transcript: .segments with .start, .end (s), .text; .to_dict())
    written as `fmt`, one of FORMATS; the text ends with a newline."""
    if fmt == "json":
        return json.dumps(transcript.to_dict(), ensure_ascii=False) + "\n"
    if fmt == "txt":
        return "".join(one_line(s.text) + "\n" for s in transcript.segments)
    if fmt == "tsv":
        rows = [f"{milliseconds(s.start)}\t{milliseconds(s.end)}\t{one_line(s.text).replace(chr(9), ' ')}"
                for s in transcript.segments]
        return "".join(row + "\n" for row in ["start\tend\ttext", *rows])
    if fmt == "srt":
        cues = subtitle_cues(transcript.segments, hours=True, decimal=",")
        return "".join(f"{i}\n{start} --> {end}\n{text}\n\n" for i, (start, end, text) in enumerate(cues, 1))
    if fmt == "vtt":
        cues = subtitle_cues(transcript.segments, hours=False, decimal=".")
        return "WEBVTT\n\n" + "".join(f"{start} --> {end}\n{escape_vtt(text)}\n\n" for start, end, text in cues)
    raise ValueError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")


def one_line(text: str) -> str:
    """`text` stripped, each run of line breaks (and the spaces around it) made one space."""
    return _LINE_BREAK.sub(" ", text.strip())


def milliseconds(seconds: float) -> int:
    """openai-whisper's rounding: round(seconds * 1000); negative times are refused."""
    if not seconds >= 0:  # also refuses NaN
        raise ValueError(f"timestamps must be >= 0 seconds, got {seconds}")
    return round(seconds * 1000.0)


def format_timestamp(seconds: float, hours: bool = False, decimal: str = ".") -> str:
    """"HH:MM:SS,mmm" (SRT: hours=True, decimal=",") or "MM:SS.mmm", with hours anyway past the first."""
    ms = milliseconds(seconds)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return (f"{h:02d}:" if hours or h > 0 else "") + f"{m:02d}:{s:02d}{decimal}{ms:03d}"


def subtitle_cues(segments, hours: bool, decimal: str) -> list[tuple[str, str, str]]:
    """(start, end, text) per segment with text, "-->" in the text made "->"."""
    cues = []
    for seg in segments:
        text = one_line(seg.text).replace("-->", "->")
        if text:
            cues.append((format_timestamp(seg.start, hours, decimal), format_timestamp(seg.end, hours, decimal), text))
    return cues


def escape_vtt(text: str) -> str:
    """WebVTT cue text with "&" and "<" escaped, so a transcript never reads as cue markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;")


def language_name(code: str) -> str:
    """The lowercase English name of a Whisper language code, as OpenAI's verbose_json gives it ("english");
    the code itself when it has no name."""
    return LANGUAGES.get(code, code)


_CODES_BY_NAME = {name: code for code, name in LANGUAGES.items()}


def language_code(text: str | None) -> str | None:
    """The Whisper code of a language typed as a code ("en") or an English name ("English"); None for
    none, "" or "auto" (detect it). ValueError names the accepted codes otherwise."""
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    key = text.strip().lower()
    if key in LANGUAGES:
        return key
    if key in _CODES_BY_NAME:
        return _CODES_BY_NAME[key]
    raise ValueError(f"unknown language {text.strip()[:40]!r}: give a code such as en, de, zh "
                     f"({len(LANGUAGES)} codes, as Whisper's), an English name, or auto")
