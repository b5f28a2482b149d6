"""mm/asr/metrics.py (Whisper's normalisers, WER/CER per language, the table) and mm/asr/evaluate.py (held-out
decoding that produces them), the latter on a randomly initialised cpu_tiny model over the tiny espeak corpus."""
import json

import pytest
import torch

import mm.asr.evaluate as evaluate
from mm.asr.data import asr_collate, asr_decoder, read_transcripts
from mm.asr.decode import detect_language
from mm.asr.metrics import asr_scores, error_rates, format_scores, normalize_text
from mm.asr.model import Whisper, dims_for
from mm.asr.tokenizer import train_bpe
from mm.shards import iterate_eval_batches
from tests.helpers import one_torch_thread, tiny_asr_corpus  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- normalisation

@pytest.mark.parametrize("text, language, normalised", [
    ("Twenty-five colours, please!", "en", "25 colors please"),  # numbers as digits, American spelling
    ("Mr. Smith analysed it", "en", "mister smith analyzed it"),
    ("I'm   the 1st.", "en", "i am the 1st"),
    ("Twenty-five colours, please!", "fr", "twenty five colours please"),  # English rules for English only
    ("Привет, МИР! Ёлка.", "ru", "привет мир ёлка"),  # Cyrillic kept, lowercased
    ("Γειά σου, Κόσμε; Άλφα", "el", "γειά σου κόσμε άλφα"),  # Greek kept, its accents too
    ("Héllo   wörld,  ça va?", "de", "héllo wörld ça va"),  # Latin diacritics kept
])
def test_normalize_text(text, language, normalised):
    assert normalize_text(text, language) == normalised


# ---------------------------------------------------------------- error rates

def test_error_rates_are_corpus_level():
    assert error_rates(["the cat sat"], ["the cat sit"]) == pytest.approx((1 / 3, 1 / 11))  # spaces are characters
    # 2 word errors in 6 words (a per-utterance mean would be 0.5); 3 character edits in 7 + 3 characters
    assert error_rates(["a b c d", "e f"], ["a b c d", "x"]) == pytest.approx((2 / 6, 3 / 10))
    assert error_rates(["same words"], ["same words"]) == (0.0, 0.0)


def test_an_empty_reference_counts_its_hypothesis_as_errors():
    """A reference that normalises to nothing is kept, its hypothesis counted against one word / character."""
    assert error_rates([""], ["hello world"]) == pytest.approx((2.0, 11.0))
    scores = asr_scores(["a b", "?!"], ["a b", "noise"], ["en", "en"])
    assert scores["n/en"] == 2 and scores["wer"] == pytest.approx(1 / 3)  # 1 error over 2 + 1 words


def test_an_empty_reference_with_an_empty_hypothesis_is_no_error():
    """Nothing said, nothing transcribed: a correct output, not a deletion of the placeholder word."""
    assert error_rates([""], [""]) == (0.0, 0.0)
    assert asr_scores(["a b", "?!"], ["a b", ""], ["en", "en"])["wer"] == 0.0


def test_scores_per_language_their_means_and_language_id():
    refs = ["The cat sat.", "Кот сидит", "кот спит"]
    hyps = ["the cat sit", "кот, сидит!", "КОТ"]
    scores = asr_scores(refs, hyps, ["en", "ru", "ru"], ["en", "en", "ru"])
    want = {"wer/en": 1 / 3, "cer/en": 1 / 11, "n/en": 1, "lid_acc/en": 1.0,
            "wer/ru": 1 / 4, "cer/ru": 5 / 17, "n/ru": 2, "lid_acc/ru": 0.5,  # "кот спит" -> "кот": 5 deletions
            "wer": 2 / 7, "cer": 6 / 28, "lid_acc": 2 / 3,
            "wer_mean": (1 / 3 + 1 / 4) / 2, "cer_mean": (1 / 11 + 5 / 17) / 2}
    assert scores == pytest.approx(want)
    assert "lid_acc" not in asr_scores(refs, hyps, ["en", "ru", "ru"])  # no predictions, no LID
    assert asr_scores([], [], []) == {}
    with pytest.raises(ValueError, match="2 references, 1 hypotheses, 2 languages"):
        asr_scores(["a", "b"], ["a"], ["en", "en"])


