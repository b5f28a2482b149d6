"""Look at image-text or speech shards before training on them: counts, bad samples, distributions, and a
contact sheet of random samples from every shard, in one streaming pass with flat memory.

    python -m data_tools.inspect 'shards/train-{000000..000099}.tar' --output=report/ --per_shard=8 --seed=0

SHARDS is any spec mm's loader reads (mm.shards.expand_shard_spec): a path, a folder, brace patterns,
`http(s)://` URLs, `pipe:` commands, several sources joined by `::`; .jsonl audio manifests too. Image-text
shards are data_tools.write_shards' layout (jpg/png + txt), speech shards data_tools.write_asr_shards'
(flac + json {"text", "language", "duration"}). The report folder holds:

    stats.json       samples, bad samples by kind (undecodable_image, undecodable_audio, audio_too_long,
                     missing_text, missing_media, bad_json) and bad shards (unreadable or cut short: the
                     samples before the fault are counted), per-shard counts, distributions summarised
                     (count, min, max, mean, p5, p50, p95) and the first bad examples
    *.png            histograms of what applies: image_size (width and height), caption_length (words),
                     audio_duration (seconds), language (from the samples' json "language")
    index.html       per shard, --per_shard random samples (a seeded reservoir: uniform over the shard's
                     decodable samples): image, caption or transcript, an audio player, key, language, size
    samples.json     the same samples as JSON
    media/           their thumbnails (longest side 256 px) and audio, beside the page

Memory: one sample at a time, --per_shard picks per shard, and histograms as counts of binned values
(integers for pixels and words, 0.1 s for durations), never a list of every value. A bad sample is counted
and skipped, a bad shard counted and the pass goes on. The report is written to a temporary folder and
renamed into place once complete; an existing --output is replaced only if it is an earlier report.
"""
from __future__ import annotations

import argparse
import collections
import html
import io
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from mm.decoders import AUDIO_REF_KEYS, DEFAULT_MAX_AUDIO_BYTES, LANGUAGE_KEYS, TEXT_KEYS, fetch_ref
from mm.metrics import setup_logging
from mm.media import AUDIO_KEYS, DEFAULT_MAX_SECONDS, IMAGE_KEYS, SAMPLE_RATE, AudioTooLong, load_audio, open_image
from mm.shards import ShardSpecError, expand_shard_spec, read_samples

from data_tools.curate.io import local_input_inside, sample_json

log = logging.getLogger("data_tools.inspect")

BAD_KINDS = ("undecodable_image", "undecodable_audio", "audio_too_long", "missing_text", "missing_media", "bad_json")
MAX_BAD_EXAMPLES = 20  # kept in stats.json
MAX_LOGGED = 10  # bad samples logged as warnings; the rest only counted
THUMBNAIL_SIDE = 256  # px, the longest side of a contact-sheet image
MAX_LANGUAGES_PLOTTED = 30
REPORT_FILES = ("stats.json", "index.html")  # a folder holding these is an earlier report, safe to replace


class ReportError(ValueError):
    """The output folder cannot take the report (it holds something else). Nothing is written."""


# ---------------------------------------------------------------- running distributions

class Histogram:
    """Counts of values binned at `resolution` (1: whole numbers): memory grows with the distinct bins,
    not with the samples."""

    def __init__(self, resolution: float = 1.0):
        self.resolution = resolution
        self.bins: collections.Counter[int] = collections.Counter()
        self.total = 0.0

    def add(self, value: float) -> None:
        self.bins[round(value / self.resolution)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.bins.values())

    def values_and_counts(self) -> tuple[list[float], list[int]]:
        """The bins' values (ascending) and their counts."""
        keys = sorted(self.bins)
        return [k * self.resolution for k in keys], [self.bins[k] for k in keys]

    def quantile(self, q: float) -> float:
        """The smallest binned value with at least a fraction `q` of the counts at or below it."""
        values, counts = self.values_and_counts()
        need, seen = q * self.count, 0
        for value, n in zip(values, counts):
            seen += n
            if seen >= need:
                return value
        return values[-1]

    def summary(self) -> dict[str, float]:
        """{count, min, max, mean, p5, p50, p95}; min/max/quantiles are binned values, the mean is exact."""
        if not self.bins:
            return {"count": 0}
        values, _ = self.values_and_counts()
        digits = 3 if self.resolution < 1 else 0
        binned = {"min": values[0], "max": values[-1],
                  **{f"p{p}": self.quantile(p / 100) for p in (5, 50, 95)}}
        return {"count": self.count, **{k: round(v, digits) if digits else int(v) for k, v in binned.items()},
                "mean": round(self.total / self.count, 3)}


