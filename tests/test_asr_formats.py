"""mm.asr.formats: transcripts as txt, json, srt, vtt and tsv, byte for byte as openai-whisper writes them on
ordinary text, and still well-formed where whisper's would not be."""
import io
import json

import pytest

from mm.asr.formats import FORMATS, format_timestamp, format_transcript, language_code, language_name
from tests.asr_fakes import transcript

ORDINARY = transcript([(0.0, 1.5, " Hello there."), (1.5, 3.24, " How are you?"), (3.24, 7.0, " Fine, thanks.")])


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt", "tsv"])
def test_agrees_with_openai_whisper_writers(fmt):
    utils = pytest.importorskip("whisper.utils")
    result = {"text": ORDINARY.text, "language": "en",
              "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in ORDINARY.segments]}
    out = io.StringIO()
    utils.get_writer(fmt, ".").write_result(result, file=out)
    assert format_transcript(ORDINARY, fmt) == out.getvalue()


def test_each_format_on_a_small_transcript():
    t = transcript([(0.0, 1.0, " one"), (1.0, 2.5, " two")])
    assert format_transcript(t, "txt") == "one\ntwo\n"
    assert format_transcript(t, "srt") == ("1\n00:00:00,000 --> 00:00:01,000\none\n\n"
                                           "2\n00:00:01,000 --> 00:00:02,500\ntwo\n\n")
    assert format_transcript(t, "vtt") == "WEBVTT\n\n00:00.000 --> 00:01.000\none\n\n00:01.000 --> 00:02.500\ntwo\n\n"
    assert format_transcript(t, "tsv") == "start\tend\ttext\n0\t1000\tone\n1000\t2500\ttwo\n"
    assert json.loads(format_transcript(t, "json")) == t.to_dict()
    assert set(FORMATS) == {"txt", "json", "srt", "vtt", "tsv"}


@pytest.mark.parametrize("seconds, srt, vtt", [
    (0.0, "00:00:00,000", "00:00.000"),
    (59.9994, "00:00:59,999", "00:59.999"),        # rounds down
    (59.9996, "00:01:00,000", "01:00.000"),        # rounds up, carrying into the minutes
    (3599.9996, "01:00:00,000", "01:00:00.000"),   # ... and into the hours: VTT shows hours once there are any
    (3723.042, "01:02:03,042", "01:02:03.042"),
    (36_000.5, "10:00:00,500", "10:00:00.500"),
    (100 * 3600.0, "100:00:00,000", "100:00:00.000"),
])
def test_timestamps_round_to_the_millisecond_and_show_hours(seconds, srt, vtt):
    assert format_timestamp(seconds, hours=True, decimal=",") == srt
    assert format_timestamp(seconds) == vtt
    utils = pytest.importorskip("whisper.utils")
    assert utils.format_timestamp(seconds, always_include_hours=True, decimal_marker=",") == srt


def test_hours_in_every_format():
    t = transcript([(3600.0, 3661.5, " late")])
    assert "01:00:00,000 --> 01:01:01,500" in format_transcript(t, "srt")
    assert "01:00:00.000 --> 01:01:01.500" in format_transcript(t, "vtt")
    assert "3600000\t3661500\tlate" in format_transcript(t, "tsv")


def test_text_that_would_break_the_file_is_made_safe():
    t = transcript([(0.0, 1.0, " a --> b"), (1.0, 2.0, " line one\n\nline two \r\n"), (2.0, 3.0, " tab\there"),
                    (3.0, 4.0, "  "), (4.0, 5.0, " <b>R&D</b>")])
    srt = format_transcript(t, "srt")
    cues = srt.split("\n\n")[:-1]
    assert len(cues) == 4, srt  # the empty segment gets no cue; no text line ends a cue early
    assert cues[0] == "1\n00:00:00,000 --> 00:00:01,000\na -> b"
    assert cues[1].endswith("\nline one line two") and cues[3].endswith("\n<b>R&D</b>")  # SRT allows the tags
    assert all(cue.count("-->") == 1 for cue in cues)
    vtt = format_transcript(t, "vtt")
    assert vtt.startswith("WEBVTT\n\n") and "\na -> b\n" in vtt and "&lt;b>R&amp;D&lt;/b>" in vtt
    assert vtt.count("-->") == 4
    assert format_transcript(t, "txt").split("\n") == ["a --> b", "line one line two", "tab\there", "", "<b>R&D</b>",
                                                       ""]
    rows = format_transcript(t, "tsv").splitlines()
    assert len(rows) == 6 and all(row.count("\t") == 2 for row in rows)
    assert rows[3] == "2000\t3000\ttab here"
    assert json.loads(format_transcript(t, "json"))["segments"][1]["text"] == " line one\n\nline two \r\n"


def test_json_keeps_unicode_readable():
    t = transcript([(0.0, 1.0, " привет мир")], language="ru")
    out = format_transcript(t, "json")
    assert "привет мир" in out and json.loads(out)["language"] == "ru"


def test_no_segments_and_bad_input():
    empty = transcript([], duration=3.0)
    assert format_transcript(empty, "txt") == "" and format_transcript(empty, "srt") == ""
    assert format_transcript(empty, "vtt") == "WEBVTT\n\n" and format_transcript(empty, "tsv") == "start\tend\ttext\n"
    with pytest.raises(ValueError, match="unknown format 'docx'.*txt, json, srt, vtt, tsv"):
        format_transcript(empty, "docx")
    with pytest.raises(ValueError, match=">= 0"):
        format_transcript(transcript([(-0.5, 1.0, " x")]), "srt")
    with pytest.raises(ValueError, match=">= 0"):
        format_timestamp(float("nan"))


def test_language_codes_and_names():
    assert language_name("en") == "english" and language_name("yue") == "cantonese"
    assert language_code("EN") == "en" and language_code(" German ") == "de" and language_code("haitian creole") == "ht"
    assert language_code(None) is language_code("") is language_code("auto") is None
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        language_code("klingon")
