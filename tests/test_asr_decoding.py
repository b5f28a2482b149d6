"""mm.asr.decode and mm.asr.logit_filters: the filters on crafted logits, ranking, option checks, and decode()
token for token against openai-whisper's whisper.decoding.decode on the same weights (a tiny model trained
for the session, see tests/asr_fixtures.py), greedy, sampled and beam search."""
from types import SimpleNamespace

import pytest
import torch

from mm.asr import decode as D
from mm.asr.logit_filters import (apply_timestamp_rules, build_logit_filters, non_speech_tokens, suppress_blank,
                                  suppress_token_ids)
from tests.asr_fixtures import trained_run, training_clips, use_our_tokenizer_in_openai  # noqa: F401 - a fixture
from tests.helpers import one_torch_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NEG = float("-inf")

# A toy vocabulary for the filters: text 0..19, eot 20, other specials 21..24 (24: notimestamps), timestamps
# 25..39 (<|0.00|> .. <|0.28|>).
TOY = SimpleNamespace(eot=20, no_timestamps=24, timestamp_begin=25, vocab=40)


def rules(logits, tokens, sample_begin=2, max_initial=None):
    apply_timestamp_rules(logits, tokens, sample_begin, TOY.timestamp_begin, TOY.eot, TOY.no_timestamps, max_initial)
    return logits


def allowed(logits) -> set[int]:
    return {i for i, v in enumerate(logits.tolist()) if v != NEG}


def ts(i):
    return TOY.timestamp_begin + i


# ---------------------------------------------------------------- timestamp rules

def test_first_token_is_a_timestamp_no_later_than_max_initial():
    prompt = torch.tensor([[21, 22]])  # sample_begin = 2: nothing sampled yet
    got = allowed(rules(torch.zeros(1, TOY.vocab), prompt, max_initial=3)[0])
    assert got == {ts(0), ts(1), ts(2), ts(3)}
    assert allowed(rules(torch.zeros(1, TOY.vocab), prompt)[0]) == set(range(ts(0), TOY.vocab))


def test_timestamps_come_in_pairs_and_never_go_back():
    rows = torch.tensor([[21, 22, ts(1), 5, 6, ts(4)],  # text then one timestamp: the segment's end
                         [21, 22, ts(1), 5, ts(4), ts(4)],  # a closed pair: text must follow
                         [21, 22, 21, ts(1), 5, 6]])  # text after a start: text, eot or a later timestamp
    logits = torch.zeros(3, TOY.vocab)
    logits[:, :TOY.timestamp_begin] = 5.0  # text likely enough that no timestamp is forced (tested below)
    out = rules(logits, rows)
    # after a lone end: the next start (which may repeat the end) or eot, never text nor an earlier time
    assert allowed(out[0]) == {TOY.eot, 21, 22, 23} | set(range(ts(4), TOY.vocab))
    assert allowed(out[1]) == set(range(TOY.timestamp_begin)) - {TOY.no_timestamps}
    # after text: any text, and timestamps strictly after the start (a segment has a length)
    assert allowed(out[2]) == set(range(24)) | set(range(ts(2), TOY.vocab))
    assert TOY.no_timestamps not in allowed(out[0]) | allowed(out[1]) | allowed(out[2])


def test_a_timestamp_is_forced_when_all_timestamps_together_outweigh_the_best_text_token():
    rows = torch.tensor([[21, 22, ts(0), 5], [21, 22, ts(0), 5]])  # 14 timestamps allowed, each of logit 0
    logits = torch.zeros(2, TOY.vocab)
    logits[0, 7], logits[1, 7] = 2.0, 3.0  # text 7: e^2 = 7.4 < 14, but e^3 = 20 > 14
    out = rules(logits, rows)
    assert allowed(out[0]) == set(range(ts(1), TOY.vocab))  # only timestamps
    assert 7 in allowed(out[1]) and ts(1) in allowed(out[1])


def test_timestamp_rules_equal_openai_on_random_histories():
    from whisper.decoding import ApplyTimestampRules

    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = trial % 7
        sampled = torch.randint(0, TOY.vocab, (16, n), generator=generator)
        sampled[sampled == TOY.no_timestamps] = 3
        tokens = torch.cat([torch.full((16, 3), 21), sampled], dim=1)
        logits = torch.randn(16, TOY.vocab, generator=generator) * 3
        max_initial = [None, 4][trial % 2]
        want = logits.clone()
        ApplyTimestampRules(TOY, 3, max_initial).apply(want, tokens)
        got = logits.clone()
        apply_timestamp_rules(got, tokens, 3, TOY.timestamp_begin, TOY.eot, TOY.no_timestamps, max_initial)
        assert torch.equal(got, want), trial


