"""Balancing: MetaCLIP-style caps per entry or per language, and source weights for mixing.

    python -m data_tools.curate.balance raw/ --output=balanced/ --entries_file=entries.txt --cap=20000
    python -m data_tools.curate.balance asr/ --output=balanced/ --by=language --cap=5000
    python -m data_tools.curate.balance --mix data/web=0.7 data/books=0.3 --epoch_samples=100000

Caps (MetaCLIP, Xu et al. 2023): a caption or transcript matches an entry when the entry's words occur in it
as a phrase: case-insensitive, on word boundaries ("red circle" matches "A RED circle!" but not "reddish
circles"; words are runs of letters, digits and _, so "new-york" matches the entry "new york"). Each entry
admits at most `cap` samples. MetaCLIP's rule is probabilistic: a sample is drawn with probability
cap / count(entry) for its rarest entry, which needs the counts of the whole pool first. Here is the
deterministic streaming variant, in one pass: first come, first kept. A sample is kept when ANY of its
entries has admitted fewer than `cap` samples so far (a tail entry brings its samples in even when they also
name a head entry), and it then counts against each of its entries still under cap, so no entry ever admits
more than `cap`. With `by: language` the entry is the sample's json "language" (ASR shards): each language
admits at most `cap` samples (all languages, or only those listed in `entries`).

Memory: one counter per entry, whatever the number of samples.

Reason codes: `over_cap` (detail: the sample's entries, all at their cap), `no_entry` (matches none, with
keep_unmatched=false), `corrupt` (text or json that does not decode).

Mixing (`mixing_spec`, `--mix`): several shard sources with weights, written as what recipes/clip/train.py
(and the other recipes, through mm.shards) accepts: the sources joined by `::` as --train_data, one weight
per source as --train_weights, which needs --resampled=true and --epoch_samples (a resampled stream is
endless; the epoch length is where a resumed run restarts). A spec has no inline weights, so they are args.
"""
from __future__ import annotations

import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

from data_tools.curate.report import Report

OVER_CAP, NO_ENTRY = "over_cap", "no_entry"
WORD = re.compile(r"\w+")
TOP_ENTRIES = 20  # entries listed in the report, by samples admitted


@dataclass
class BalanceConfig:
    by: Literal["entry", "language"] = "entry"  # entry: match the caption/transcript; language: the json "language"
    entries: list[str] = field(default_factory=list)  # entries (a YAML list, or comma-separated on the command line)
    entries_file: str = ""  # a file of entries, one per line (blank lines and lines starting with # skipped)
    cap: int = 1000  # samples each entry (or language) admits at most (MetaCLIP: 20000 for 400M pairs)
    keep_unmatched: bool = True  # keep samples that match no entry (or have no language)


def words(text: str) -> tuple[str, ...]:
    return tuple(WORD.findall(text.casefold()))


class EntryMatcher:
    """Finds which entries a text contains as whole-word phrases, by looking up each of its word n-grams (up to
    the longest entry's length) in a dict: linear in the text's length, whatever the number of entries."""

    def __init__(self, entries: Iterable[str]):
        self.names: dict[tuple[str, ...], str] = {}
        for entry in entries:
            key = words(entry)
            if not key:
                raise ValueError(f"entry {entry!r} has no words to match (entries match on letters and digits)")
            self.names.setdefault(key, entry.strip())
        if not self.names:
            raise ValueError("no entries: give entries (a list) or entries_file (one entry per line)")
        self.max_words = max(len(k) for k in self.names)

    def match(self, text: str) -> list[str]:
        """The entries `text` contains, each once, in order of first occurrence."""
        ws, found = words(text), {}
        for i in range(len(ws)):
            for n in range(1, min(self.max_words, len(ws) - i) + 1):
                name = self.names.get(ws[i:i + n])
                if name is not None:
                    found.setdefault(name, None)
        return list(found)


class LanguageMatcher:
    """by=language: a sample's entry is its language code; with `entries`, only the languages listed count."""

    def __init__(self, entries: Iterable[str]):
        self.languages = {e.strip().casefold() for e in entries if e.strip()}

    def match(self, language: str) -> list[str]:
        return [language] if language and (not self.languages or language in self.languages) else []


