"""Balancing: MetaCLIP-style caps hold exactly (checked against a brute-force regex rule on 300 captions), phrase
matching on word boundaries, the any-entry-under-cap rule, language caps on speech samples, and mixing weights
that mm.shards and the CLIP recipe's config parser accept as printed."""
from __future__ import annotations

import random
import re
import shlex

import pytest

from data_tools.curate import balance
from data_tools.curate.balance import BalanceConfig, EntryMatcher, mixing_spec
from data_tools.curate.report import Report
from tests.curate_fixtures import keys, noise_pairs, read_output, read_report, speech, step_report, write_shards


def caption(key: str, text: str) -> dict:
    return {"__key__": key, "txt": text.encode("utf-8"), "png": b"not decoded by balance"}


def run(samples, **cfg) -> tuple[list[dict], Report]:
    report = Report("balance")
    kept = list(balance.apply(samples, BalanceConfig(**cfg), report))
    assert report.n_in == report.n_out + sum(report.drops.values()) == len(samples)
    return kept, report


def test_phrases_match_whole_words_case_insensitively():
    m = EntryMatcher(["red", "red circle", "New York", "c3po"])
    assert m.match("A RED circle!") == ["red", "red circle"]
    assert m.match("reddish circles") == []
    assert m.match("from new-york, with a red") == ["New York", "red"]
    assert m.match("c3po and red and red") == ["c3po", "red"]  # each entry once
    assert m.match("") == []
    with pytest.raises(ValueError, match="has no words"):
        EntryMatcher(["+++"])
    with pytest.raises(ValueError, match="no entries"):
        EntryMatcher([])


def test_a_sample_is_kept_while_any_of_its_entries_is_under_cap():
    samples = [caption("1", "a red square"), caption("2", "red again"), caption("3", "red circle"),
               caption("4", "a blue red"), caption("5", "blue sky"), caption("6", "just blue"), caption("7", "a tree")]
    kept, report = run(samples, entries=["red", "blue"], cap=2)
    # red admits 1, 2; 3 is red only (red full); 4 is red+blue: blue is open, so kept (blue 1); 5: blue 2; 6: blue full
    assert keys(kept) == ["1", "2", "4", "5", "7"]
    assert report.drops == {"over_cap": 2}
    d = report.to_dict()
    assert d["examples"]["over_cap"][0] == {"key": "3", "url": None, "detail": "red: all at cap 2"}
    assert d["stats"]["top_entries"] == {"blue": 2, "red": 2} and d["stats"]["unmatched"] == 1
    kept, report = run(samples, entries=["red", "blue"], cap=2, keep_unmatched=False)
    assert keys(kept) == ["1", "2", "4", "5"] and report.drops == {"over_cap": 2, "no_entry": 1}


def reference_keep(texts: list[str], entries: list[str], cap: int) -> tuple[list[int], dict[str, int]]:
    """The rule written the slow way, with regexes: (which samples are kept, how many each entry admitted)."""
    patterns = {e: re.compile(r"(?<!\w)" + r"\W+".join(map(re.escape, e.split())) + r"(?!\w)", re.I) for e in entries}
    admitted, kept = dict.fromkeys(entries, 0), []
    for i, text in enumerate(texts):
        matched = [e for e, p in patterns.items() if p.search(text)]
        open_ = [e for e in matched if admitted[e] < cap]
        if open_ or not matched:
            kept.append(i)
        for e in open_:
            admitted[e] += 1
    return kept, admitted


def test_caps_hold_exactly_against_the_brute_force_rule():
    rng = random.Random(0)
    vocab = ["red", "green", "blue", "circle", "square", "big", "small", "on", "a", "the", "reddish", "bluebird"]
    entries = ["red", "blue", "red circle", "big square", "small", "green blue"]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6))) for _ in range(300)]
    kept, report = run([caption(f"{i:04d}", t) for i, t in enumerate(texts)], entries=entries, cap=7)
    expected, admitted = reference_keep(texts, entries, 7)
    assert [int(k) for k in keys(kept)] == expected
    assert report.drops["over_cap"] == 300 - len(expected) > 100
    stats = report.to_dict()["stats"]
    assert stats["top_entries"] == {e: n for e, n in admitted.items() if n} and max(admitted.values()) == 7