# ---------------------------------------------------------------- suppression

def test_non_speech_tokens_equal_openai_for_its_own_vocabulary():
    from pathlib import Path

    import whisper
    from whisper.tokenizer import get_tokenizer

    from mm.asr.tokenizer import tokenizer_from_tiktoken

    ours = tokenizer_from_tiktoken(Path(whisper.__file__).parent / "assets" / "multilingual.tiktoken")
    assert tuple(non_speech_tokens(ours)) == get_tokenizer(True).non_speech_tokens


def test_non_speech_tokens_of_a_small_bpe_hold_symbols_only(trained_run):
    from mm.asr.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(trained_run / "tokenizer")
    ids = non_speech_tokens(tokenizer)
    texts = [tokenizer.decode([i]) for i in ids]
    assert tokenizer.encode("(")[0] in ids and tokenizer.encode("~")[0] in ids  # bytes: a token each
    assert not any(c.isalnum() for t in texts for c in t), texts
    # " -" is two tokens here: its first, a lone space, begins most words of this BPE
    assert len(tokenizer.encode(" -")) == 2 and tokenizer.encode(" ")[0] not in ids
    assert tokenizer.encode(".")[0] not in ids  # basic punctuation stays


def test_suppress_token_ids_parse_and_add_the_specials(trained_run):
    from mm.asr.tokenizer import load_tokenizer

    tok = load_tokenizer(trained_run / "tokenizer")
    specials = {tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech}
    assert set(suppress_token_ids(tok, "-1")) == specials | set(non_speech_tokens(tok))
    assert set(suppress_token_ids(tok, "5, 7")) == specials | {5, 7}
    assert set(suppress_token_ids(tok, [-1, 9])) == specials | set(non_speech_tokens(tok)) | {9}
    with pytest.raises(ValueError, match="outside the vocabulary"):
        suppress_token_ids(tok, [tok.vocab_size])
    assert len(build_logit_filters(tok, 3, suppress="", blank=False, timestamps=False)) == 0


def test_suppress_blank_acts_on_the_first_sampled_position_only():
    logits = torch.zeros(2, TOY.vocab)
    suppress_blank(logits, torch.zeros(2, 3, dtype=torch.long), 3, [4, TOY.eot])
    assert allowed(logits[0]) == set(range(TOY.vocab)) - {4, TOY.eot}
    logits = torch.zeros(2, TOY.vocab)
    suppress_blank(logits, torch.zeros(2, 4, dtype=torch.long), 3, [4, TOY.eot])
    assert allowed(logits[0]) == set(range(TOY.vocab))


# ---------------------------------------------------------------- ranking, options, compression

def test_rank_candidates_length_normalisation_and_penalty():
    long, short = (list(range(10)), -5.0), ([1], -0.8)
    assert D.rank_candidates([long, short], None) == 0  # -0.5 per token beats -0.8
    assert D.rank_candidates([long, short], 0.0) == 1  # alpha 0: raw sums, -0.8 beats -5
    # alpha 1: -5 / 2.5 = -2 vs -0.8 / 1 = -0.8
    assert D.rank_candidates([long, short], 1.0) == 1
    assert D.rank_candidates([([1, 2], -1.0), ([3, 4], -1.0)], None) == 0  # ties: the first
    assert D.rank_candidates([([], -0.1), ([1], -0.5)], None) == 0  # empty: no division by zero


def test_check_options_refuses_what_whisper_refuses(trained_run):
    from mm.asr.tokenizer import load_tokenizer, train_bpe

    tok = load_tokenizer(trained_run / "tokenizer")
    bad = [dict(beam_size=2, best_of=2, temperature=0.5), dict(best_of=3), dict(patience=2.0),
           dict(length_penalty=1.5), dict(task="summarise"), dict(beam_size=0), dict(beam_size=2, patience=0.1),
           dict(temperature=-0.5), dict(temperature=float("nan")), dict(temperature=float("inf"))]
    for options in bad:
        with pytest.raises(ValueError):
            D.check_options(D.DecodingOptions(**options), tok)
    D.check_options(D.DecodingOptions(task="translate", beam_size=2, patience=0.5), tok)
    english_only = train_bpe(["one two three"], 260, languages=[])
    with pytest.raises(ValueError, match="cannot translate"):
        D.check_options(D.DecodingOptions(task="translate"), english_only)
    with pytest.raises(ValueError, match=r"unknown language 'xx'.*en"):
        D.resolve_language(tok, "xx")
    assert D.resolve_language(tok, "Russian") == "ru" and D.resolve_language(tok, None) is None