def load_entries(cfg: BalanceConfig) -> list[str]:
    """`entries` plus the lines of `entries_file`."""
    entries = list(cfg.entries)
    if cfg.entries_file:
        path = Path(cfg.entries_file)
        if not path.is_file():
            raise FileNotFoundError(f"entries_file={path}: no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
        entries += [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]
    return entries


def check_config(cfg: BalanceConfig) -> None:
    """ValueError (FileNotFoundError for a missing entries_file) before any data is read."""
    if cfg.cap < 0:
        raise ValueError(f"cap must be >= 0, got {cfg.cap}")
    if cfg.entries_file and not Path(cfg.entries_file).is_file():
        raise FileNotFoundError(f"entries_file={cfg.entries_file}: no such file")
    if cfg.by == "entry" and not (cfg.entries or cfg.entries_file):
        raise ValueError("by=entry needs entries (a list) or entries_file (one entry per line)")


def apply(samples: Iterable[dict], cfg: BalanceConfig, report: Report) -> Iterator[dict]:
    """Keep a sample while one of its entries is under its cap; see the module doc for the rule."""
    check_config(cfg)
    entries = load_entries(cfg)
    find = EntryMatcher(entries).match if cfg.by == "entry" else LanguageMatcher(entries).match
    admitted: dict[str, int] = {}
    n_unmatched = 0
    for sample in samples:
        report.seen()
        try:
            matched = find(sample_key_text(sample, cfg.by))
        except ValueError as e:
            report.corrupt(sample.get("__key__") or "?", e)
            continue
        if not matched:
            n_unmatched += 1
            if cfg.keep_unmatched:
                report.keep(sample)
                yield sample
            else:
                report.drop(sample, NO_ENTRY, f"matches none of the {cfg.by} entries")
            continue
        open_ = [e for e in matched if admitted.get(e, 0) < cfg.cap]
        if open_:
            for e in open_:
                admitted[e] = admitted.get(e, 0) + 1
            report.keep(sample)
            yield sample
        else:
            report.drop(sample, OVER_CAP, f"{', '.join(matched)}: all at cap {cfg.cap}")
    report.stats.update(entry_stats(admitted, cfg.cap, n_unmatched))


def sample_key_text(sample: dict, by: str) -> str:
    """What a sample is matched on: its caption or transcript (by=entry), or its json "language" (by=language),
    "" when it has none. ValueError for text or json that does not decode."""
    from data_tools.curate.io import sample_json, sample_text

    if by == "entry":
        return sample_text(sample) or ""
    meta = sample_json(sample) or {}
    language = meta.get("language")
    return language.strip().casefold() if isinstance(language, str) else ""


def entry_stats(admitted: dict[str, int], cap: int, n_unmatched: int) -> dict:
    top = sorted(admitted.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ENTRIES]
    return {"cap": cap, "entries_matched": len(admitted), "entries_at_cap": sum(v >= cap for v in admitted.values()),
            "unmatched": n_unmatched, "top_entries": dict(top)}


# ---------------------------------------------------------------- mixing

def mixing_spec(sources: dict[str, float], epoch_samples: int) -> tuple[str, list[str]]:
    """(the `::`-joined shard spec, the recipe arguments that give each source its weight).

    sources: shard spec (folder, path, brace pattern, URL) -> weight (> 0; relative, they need not sum to 1).
    epoch_samples: samples per epoch of the resampled stream. Raises ValueError (a ShardSpecError for sources
    that name no shards) so that what is printed is known to be accepted by mm.shards.expand_shard_spec."""
    from mm.shards import expand_shard_spec

    if not sources:
        raise ValueError("no sources to mix: give SPEC=WEIGHT pairs")
    for spec, weight in sources.items():
        if "::" in spec or not spec.strip():
            raise ValueError(f"source {spec!r}: one source per entry (the sources are joined by '::' here)")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"source {spec}: weight must be a positive number, got {weight}")
    if epoch_samples < 1:
        raise ValueError(f"epoch_samples must be >= 1 (a resampled stream needs an epoch length), got {epoch_samples}")
    spec, weights = "::".join(sources), [float(w) for w in sources.values()]
    expand_shard_spec(spec, weights)
    args = [f"--train_data={spec}", f"--train_weights={','.join(repr(w) for w in weights)}", "--resampled=true",
            f"--epoch_samples={epoch_samples}"]
    return spec, args


def parse_mix_args(argv: list[str]) -> tuple[dict[str, float], int]:
    """`--mix SPEC=W [SPEC=W ...] --epoch_samples=N` -> ({spec: weight}, N)."""
    sources, epoch_samples = {}, 0
    items = iter(argv[1:])
    for item in items:
        if item.startswith("--epoch_samples"):
            value = item.split("=", 1)[1] if "=" in item else next(items, "")
            try:
                epoch_samples = int(value)
            except ValueError:
                raise ValueError(f"--epoch_samples: expected an integer, got {value!r}") from None
            continue
        spec, sep, weight = item.rpartition("=")
        if not sep or not spec:
            raise ValueError(f"{item!r}: expected SPEC=WEIGHT, e.g. data/web=0.7")
        try:
            sources[spec] = float(weight)
        except ValueError:
            raise ValueError(f"{item!r}: the weight {weight!r} is not a number") from None
    if not epoch_samples:
        raise ValueError("--epoch_samples=N is required with --mix: the samples per epoch of the resampled stream")
    return sources, epoch_samples


MIX_USAGE = ("Usage: python -m data_tools.curate.balance --mix SPEC=WEIGHT [SPEC=WEIGHT ...] --epoch_samples=N\n"
             "Prints the train_data spec and the recipe arguments that draw from each source by its weight.")


def main_mix(argv: list[str]) -> int:
    try:
        sources, epoch_samples = parse_mix_args(argv)
        spec, args = mixing_spec(sources, epoch_samples)
    except ValueError as e:
        print(f"balance --mix: {e}\n{MIX_USAGE}", file=sys.stderr)
        return 2
    print(f"train_data: {spec}")
    print(f"train_weights: {args[1].split('=', 1)[1]}")
    print("recipe arguments:", " ".join(shlex.quote(a) for a in args))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--mix":
        if len(argv) == 1 or "--help" in argv:
            print(MIX_USAGE)
            return 0 if "--help" in argv else 2
        return main_mix(argv)
    from data_tools.curate.cli import run_tool
    status = run_tool("balance", apply, BalanceConfig, argv, check=check_config)
    if not argv or "--help" in argv or "-h" in argv:
        print(f"\nMixing sources instead:\n{MIX_USAGE}")
    return status


if __name__ == "__main__":
    sys.exit(main())