def reservoir_slot(rng: random.Random, seen: int, k: int) -> int | None:
    """Algorithm R: where the item after `seen` earlier ones goes in a reservoir of k (None: not kept).
    Every item of a stream ends up kept with the same probability k / n."""
    if seen < k:
        return seen
    j = rng.randrange(seen + 1)
    return j if j < k else None


# ---------------------------------------------------------------- one sample

@dataclass
class Seen:
    """What one raw sample shows. `image` and `audio_bytes` are dropped once the sample is passed over."""
    key: str
    position: int  # in its shard, from 0
    text: str | None = None
    language: str | None = None
    image: Image.Image | None = None
    image_ext: str = ""
    duration: float | None = None  # seconds
    audio_bytes: bytes | None = None
    audio_ext: str = ""
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail)

    @property
    def showable(self) -> bool:
        return self.image is not None or self.audio_bytes is not None


def look_at(raw: dict, position: int) -> Seen:
    """Decode what a raw sample holds (text, language, image, audio), noting each problem found."""
    seen = Seen(key=str(raw.get("__key__")), position=position)
    meta = read_meta(raw, seen)
    read_text(raw, meta, seen)
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is not None:
        read_image(raw[image_key], image_key, seen)
    audio = find_audio(raw, meta, seen)
    if audio is not None:
        read_audio(*audio, seen)
    names_audio = any(k in raw for k in AUDIO_KEYS) or any(k in meta for k in AUDIO_REF_KEYS)
    if image_key is None and not names_audio:
        fields = sorted(k for k in raw if not k.startswith("__"))
        seen.problems.append(("missing_media", f"no image or audio field; fields: {fields}"))
    return seen


def read_meta(raw: dict, seen: Seen) -> dict:
    """The json field as a dict ({} when absent; a bad_json problem when it is not a JSON object)."""
    try:
        return sample_json(raw) or {}
    except ValueError as e:
        seen.problems.append(("bad_json", str(e)))
        return {}


def read_text(raw: dict, meta: dict, seen: Seen) -> None:
    """Caption or transcript: a txt/caption/text field, else the json's "text"; language from the json."""
    key = next((k for k in TEXT_KEYS if k in raw), None)
    text, problem = (meta.get("text"), "no text field or json text") if key is None else (raw[key], "empty text")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            text, problem = None, f"field {key} is not UTF-8"
    if isinstance(text, str) and text.strip():
        seen.text = text.strip()
    else:
        seen.problems.append(("missing_text", problem))
    language = next((meta[k] for k in LANGUAGE_KEYS if k in meta), None)
    seen.language = (language.strip() or None) if isinstance(language, str) else None


def read_image(data: bytes, ext: str, seen: Seen) -> None:
    try:
        seen.image, seen.image_ext = open_image(data, name=f"sample {seen.key}"), ext
    except Exception as e:  # noqa: BLE001 - any decoder failure is one counted bad sample
        seen.problems.append(("undecodable_image", str(e)))