def test_entries_file_joins_the_list_and_missing_files_are_named(tmp_path):
    (tmp_path / "entries.txt").write_text("# MetaCLIP-style entries\nblue\n\n  red circle  \n")
    kept, _ = run([caption("1", "blue"), caption("2", "blue"), caption("3", "red circle"), caption("4", "green"),
                   caption("5", "green")], entries=["green"], entries_file=str(tmp_path / "entries.txt"), cap=1)
    assert keys(kept) == ["1", "3", "4"]
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        run([caption("1", "x")], entries_file=str(tmp_path / "nope.txt"))


def test_language_caps_on_speech_samples_and_corrupt_json_counted():
    samples = [speech(f"{i:02d}", b"audio not decoded", f"utterance {i}", lang) for i, lang in
               enumerate(["en", "ru", "en", "EN", "el", "ru", "en", "el"])]
    samples.append({"__key__": "no-json", "flac": b"x"})
    samples.append({"__key__": "bad-json", "flac": b"x", "json": b"{not json"})
    kept, report = run(samples, by="language", cap=2)
    assert keys(kept) == ["00", "01", "02", "04", "05", "07", "no-json"]
    assert report.drops == {"over_cap": 2, "corrupt": 1}
    kept, _ = run(samples[:8], by="language", entries=["en"], cap=1)  # only English is capped
    assert keys(kept) == ["00", "01", "04", "05", "07"]


def test_command_line_writes_capped_shards_and_stats(tmp_path):
    samples = noise_pairs(12)
    for i, s in enumerate(samples):
        s["txt"] = ["a red thing", "a blue thing", "a thing"][i % 3].encode()
    write_shards(tmp_path / "in", samples, per_shard=5)
    assert balance.main([str(tmp_path / "in"), f"--output={tmp_path / 'out'}", "--entries=red,blue", "--cap=2"]) == 0
    assert keys(read_output(tmp_path / "out")) == ["000000", "000001", "000002", "000003", "000004", "000005",
                                                   "000008", "000011"]
    step = step_report(read_report(tmp_path / "out"), "balance")
    assert (step["n_in"], step["n_out"], step["drops"]) == (12, 8, {"over_cap": 4})
    assert step["stats"]["top_entries"] == {"blue": 2, "red": 2}


# ---------------------------------------------------------------- mixing

def test_printed_mix_is_accepted_by_mm_shards_and_the_clip_recipe(tmp_path, capsys):
    from mm.config import parse_config
    from mm.shards import expand_shard_spec
    from tests.helpers import ROOT, load_recipe

    web = write_shards(tmp_path / "web", noise_pairs(4), per_shard=2)
    books = write_shards(tmp_path / "books", noise_pairs(2, seed=1), per_shard=2)
    assert balance.main(["--mix", f"{tmp_path / 'web'}=0.7", f"{tmp_path / 'books'}=0.3", "--epoch_samples=500"]) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("recipe arguments: ")]
    args = shlex.split(line.removeprefix("recipe arguments: "))
    assert f"train_data: {tmp_path / 'web'}::{tmp_path / 'books'}" in out

    recipe = load_recipe("clip")
    cfg = parse_config(recipe.CLIPConfig, args, preset_dir=ROOT / "recipes" / "clip" / "configs")
    recipe.check_config(cfg)
    assert (cfg.train_weights, cfg.resampled, cfg.epoch_samples) == ([0.7, 0.3], True, 500)
    sources = expand_shard_spec(cfg.train_data, cfg.train_weights)
    assert [(sorted(s.urls), s.weight) for s in sources] == [(sorted(map(str, web)), 0.7), (list(map(str, books)), 0.3)]


def test_bad_mixes_are_refused_with_what_is_wrong(tmp_path, capsys):
    write_shards(tmp_path / "a", noise_pairs(2), per_shard=2)
    a = str(tmp_path / "a")
    for argv, words in [([f"{a}=0.5"], "--epoch_samples=N is required"),
                        ([f"{a}=heavy", "--epoch_samples=9"], "is not a number"),
                        ([f"{a}=-1", "--epoch_samples=9"], "weight must be a positive number"),
                        ([f"{tmp_path / 'missing'}=1", "--epoch_samples=9"], "shards missing or empty"),
                        (["justapath", "--epoch_samples=9"], "expected SPEC=WEIGHT")]:
        assert balance.main(["--mix", *argv]) == 2
        assert words in capsys.readouterr().err
    with pytest.raises(ValueError, match="one source per entry"):
        mixing_spec({f"{a}::{a}": 1.0}, 10)
    spec, args = mixing_spec({a: 2, f"{tmp_path}/a/shard-{{000000..000000}}.tar": 1}, 10)
    assert args[1] == "--train_weights=2.0,1.0" and spec.count("::") == 1