def test_format_scores_table_rows():
    scores = asr_scores(["the cat sat", "кот сидит", "кот спит"], ["the cat sit", "кот сидит", "кот"],
                        ["en", "ru", "ru"], ["en", "en", "ru"])
    rows = [line.split() for line in format_scores(scores).splitlines()]
    assert rows == [["language", "n", "CER", "WER", "LID"],
                    ["en", "1", "0.0909", "0.3333", "1.0000"],
                    ["ru", "2", "0.2941", "0.2500", "0.5000"],
                    ["all", "3", "0.2143", "0.2857", "0.6667"],
                    ["mean", "over", "languages:", "CER", "0.1925,", "WER", "0.2917"]]
    without_lid = format_scores(asr_scores(["a"], ["a"], ["en"])).splitlines()
    assert without_lid[1].split() == ["en", "1", "0.0000", "0.0000", "-"]


# ---------------------------------------------------------------- held-out evaluation

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_asr_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe(read_transcripts([str(corpus / "train" / "shard-000000.tar")]), 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Whisper(dims_for("cpu_tiny", n_vocab=tokenizer.vocab_size)).eval()


def test_evaluate_asr_scores_every_heldout_utterance(corpus, tokenizer, model):
    info = json.loads((corpus / "info.json").read_text())
    scores = evaluate.evaluate_asr(model, tokenizer, str(corpus / "heldout"), torch.device("cpu"), batch_size=4,
                                   max_new_tokens=6)
    assert scores["eval_utterances"] == sum(c["count"] for c in info["heldout"].values()) == 9
    assert scores["eval_audio_s"] == pytest.approx(sum(c["seconds"] for c in info["heldout"].values()), abs=0.01)
    assert scores["rtf"] > 0
    for lang in ("en", "ru", "el"):
        assert scores[f"n/{lang}"] == 3
        assert {f"wer/{lang}", f"cer/{lang}", f"lid_acc/{lang}"} <= scores.keys()
    assert {"wer", "cer", "cer_mean", "wer_mean", "lid_acc"} <= scores.keys()
    assert len(scores["examples"]) == 9 and {e["language"] for e in scores["examples"]} == {"en", "ru", "el"}
    assert not model.training


def test_evaluate_asr_transcribes_in_the_detected_or_the_given_language(corpus, tokenizer, model, monkeypatch):
    asked = []
    real = evaluate.transcribe_features
    monkeypatch.setattr(evaluate, "transcribe_features",
                        lambda m, t, f, mask, langs, n, *w: asked.append(list(langs)) or real(m, t, f, mask, langs, n, *w))
    decode = asr_decoder(tokenizer, train=False)
    batch = next(iterate_eval_batches(str(corpus / "heldout"), decode, asr_collate(tokenizer.eot), 9,
                                      sort_key=lambda sample: sample["duration"]))  # as evaluate_asr batches them
    with torch.no_grad():
        features, mask = model.embed_audio(batch["mel"], batch["mel_lengths"])
        best, _ = detect_language(model, features, mask, tokenizer.sot, tokenizer.language_token_ids)
    detected = [tokenizer.languages[i] for i in best.tolist()]
    assert detected != batch["languages"]  # else the two modes could not be told apart

    given = evaluate.evaluate_asr(model, tokenizer, str(corpus / "heldout"), torch.device("cpu"), batch_size=9,
                                  language="given", max_new_tokens=2)
    detect = evaluate.evaluate_asr(model, tokenizer, str(corpus / "heldout"), torch.device("cpu"), batch_size=9,
                                   language="detect", max_new_tokens=2)
    assert asked == [batch["languages"], detected]
    lid = sum(d == t for d, t in zip(detected, batch["languages"])) / 9
    assert given["lid_acc"] == detect["lid_acc"] == pytest.approx(lid)  # LID is measured either way


def test_transcribe_batch_uses_given_languages_and_detects_otherwise(corpus, tokenizer, model, monkeypatch):
    decode = asr_decoder(tokenizer, train=False)
    batch = next(iterate_eval_batches(str(corpus / "heldout"), decode, asr_collate(tokenizer.eot), 3))
    prompts = []
    real = evaluate.greedy_decode
    monkeypatch.setattr(evaluate, "greedy_decode",
                        lambda m, f, mask, p, *a: prompts.append(p) or real(m, f, mask, p, *a))

    texts, languages = evaluate.transcribe_batch(model, tokenizer, batch["mel"], batch["mel_lengths"],
                                                 ["el", "ru", "el"], max_new_tokens=3)
    assert languages == ["el", "ru", "el"] and len(texts) == 3 and all(isinstance(t, str) for t in texts)
    el, ru = tokenizer.language_token("el"), tokenizer.language_token("ru")
    assert prompts[-1].tolist() == [[tokenizer.sot, lang, tokenizer.transcribe, tokenizer.no_timestamps]
                                    for lang in (el, ru, el)]

    with torch.no_grad():
        features, mask = model.embed_audio(batch["mel"], batch["mel_lengths"])
        best, _ = detect_language(model, features, mask, tokenizer.sot, tokenizer.language_token_ids)
    _, languages = evaluate.transcribe_batch(model, tokenizer, batch["mel"], batch["mel_lengths"], max_new_tokens=3)
    assert languages == [tokenizer.languages[i] for i in best.tolist()]
    assert prompts[-1][:, 1].tolist() == [tokenizer.language_token(lang) for lang in languages]


def test_transcribe_jointly_chooses_the_language_with_the_transcript(corpus, tokenizer, monkeypatch):
    """A clip sure of its language (P >= 0.9) is decoded once; an unsure one in each of its 3 likeliest, and the
    best transcript score + (1 - w) x log P(language) wins: here the second likeliest."""
    model = Whisper(dims_for("cpu_tiny", n_vocab=tokenizer.vocab_size), ctc=True, ctc_vocab=tokenizer.eot).eval()
    probs = torch.zeros(2, len(tokenizer.languages))
    lang = {code: i for i, code in enumerate(tokenizer.languages)}
    probs[0, lang["en"]], probs[0, lang["ru"]] = 0.95, 0.05
    probs[1, lang["ru"]], probs[1, lang["el"]], probs[1, lang["en"]] = 0.5, 0.3, 0.2
    words = {"en": "the", "ru": "да", "el": "και"}
    transcript_scores = {(0, "en"): -9.0, (1, "ru"): -10.0, (1, "el"): -9.5, (1, "en"): -5.0}
    jobs = []

    def fake_beam(model, features, mask, prompts, eot, max_new, suppress, ctc_weight, beam_size, length_bonus):
        assert (ctc_weight, beam_size, length_bonus) == (0.5, 4, 2.0) and suppress == evaluate.text_only(tokenizer)
        langs = [tokenizer.languages[tokenizer.language_token_ids.index(p[1])] for p in prompts.tolist()]
        rows = [int(features[i, 0, 0]) for i in range(len(langs))]  # each job's clip, as marked below
        jobs.extend(zip(rows, langs))
        return ([tokenizer.encode(" " + words[code]) for code in langs],
                [transcript_scores[(r, code)] for r, code in zip(rows, langs)])

    monkeypatch.setattr(evaluate, "joint_beam_search", fake_beam)
    features = torch.arange(2.0)[:, None, None].expand(2, 5, 4)  # clip i's features are all i
    texts, languages = evaluate.transcribe_jointly(model, tokenizer, features, None, probs, None, 10, 0.5, 4, 2.0)
    assert sorted(jobs) == [(0, "en"), (1, "el"), (1, "en"), (1, "ru")]
    # clip 1: ru -10 + 0.5 ln 0.5 = -10.35, el -9.5 + 0.5 ln 0.3 = -10.10, en -5 + 0.5 ln 0.2 = -5.80
    assert (texts, languages) == (["the", "the"], ["en", "en"])
    transcript_scores[(1, "en")] = -9.4  # better than el's -9.5 alone, but en's -10.20 loses to el's -10.10
    jobs.clear()
    texts, languages = evaluate.transcribe_jointly(model, tokenizer, features, None, probs, None, 10, 0.5, 4, 2.0)
    assert (texts, languages) == (["the", "και"], ["en", "el"])
    jobs.clear()  # languages given: one job per clip, in its language
    transcript_scores[(0, "ru")] = -1.0
    texts, languages = evaluate.transcribe_jointly(model, tokenizer, features, None, None, ["ru", "el"], 10, 0.5,
                                                   4, 2.0)
    assert sorted(jobs) == [(0, "ru"), (1, "el")] and languages == ["ru", "el"] and texts == ["да", "και"]
