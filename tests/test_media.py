"""mm.media's audio helpers and read_ref, on audio the tests write and a local HTTP server.

(The image helpers are covered through the zero-shot tests, which use them.)
"""
from __future__ import annotations

import base64
import contextlib
import http.server
import io
import socket
import threading

import numpy as np
import pytest
import soundfile

from mm.media import (AUDIO_EXTENSIONS, AUDIO_KEYS, SAMPLE_RATE, AudioTooLong, EmptyAudio, NotAudio, RefTooLarge,
                      UnreadableRef, check_audio_header, load_audio, read_ref)


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    """A sine, float32 [seconds * rate]."""
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    """samples ([T] or [T, channels]) as an audio file's bytes; skips the test if soundfile cannot write fmt/subtype."""
    if fmt not in soundfile.available_formats() or (subtype and subtype not in soundfile.available_subtypes(fmt)):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def peak_hz(samples: np.ndarray, rate: int) -> float:
    """The frequency of the FFT's largest bin."""
    return float(np.argmax(np.abs(np.fft.rfft(samples))) * rate / len(samples))


def flac_declaring(seconds: float, rate: int = SAMPLE_RATE) -> bytes:
    """One second of FLAC whose STREAMINFO claims `seconds`: only a header read can see that length."""
    data = bytearray(encode(tone(1.0, rate), rate, "FLAC"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # first metadata block is STREAMINFO
    # STREAMINFO body starts at byte 8; its 64 bits from body offset 10 end with the 36-bit total sample count
    field = int.from_bytes(data[18:26], "big")
    field = (field & ~((1 << 36) - 1)) | round(seconds * rate)
    data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


# ---------------------------------------------------------------- load_audio

@pytest.mark.parametrize("fmt, subtype, ext, rate, lossless", [
    ("WAV", "PCM_16", ".wav", 16000, True),
    ("FLAC", None, ".flac", 16000, True),
    ("OGG", "VORBIS", ".ogg", 16000, False),
    ("OGG", "OPUS", ".opus", 48000, False),  # Opus only runs at 8/12/16/24/48 kHz
    ("MP3", "MPEG_LAYER_III", ".mp3", 16000, False),
])
def test_load_audio_reads_each_listed_format_from_bytes_and_path(tmp_path, fmt, subtype, ext, rate, lossless):
    assert ext in AUDIO_EXTENSIONS and ext.lstrip(".") in AUDIO_KEYS
    data = encode(tone(1.0, rate), rate, fmt, subtype)
    path = tmp_path / f"clip{ext}"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        audio = load_audio(source)
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert abs(len(audio) - SAMPLE_RATE) <= (0 if lossless else 0.05 * SAMPLE_RATE)
        assert abs(peak_hz(audio, SAMPLE_RATE) - 440) <= 2
        if lossless:
            np.testing.assert_allclose(audio, tone(1.0, SAMPLE_RATE), atol=1e-4)  # 16-bit quantisation


def test_stereo_is_down_mixed_to_the_channel_mean():
    left, right = tone(0.5, SAMPLE_RATE), np.full(SAMPLE_RATE // 2, 0.25, np.float32)
    audio = load_audio(encode(np.stack([left, right], axis=1), SAMPLE_RATE, "WAV", "FLOAT"))
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-6)


def test_44k1_is_resampled_to_16k_and_a_440_hz_tone_stays_at_440_hz():
    audio = load_audio(encode(tone(2.0, 44100), 44100, "WAV", "FLOAT"))
    assert len(audio) == 2 * SAMPLE_RATE
    assert peak_hz(audio, SAMPLE_RATE) == pytest.approx(440, abs=0.5)  # bins are 0.5 Hz wide
    assert np.abs(audio[1000:-1000]).max() == pytest.approx(0.5, abs=0.01)  # no gain change away from the edges
    assert len(load_audio(encode(tone(2.0, 16000), 16000), sample_rate=8000)) == 16000  # any target rate


def test_empty_audio_is_a_clear_error(tmp_path):
    with pytest.raises(EmptyAudio, match="empty"):
        load_audio(b"")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(EmptyAudio, match="empty file"):
        load_audio(tmp_path / "empty.wav")
    header_only = encode(np.zeros(0, np.float32), SAMPLE_RATE, "WAV")
    with pytest.raises(EmptyAudio, match="no audio samples"):
        load_audio(header_only)


def test_corrupt_or_truncated_bytes_are_not_audio():
    with pytest.raises(NotAudio, match=r"not audio soundfile can decode .*\.flac"):
        load_audio(np.random.default_rng(0).bytes(5000))
    wav = encode(tone(1.0, SAMPLE_RATE), SAMPLE_RATE, "WAV")
    with pytest.raises(NotAudio):
        load_audio(wav[:30])  # cut inside the header
    with pytest.raises(NotAudio, match="truncated or corrupt"):
        load_audio(flac_declaring(5.0))  # promises 5 s, holds 1 s: refused rather than padded


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such audio file"):
        load_audio(tmp_path / "nope.flac")


def test_over_long_audio_is_refused_from_the_header_without_decoding(monkeypatch):
    reads = []
    original = soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read", lambda self, *a, **k: reads.append(1) or original(self, *a, **k))
    ten_hours = flac_declaring(10 * 3600)  # 1 s of data: decoding could never find 10 h
    with pytest.raises(AudioTooLong, match=r"36000\.0 s exceeds the limit of 30 s"):
        load_audio(ten_hours, max_seconds=30)
    assert reads == []
    load_audio(encode(tone(1.0, SAMPLE_RATE), SAMPLE_RATE, "FLAC"), max_seconds=30)
    assert reads  # the spy does see decoding
    with pytest.raises(AudioTooLong):
        load_audio(encode(tone(2.0, 44100), 44100), max_seconds=1.5)  # judged at the source rate


def test_a_given_name_replaces_the_path_in_messages(tmp_path):
    bad, long = tmp_path / "secret_upload_123.wav", tmp_path / "secret_long_456.flac"
    bad.write_bytes(b"RIFF not really a wave file" * 10)
    long.write_bytes(flac_declaring(60))
    for path, error in ((bad, NotAudio), (long, AudioTooLong)):
        with pytest.raises(error) as caught:
            load_audio(path, max_seconds=30, name="your upload")
        assert str(caught.value).startswith("your upload: ") and str(tmp_path) not in str(caught.value)
        error = caught.value
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)  # no chained traceback
        with pytest.raises(type(error), match="secret_"):
            load_audio(path, max_seconds=30)  # without a name, the path is how the file is called


@pytest.mark.parametrize("frames, rate, error, match", [
    (0, 16000, EmptyAudio, "no audio samples"),
    (16000, 0, NotAudio, "sample rate 0 Hz"),
    (16000, 10_000_000, NotAudio, "sample rate 10000000 Hz"),  # would make max_seconds meaningless for memory
    (16000 * 31, 16000, AudioTooLong, "31.0 s"),
])
def test_check_audio_header_refuses(frames, rate, error, match):
    with pytest.raises(error, match=match):
        check_audio_header(frames, rate, max_seconds=30, name="clip")


def test_check_audio_header_accepts_up_to_the_limit_and_no_limit():
    check_audio_header(16000 * 30, 16000, max_seconds=30)
    check_audio_header(16000 * 3600 * 10, 16000, max_seconds=None)


# ---------------------------------------------------------------- read_ref

def test_read_ref_local_paths(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.bin").write_bytes(b"hello")
    assert read_ref("clips/a.bin", tmp_path, max_bytes=100) == b"hello"
    assert read_ref("clips/a.bin", str(tmp_path), max_bytes=100) == b"hello"
    absolute = str(tmp_path / "clips" / "a.bin")
    assert read_ref(absolute, "/somewhere/else", max_bytes=100) == b"hello"  # absolute: root ignored
    assert read_ref(absolute, None, max_bytes=100) == b"hello"
    assert read_ref((tmp_path / "clips" / "a.bin").as_uri(), None, max_bytes=100) == b"hello"  # file:///...
    assert read_ref("file://localhost" + absolute, None, max_bytes=100) == b"hello"
    with pytest.raises(UnreadableRef, match="no folder to resolve it against"):
        read_ref("clips/a.bin", None, max_bytes=100)  # never read relative to wherever the process runs


def test_read_ref_missing_and_oversize_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"clips/nope\.png: no such file"):
        read_ref("clips/nope.png", tmp_path, max_bytes=100)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_ref((tmp_path / "nope.png").as_uri(), None, max_bytes=100)
    (tmp_path / "big.bin").write_bytes(b"x" * 101)
    with pytest.raises(RefTooLarge, match="101 bytes exceeds the limit of 100"):
        read_ref("big.bin", tmp_path, max_bytes=100)
    assert read_ref("big.bin", tmp_path, max_bytes=101) == b"x" * 101


def test_read_ref_data_urls():
    payload = bytes(range(256))
    b64 = base64.b64encode(payload).decode()
    assert read_ref(f"data:application/octet-stream;base64,{b64}", None, max_bytes=256) == payload
    assert read_ref(f"data:image/png;BASE64,{b64[:40]}\n{b64[40:]}", None, max_bytes=256) == payload  # wrapped
    assert read_ref("data:,hello%20world", None, max_bytes=100) == b"hello world"  # not base64: percent-encoded
    with pytest.raises(RefTooLarge):
        read_ref(f"data:image/png;base64,{b64}", None, max_bytes=255)
    with pytest.raises(RefTooLarge, match=r"\.\.\. \(") as caught:  # long refs are cut in messages
        read_ref("data:image/png;base64," + "A" * 100_000, None, max_bytes=1000)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("ref, match", [
    ("data:image/png;base64,iVBOR*w0KGgo=", "bad base64"),
    ("data:image/png;base64,iVBORw0KGgo", "bad base64"),  # missing padding
    ("data:image/png;base64", "no ','"),
    ("s3://bucket/key.png", "unsupported URL scheme 's3'"),
    ("file://otherhost/x.png", "another host"),
])
def test_read_ref_refuses_malformed_references(ref, match):
    with pytest.raises(UnreadableRef, match=match):
        read_ref(ref, "/tmp", max_bytes=1000)


class _Handler(http.server.BaseHTTPRequestHandler):
    """/ok: 5 bytes; /big: 1000 bytes announced; /unannounced: 1000 bytes without Content-Length; else 404."""

    def do_GET(self):
        if self.path == "/ok":
            self._send(200, b"hello", announce=True)
        elif self.path == "/big":
            self._send(200, b"x" * 1000, announce=True)
        elif self.path == "/unannounced":
            self._send(200, b"x" * 1000, announce=False)
        else:
            self._send(404, b"not here", announce=True)

    def _send(self, code: int, body: bytes, announce: bool):
        self.send_response(code)
        if announce:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()  # HTTP/1.0: without a length, the body ends when the connection closes
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def http_base():
    """The base URL of a local HTTP server in a thread, for the module's tests."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_read_ref_http(http_base):
    assert read_ref(f"{http_base}/ok", None, max_bytes=100) == b"hello"
    assert read_ref(f"{http_base}/ok", None, max_bytes=5) == b"hello"
    with pytest.raises(UnreadableRef, match="HTTP 404"):
        read_ref(f"{http_base}/missing.png", None, max_bytes=100)
    with pytest.raises(RefTooLarge, match=r"1,000 bytes \(Content-Length\)"):
        read_ref(f"{http_base}/big", None, max_bytes=100)
    with pytest.raises(RefTooLarge, match="more than 100 bytes"):
        read_ref(f"{http_base}/unannounced", None, max_bytes=100)
    assert len(read_ref(f"{http_base}/unannounced", None, max_bytes=1000)) == 1000


def test_read_ref_unreachable_host_is_unreadable():
    with contextlib.closing(socket.socket()) as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UnreadableRef, match="could not fetch"):
        read_ref(f"http://127.0.0.1:{port}/x.png", None, max_bytes=100)