def find_audio(raw: dict, meta: dict, seen: Seen) -> tuple[bytes, str] | None:
    """(bytes, extension) of a tar sample's audio field, or of what a manifest's json "audio" points at."""
    key = next((k for k in AUDIO_KEYS if k in raw), None)
    if key is not None:
        return raw[key], key
    ref = next((meta[k] for k in AUDIO_REF_KEYS if k in meta), None)
    if ref is None:
        return None
    try:
        data = fetch_ref(raw, ref, DEFAULT_MAX_AUDIO_BYTES)
    except Exception as e:  # noqa: BLE001 - missing, too large, unreadable: one bad sample
        seen.problems.append(("undecodable_audio", str(e)))
        return None
    ext = str(ref).rsplit(".", 1)[-1].lower()
    return data, ext if ext in AUDIO_KEYS else ""


def read_audio(data: bytes, ext: str, seen: Seen) -> None:
    """Decode (so a corrupt file is caught, not just its header) and measure; keep the bytes for a player."""
    try:
        audio = load_audio(data, SAMPLE_RATE, DEFAULT_MAX_SECONDS, name=f"sample {seen.key}")
    except AudioTooLong as e:
        seen.problems.append(("audio_too_long", str(e)))
        return
    except Exception as e:  # noqa: BLE001 - any decoder failure is one counted bad sample
        seen.problems.append(("undecodable_audio", str(e)))
        return
    seen.duration = len(audio) / SAMPLE_RATE
    if not ext:  # a format we cannot name for the browser: hand it the decoded audio as FLAC
        buf = io.BytesIO()
        soundfile.write(buf, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        data, ext = buf.getvalue(), "flac"
    seen.audio_bytes, seen.audio_ext = data, ext


# ---------------------------------------------------------------- the pass

@dataclass
class Tally:
    """Everything counted over the pass; its size does not grow with the samples."""
    samples: int = 0
    bad_samples: int = 0
    bad_shards: int = 0
    bad: collections.Counter = field(default_factory=collections.Counter)
    bad_examples: list = field(default_factory=list)
    languages: collections.Counter = field(default_factory=collections.Counter)
    hists: dict = field(default_factory=lambda: {
        "image_width": Histogram(), "image_height": Histogram(), "image_aspect": Histogram(0.01),
        "caption_words": Histogram(), "caption_chars": Histogram(), "audio_duration": Histogram(0.1)})

    def add(self, seen: Seen, shard: str) -> None:
        self.samples += 1
        if seen.image is not None:
            w, h = seen.image.size
            self.hists["image_width"].add(w)
            self.hists["image_height"].add(h)
            self.hists["image_aspect"].add(max(w, h) / max(1, min(w, h)))
        if seen.text is not None:
            self.hists["caption_words"].add(len(seen.text.split()))
            self.hists["caption_chars"].add(len(seen.text))
        if seen.duration is not None:
            self.hists["audio_duration"].add(seen.duration)
        if seen.language is not None:
            self.languages[seen.language] += 1
        if seen.problems:
            self.count_problems(seen, shard)

    def count_problems(self, seen: Seen, shard: str) -> None:
        self.bad_samples += 1
        for kind, detail in seen.problems:
            self.bad[kind] += 1
            if len(self.bad_examples) < MAX_BAD_EXAMPLES:
                self.bad_examples.append({"shard": shard, "key": seen.key, "kind": kind, "detail": detail})
        if self.bad_samples <= MAX_LOGGED:
            log.warning("sample %s in %s: %s", seen.key, shard, "; ".join(f"{k}: {d}" for k, d in seen.problems))


def inspect_shard(url: str, index: int, tally: Tally, per_shard: int, seed: int, media: Path, bar) -> dict:
    """One shard's pass: count into `tally`, keep a seeded reservoir of its showable samples, write their
    media under `media`. Returns the shard's entry for samples.json: {"url", "samples", "bad_samples",
    "bad_shard", "picked": [...]}."""
    counts = {"bad_shards": 0}
    rng = random.Random(f"{seed}-{index}")  # per shard: a shard's picks do not depend on the others
    picks: list[dict] = []
    samples = bad = showable = 0
    bar.set_postfix_str(os.path.basename(url.rstrip("/"))[-40:], refresh=False)
    for position, raw in enumerate(read_samples([url], counts)):
        seen = look_at(raw, position)
        tally.add(seen, url)
        samples, bad = samples + 1, bad + bool(seen.problems)
        bar.update()
        if seen.showable:
            slot = reservoir_slot(rng, showable, per_shard)
            showable += 1
            if slot == len(picks):
                picks.append(pick_entry(seen))
            elif slot is not None:
                picks[slot] = pick_entry(seen)
    tally.bad_shards += counts["bad_shards"]
    picks.sort(key=lambda p: p["position"])
    for slot, pick in enumerate(picks):
        save_media(pick, media, f"{index:05d}-{slot:03d}")
    return {"url": url, "samples": samples, "bad_samples": bad, "bad_shard": counts["bad_shards"] > 0,
            "picked": picks}


def pick_entry(seen: Seen) -> dict:
    """A contact-sheet entry, holding a thumbnail (not the image) and the audio bytes until save_media."""
    entry: dict[str, Any] = {"key": seen.key, "position": seen.position, "text": seen.text,
                             "language": seen.language, "problems": [k for k, _ in seen.problems]}
    if seen.image is not None:
        entry["width"], entry["height"] = seen.image.size
        thumb = seen.image.copy()
        thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        # encoded only if it is still picked at the shard's end; photos stay small as JPEG
        entry["image"] = (thumb, "jpg" if seen.image_ext in ("jpg", "jpeg", "webp") else "png")
    if seen.audio_bytes is not None:
        entry["duration"] = round(seen.duration, 3)
        entry["audio"] = (seen.audio_bytes, seen.audio_ext)
    return entry


def save_media(pick: dict, media: Path, stem: str) -> None:
    """Write a pick's image and audio under `media` (names of our own, never the sample's key) and put their
    paths, relative to the report, in their place."""
    if "image" in pick:
        thumb, ext = pick["image"]
        path = media / f"{stem}.{ext}"
        if ext == "jpg":
            thumb.save(path, format="JPEG", quality=85)
        else:
            thumb.save(path, format="PNG", compress_level=1)  # fast; the page is read locally
        pick["image"] = f"media/{path.name}"
    if "audio" in pick:
        data, ext = pick["audio"]
        (media / f"{stem}.{ext}").write_bytes(data)
        pick["audio"] = f"media/{stem}.{ext}"


def run_pass(urls: list[str], per_shard: int, seed: int, media: Path) -> tuple[Tally, list[dict]]:
    tally, sheets = Tally(), []
    with tqdm(desc="inspecting", unit="sample", mininterval=2) as bar:
        for index, url in enumerate(urls):
            sheets.append(inspect_shard(url, index, tally, per_shard, seed, media, bar))
    return tally, sheets


# ---------------------------------------------------------------- the report

def build_stats(spec: str, tally: Tally, sheets: list[dict], histograms: list[str]) -> dict:
    dists = {name: h.summary() for name, h in tally.hists.items() if h.count}
    return {"spec": spec, "shards": len(sheets), "samples": tally.samples, "bad_samples": tally.bad_samples,
            "bad": {**{k: tally.bad[k] for k in BAD_KINDS}, "bad_shards": tally.bad_shards},
            "per_shard": [{k: s[k] for k in ("url", "samples", "bad_samples", "bad_shard")} for s in sheets],
            "distributions": dists, "languages": dict(tally.languages.most_common()), "histograms": histograms,
            "bad_examples": tally.bad_examples}


def save_histogram_pngs(tally: Tally, out: Path) -> list[str]:
    """The histograms that apply, as PNGs under `out`; returns their file names."""
    h, written = tally.hists, []
    plots = (("image_size.png", "image size", "pixels", {"width": h["image_width"], "height": h["image_height"]}),
             ("caption_length.png", "caption length", "words", {"words": h["caption_words"]}),
             ("audio_duration.png", "audio duration", "seconds", {"duration": h["audio_duration"]}))
    for name, title, unit, series in plots:
        if any(s.count for s in series.values()):
            plot_histogram(out / name, title, unit, series)
            written.append(name)
    if tally.languages:
        plot_languages(out / "language.png", tally.languages)
        written.append("language.png")
    return written


def plot_histogram(path: Path, title: str, unit: str, series: dict[str, Histogram]) -> None:
    fig = Figure(figsize=(6, 3.5), layout="constrained")  # no pyplot: no global state, no display needed
    ax = fig.add_subplot()
    lo = min(h.values_and_counts()[0][0] for h in series.values() if h.count)
    hi = max(h.values_and_counts()[0][-1] for h in series.values() if h.count)
    span = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    n_bins = min(50, max(len(h.bins) for h in series.values()))
    for label, hist in series.items():  # the same bins for every series, so they compare bar by bar
        values, counts = hist.values_and_counts()
        ax.hist(values, bins=n_bins, range=span, weights=counts, label=label, alpha=0.6)
    ax.set(title=title, xlabel=unit, ylabel="samples")
    if len(series) > 1:
        ax.legend()
    fig.savefig(path, format="png", dpi=100)


def plot_languages(path: Path, languages: collections.Counter) -> None:
    top = languages.most_common(MAX_LANGUAGES_PLOTTED)
    fig = Figure(figsize=(max(4.0, 0.4 * len(top) + 1), 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar([name for name, _ in top], [n for _, n in top])
    ax.set(title=f"language (top {len(top)} of {len(languages)})", ylabel="samples")
    ax.tick_params(axis="x", labelrotation=60)
    fig.savefig(path, format="png", dpi=100)


PAGE_STYLE = """body{font-family:sans-serif;margin:1em 2em;color:#222}
.sheet{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:200px;border:1px solid #ccc;border-radius:4px;padding:6px;background:#fafafa}
figure img{display:block;width:192px;height:160px;object-fit:contain;image-rendering:pixelated;background:#e8e8e8}
figure audio{width:192px}
figcaption{font-size:13px;overflow-wrap:anywhere}.meta{color:#666;font-size:12px}.bad{color:#b00}
.plots img{max-width:480px;margin:4px}"""


def render_card(pick: dict) -> str:
    """One sample's figure. Every text from the data goes through html.escape: a caption is never markup."""
    e = html.escape
    parts = ["<figure class=\"sample\">"]
    if "image" in pick:
        parts.append(f"<img src=\"{e(pick['image'])}\" alt=\"sample {e(pick['key'])}\" "
                     f"title=\"{pick['width']}x{pick['height']} px\">")
    if "audio" in pick:
        parts.append(f"<audio controls preload=\"none\" src=\"{e(pick['audio'])}\"></audio>")
    text = e(pick["text"]) if pick["text"] is not None else "<span class=\"bad\">(no text)</span>"
    meta = [f"{pick['width']}&times;{pick['height']} px" if "image" in pick else "",
            f"{pick['duration']:.2f} s" if "audio" in pick else "", e(pick["language"] or "")]
    parts.append(f"<figcaption><code>{e(pick['key'])}</code><p class=\"text\">{text}</p>"
                 f"<p class=\"meta\">{' &middot; '.join(m for m in meta if m)}</p></figcaption></figure>")
    return "".join(parts)


def render_page(stats: dict, sheets: list[dict]) -> str:
    e = html.escape
    bad = ", ".join(f"{k}: {n}" for k, n in stats["bad"].items() if n) or "none"
    head = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            # no script of ours runs here: if any markup ever slipped through, it could not run either
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"script-src 'none'; object-src 'none'\">"
            f"<title>shard report: {e(stats['spec'])}</title><style>{PAGE_STYLE}</style></head><body>"
            f"<h1>Shard report</h1><p><code>{e(stats['spec'])}</code></p>"
            f"<p>{stats['samples']} samples in {stats['shards']} shards; {stats['bad_samples']} bad samples; "
            f"bad: {e(bad)}</p><div class=\"plots\">"
            + "".join(f"<img src=\"{e(name)}\" alt=\"{e(name)}\">" for name in stats["histograms"]) + "</div>")
    sections = []
    for sheet in sheets:
        flag = " <span class=\"bad\">(unreadable or cut short)</span>" if sheet["bad_shard"] else ""
        sections.append(f"<section><h2><code>{e(sheet['url'])}</code>{flag}</h2>"
                        f"<p>{sheet['samples']} samples, {sheet['bad_samples']} bad; showing {len(sheet['picked'])}"
                        f"</p><div class=\"sheet\">{''.join(render_card(p) for p in sheet['picked'])}</div></section>")
    return head + "".join(sections) + "</body></html>\n"


# ---------------------------------------------------------------- output folder

def check_output(output: Path) -> None:
    """ReportError unless `output` is new, empty, or an earlier report (so replacing it loses nothing)."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ReportError(f"--output {output} is a file; name a folder for the report")
    if any(output.iterdir()) and not all((output / f).is_file() for f in REPORT_FILES):
        raise ReportError(f"--output {output} holds other files and is not an earlier report (no "
                          f"{' and '.join(REPORT_FILES)}); name a new or empty folder")


def check_not_input(output: Path, urls: list[str]) -> None:
    """ReportError when `output` holds one of the local shards read: publishing the report replaces the folder."""
    url = local_input_inside(output, urls)
    if url is not None:
        raise ReportError(f"--output {output} holds input shard {url}, and the report replaces that folder; "
                          "name another folder")


def publish(tmp: Path, output: Path) -> None:
    """Put the finished report folder `tmp` in the place of `output` (an earlier report goes only then)."""
    if output.exists():
        old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
        os.replace(output, old / "report")
        os.replace(tmp, output)
        shutil.rmtree(old)
    else:
        os.replace(tmp, output)


def inspect_shards(spec: str, output: str | Path, per_shard: int = 8, seed: int = 0) -> dict:
    """Read every shard of `spec` once and write the report folder `output`; returns stats.json's content."""
    if per_shard < 0:
        raise ValueError(f"--per_shard must be >= 0, got {per_shard}")
    urls = [url for source in expand_shard_spec(spec) for url in source.urls]
    output = Path(output).absolute()
    check_output(output)
    check_not_input(output, urls)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        (tmp / "media").mkdir()
        log.info("inspecting %d shards of %s", len(urls), spec)
        tally, sheets = run_pass(urls, per_shard, seed, tmp / "media")
        stats = build_stats(spec, tally, sheets, save_histogram_pngs(tally, tmp))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False))
        picked = [{k: v for k, v in s.items() if k != "picked"} | {"samples_shown": s["picked"]} for s in sheets]
        (tmp / "samples.json").write_text(json.dumps({"spec": spec, "per_shard": per_shard, "seed": seed,
                                                      "shards": picked}, indent=1, ensure_ascii=False))
        (tmp / "index.html").write_text(render_page(stats, sheets), encoding="utf-8")
        publish(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    n_media = sum(len(s["picked"]) for s in sheets)
    for name in ("stats.json", "samples.json", "index.html", *stats["histograms"]):
        log.info("wrote %s", output / name)
    log.info("wrote the media of %d samples to %s", n_media, output / "media")
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", metavar="SHARDS", help="shard spec: path, folder, {000..009} braces, URL, pipe:, ::")
    p.add_argument("--output", required=True, help="the report folder (new, empty, or an earlier report)")
    p.add_argument("--per_shard", type=int, default=8, help="random samples shown per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice of samples")
    args = p.parse_args(argv)
    setup_logging()
    try:
        stats = inspect_shards(args.shards, args.output, args.per_shard, args.seed)
    except (ShardSpecError, ReportError, ValueError) as e:
        sys.exit(f"inspect: {e}")
    bad = {k: n for k, n in stats["bad"].items() if n}
    print(f"{stats['samples']} samples in {stats['shards']} shards, {stats['bad_samples']} bad samples {bad}; "
          f"report: {Path(args.output) / 'index.html'}")


if __name__ == "__main__":
    main()