def test_compression_ratio_flags_repetition():
    assert D.compression_ratio("the cat sat on the mat") < 1.5
    assert D.compression_ratio("the cat " * 40) > 2.4


# ---------------------------------------------------------------- decode against openai-whisper

@pytest.fixture(scope="module")
def models(trained_run):
    """(ours, openai-whisper's, tokenizer, mel [4, 80, 3000] of four training clips padded to 30 s)."""
    import whisper

    from mm.asr.convert import load_whisper
    from mm.asr.features import N_SAMPLES, log_mel_spectrogram, pad_or_trim
    from mm.asr.tokenizer import load_tokenizer

    ours, _ = load_whisper(trained_run / "export" / "whisper.pt")
    theirs = whisper.load_model(str(trained_run / "export" / "whisper.pt"), device="cpu")
    clips = training_clips(trained_run)
    picked = [clips[0][0], clips[1][0], clips[2][0], clips[6][0]]  # en, ru, el (with segments), en (segments)
    mel = torch.stack([log_mel_spectrogram(pad_or_trim(torch.from_numpy(a), N_SAMPLES)) for a in picked])
    return ours, theirs, load_tokenizer(trained_run / "tokenizer"), mel


def assert_same(got: list, want: list, language_given: bool = False):
    """openai's results carry language_probs only for its lang_id task; ours whenever it detected."""
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.language for g in got] == [w.language for w in want]
    for g, w in zip(got, want):
        assert g.text == w.text and g.temperature == w.temperature
        assert g.avg_logprob == pytest.approx(w.avg_logprob, abs=1e-4)
        assert g.no_speech_prob == pytest.approx(w.no_speech_prob, abs=1e-5)
        assert g.compression_ratio == pytest.approx(w.compression_ratio)
        if language_given:
            assert g.language_probs is None
        else:
            assert max(g.language_probs, key=g.language_probs.get) == g.language


@pytest.mark.parametrize("options", [
    dict(without_timestamps=True), dict(), dict(language="en"), dict(language="ru", without_timestamps=True),
    dict(prompt="vales heads colored", language="en"), dict(prefix="mansards", language="en"),
    dict(sample_len=7), dict(max_initial_timestamp=None, suppress_blank=False, suppress_tokens="")],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_greedy_decode_equals_openai_token_for_token(models, monkeypatch, options):
    import whisper.decoding

    ours, theirs, tok, mel = models
    use_our_tokenizer_in_openai(monkeypatch, tok)
    want = whisper.decoding.decode(theirs, mel, whisper.decoding.DecodingOptions(fp16=False, **options))
    got = D.decode(ours, tok, mel, D.DecodingOptions(**options))
    assert_same(got, want, "language" in options)
    assert len({tuple(g.tokens) for g in got}) > 1  # not one output for every input


@pytest.mark.parametrize("options", [
    dict(beam_size=3), dict(beam_size=3, without_timestamps=True, language="en"),
    dict(beam_size=4, patience=2.0, length_penalty=0.5), dict(beam_size=5, patience=0.5),
    dict(beam_size=2, prefix="mansards", language="en")],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_beam_search_equals_openai(models, monkeypatch, options):
    """openai-whisper's batched beam search fails on this version (audio features not repeated per beam), so
    its side decodes one window at a time; ours decodes the batch."""
    import whisper.decoding

    ours, theirs, tok, mel = models
    use_our_tokenizer_in_openai(monkeypatch, tok)
    want = [whisper.decoding.decode(theirs, m, whisper.decoding.DecodingOptions(fp16=False, **options)) for m in mel]
    assert_same(D.decode(ours, tok, mel, D.DecodingOptions(**options)), want, "language" in options)


def test_sampling_equals_openai_with_the_same_seed(models, monkeypatch):
    """One window, one sample: both draw from torch's RNG in the same order. (With best_of, openai keeps
    drawing for finished rows, we don't: the draws part ways.)"""
    import whisper.decoding

    ours, theirs, tok, mel = models
    use_our_tokenizer_in_openai(monkeypatch, tok)
    for seed, m in enumerate(mel):
        torch.manual_seed(seed)
        want = whisper.decoding.decode(theirs, m[None], whisper.decoding.DecodingOptions(fp16=False, temperature=0.8))
        torch.manual_seed(seed)
        assert_same(D.decode(ours, tok, m[None], D.DecodingOptions(temperature=0.8)), want)


def test_best_of_keeps_the_likeliest_sample(models, monkeypatch):
    ours, _, tok, mel = models
    seen = []
    rank = D.rank_candidates
    monkeypatch.setattr(D, "rank_candidates", lambda c, alpha: seen.append(c) or rank(c, alpha))
    torch.manual_seed(0)
    results = D.decode(ours, tok, mel[:2], D.DecodingOptions(temperature=1.0, best_of=4))
    assert [len(c) for c in seen] == [4, 4] and len({tuple(t) for t, _ in seen[0]}) > 1
    for result, candidates in zip(results, seen):
        best = max(candidates, key=lambda c: c[1] / max(len(c[0]), 1))
        assert result.tokens == best[0] and result.avg_logprob == pytest.approx(best[1] / (len(best[0]) + 1))
        assert result.temperature == 1.0


def test_beam_of_one_is_greedy(models):
    ours, _, tok, mel = models
    for options in (dict(), dict(without_timestamps=True)):
        greedy = D.decode(ours, tok, mel, D.DecodingOptions(**options))
        beam = D.decode(ours, tok, mel, D.DecodingOptions(beam_size=1, **options))
        assert [b.tokens for b in beam] == [g.tokens for g in greedy]
        assert [b.avg_logprob for b in beam] == pytest.approx([g.avg_logprob for g in greedy], abs=1e-5)


def test_more_patience_never_ranks_worse(models):
    """With patience p the search collects round(beam * p) finished candidates before stopping; a larger p
    continues the same search, so its candidates include the smaller one's and its best scores no lower."""
    ours, _, tok, mel = models

    def score(result, alpha):  # the ranker's: the sum of log probabilities over a length term
        n = len(result.tokens)
        return result.avg_logprob * (n + 1) / (max(n, 1) if alpha is None else ((5 + n) / 6) ** alpha)

    for alpha in (None, 1.0):
        short = D.decode(ours, tok, mel, D.DecodingOptions(beam_size=3, patience=1.0, length_penalty=alpha))
        long = D.decode(ours, tok, mel, D.DecodingOptions(beam_size=3, patience=3.0, length_penalty=alpha))
        for s, lg in zip(short, long):
            assert score(lg, alpha) >= score(s, alpha) - 1e-5


def test_rows_with_their_own_prompts_and_languages_equal_each_decoded_alone(models):
    """Prompts of different lengths are left-padded: each row must still decode as it would alone."""
    ours, _, tok, mel = models
    prompts = [None, "sleepy vales", tok.encode(" mansards midyear aiming colored blossoms"), "x"]
    languages = ["en", None, "el", "ru"]
    for options in (D.DecodingOptions(), D.DecodingOptions(beam_size=2, without_timestamps=True)):
        together = D.decode(ours, tok, mel, options, prompts=prompts, languages=languages)
        for i in range(4):
            alone = D.decode(ours, tok, mel[i:i + 1], options, prompts=prompts[i:i + 1], languages=languages[i:i + 1])
            assert together[i].tokens == alone[0].tokens and together[i].language == alone[0].language
            assert together[i].avg_logprob == pytest.approx(alone[0].avg_logprob, abs=1e-4)
    with pytest.raises(ValueError, match="4 windows"):
        D.decode(ours, tok, mel, prompts=prompts[:2])


def test_decode_of_unpadded_clips_writes_their_text(models, trained_run):
    """The model was trained on unpadded clips: told their lengths (mel_lengths), it transcribes them. Its
    small BPE often writes a word's leading space as a token of its own, so the transcripts begin with the
    blank that suppress_blank forbids (Whisper's vocabulary merges the space into the word): off here."""
    from mm.asr.features import log_mel_spectrogram

    ours, _, tok, _ = models
    clips = training_clips(trained_run)[:12]
    mels = [log_mel_spectrogram(torch.from_numpy(a)) for a, _ in clips]
    lengths = torch.tensor([m.shape[-1] for m in mels])
    mel = torch.stack([torch.nn.functional.pad(m, (0, int(lengths.max()) - m.shape[-1])) for m in mels])
    options = D.DecodingOptions(without_timestamps=True, suppress_blank=False)
    results = D.decode(ours, tok, mel, options, mel_lengths=lengths)
    right = sum(r.text == meta["text"] for r, (_, meta) in zip(results, clips))
    assert right >= 10, [(r.text, meta["text"]) for r, (_, meta) in zip(results, clips)]
    assert [r.language for r in results] == [meta["language"] for _, meta in clips]
    assert all(r.language_probs[r.language] > 0.5 for r in results)
    assert any(r.tokens[0] == tok.encode(" ")[0] for r in results)
    blank_suppressed = D.decode(ours, tok, mel, D.DecodingOptions(without_timestamps=True), mel_lengths=lengths)
    assert not any(r.tokens[:1] == tok.encode(" ") for r in blank_suppressed)
