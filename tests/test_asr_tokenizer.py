"""mm.asr.tokenizer: Whisper's special-token layout, checked against transformers' and openai-whisper's tokenizers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm.asr.tokenizer import (LANGUAGES, AsrTokenizer, load_tokenizer, special_tokens, tokenizer_from_tiktoken,
                              train_bpe)

MULTILINGUAL = ["Hello world, it's a test.", " The quick brown fox: 12345 jumps!",
                " Привет, мир! Как дела?", " Γειά σου, Κόσμε· καλημέρα", " Schöne Grüße aus Köln, übermäßig",
                "你好，世界。今天天气很好", "  two  spaces\n\tand a tab"]
CORPUS = [text.strip() for text in MULTILINGUAL] * 5 + ["the fox and the dog", "съешь же ещё этих булок"] * 10


@pytest.fixture(scope="module")
def tok() -> AsrTokenizer:
    return train_bpe(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def whisper_tokenizer_module():
    return pytest.importorskip("whisper.tokenizer")


@pytest.fixture(scope="module")
def openai_vocab(whisper_tokenizer_module) -> Path:
    return Path(whisper_tokenizer_module.__file__).parent / "assets" / "multilingual.tiktoken"


@pytest.fixture(scope="module")
def tok99(openai_vocab) -> AsrTokenizer:
    return tokenizer_from_tiktoken(openai_vocab, num_languages=99)


def test_languages_equal_openai_whispers(whisper_tokenizer_module):
    assert list(LANGUAGES.items()) == list(whisper_tokenizer_module.LANGUAGES.items())
    assert len(LANGUAGES) == 100 and list(LANGUAGES)[-1] == "yue"


def test_layout_of_a_trained_tokenizer(tok):
    bpe_size = tok.eot
    assert bpe_size <= 400 and tok.tokenizer.get_vocab_size(with_added_tokens=False) == bpe_size
    assert tok.languages == tuple(LANGUAGES)
    assert tok.sot == tok.eot + 1 and tok.language_token_ids == list(range(tok.sot + 1, tok.sot + 101))
    assert [tok.translate, tok.transcribe, tok.sot_lm, tok.sot_prev, tok.no_speech, tok.no_timestamps] == \
        list(range(tok.sot + 101, tok.sot + 107))
    assert tok.timestamp_begin == tok.no_timestamps + 1 and tok.vocab_size == tok.timestamp_begin + 1501
    assert tok.tokenizer.id_to_token(tok.vocab_size - 1) == "<|30.00|>"
    with pytest.raises(KeyError, match="no language 'xx'"):
        tok.language_token("xx")


def test_training_is_deterministic_and_takes_a_language_subset(tok):
    assert train_bpe(CORPUS, vocab_size=400).tokenizer.to_str() == tok.tokenizer.to_str()
    small = train_bpe(CORPUS, vocab_size=300, languages=["de", "en"])
    assert small.languages == ("en", "de")  # LANGUAGES' order
    assert small.language_token("de") == small.sot + 2
    with pytest.raises(ValueError, match="unknown language"):
        train_bpe(CORPUS, languages=["en", "klingon"])


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text)
    assert all(i < tok.eot for i in ids) and tok.decode(ids) == text


def test_special_text_in_a_transcript_stays_text(tok):
    ids = tok.encode("say <|en|> and <|endoftext|> <|1.00|>")
    assert all(i < tok.eot for i in ids)
    assert tok.decode(ids) == "say <|en|> and <|endoftext|> <|1.00|>"


def test_ids_equal_transformers_whisper_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    names = special_tokens(tok.languages)
    for cls in (transformers.WhisperTokenizer, transformers.WhisperTokenizerFast):
        hf = cls.from_pretrained(tmp_path)
        assert len(hf) == tok.vocab_size
        assert hf.all_special_ids[-1] + 1 == tok.timestamp_begin  # how HF's decode finds the timestamps
        assert hf.convert_tokens_to_ids(names) == list(range(tok.eot, tok.vocab_size))  # every language and timestamp
        assert [hf.convert_tokens_to_ids(t) for t in ("<|0.00|>", "<|1.20|>", "<|30.00|>")] == \
            [tok.timestamp_begin, tok.timestamp_begin + 60, tok.timestamp_begin + 1500]
        for text in MULTILINGUAL:
            assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        hf.set_prefix_tokens(language="de", task="translate", predict_timestamps=False)
        assert hf.prefix_tokens == tok.sot_sequence("de", "translate")
        tokens, _ = tok.build_target("hallo welt", "de", task="translate")
        assert hf.decode(tokens, skip_special_tokens=True) == tok.decode(tokens) == " hallo welt"


@pytest.mark.parametrize("num_languages", [99, 100])
def test_tiktoken_vocabulary_equals_openai_whisper(whisper_tokenizer_module, openai_vocab, tok99, num_languages):
    ours = tok99 if num_languages == 99 else tokenizer_from_tiktoken(openai_vocab, num_languages)
    ref = whisper_tokenizer_module.get_tokenizer(multilingual=True, num_languages=num_languages)
    assert ours.vocab_size == ref.encoding.n_vocab == 51765 + 1 + num_languages
    assert {t: ours.tokenizer.token_to_id(t) for t in ref.special_tokens} == ref.special_tokens
    assert (ours.eot, ours.sot, ours.transcribe, ours.no_timestamps, ours.timestamp_begin) == \
        (ref.eot, ref.sot, ref.transcribe, ref.no_timestamps, ref.timestamp_begin)
    assert ours.language_token_ids == sorted(ref.all_language_tokens)  # whisper lists them in set order
    assert ours.sot_sequence("en", timestamps=True) == list(ref.sot_sequence)
    for text in MULTILINGUAL:
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == text


def test_build_target_without_timestamps(tok):
    tokens, mask = tok.build_target("Hello world", "en")
    body = tok.encode(" Hello world")
    assert tokens == [tok.sot, tok.language_token("en"), tok.transcribe, tok.no_timestamps, *body, tok.eot]
    assert mask == [False] + [True] * (len(tokens) - 1)
    assert tok.build_target("  Hello world ", "en")[0] == tokens  # stripped, one leading space
    assert tok.build_target("", None)[0] == [tok.sot, tok.transcribe, tok.no_timestamps, tok.eot]


def test_build_target_with_timestamps(tok):
    segments = [{"start": 0.0, "end": 1.234, "text": " Hello"}, {"start": 1.5, "end": 31.0, "text": "world"}]
    tokens, mask = tok.build_target(None, "fr", segments=segments, timestamps=True, task="translate")
    tb = tok.timestamp_begin
    assert tokens == [tok.sot, tok.language_token("fr"), tok.translate,
                      tb + 0, *tok.encode(" Hello"), tb + 62, tb + 75, *tok.encode(" world"), tb + 1500, tok.eot]
    assert mask == [False] + [True] * (len(tokens) - 1)
    assert tok.decode_with_timestamps(tokens) == "<|0.00|> Hello<|1.24|><|1.50|> world<|30.00|>"
    assert tok.decode(tokens) == " Hello world"
    with pytest.raises(ValueError, match="needs segments"):
        tok.build_target("Hello", "en", timestamps=True)


def test_build_target_masks_the_previous_text(tok):
    tokens, mask = tok.build_target("the dog", "en", prev_text="the fox")
    prev = tok.encode(" the fox")
    assert tokens[:len(prev) + 2] == [tok.sot_prev, *prev, tok.sot]
    assert mask == [False] * (len(prev) + 2) + [True] * (len(tokens) - len(prev) - 2)
    long_prev = " ".join(["fox"] * 300)  # a prompt keeps its last max_len // 2 - 1 tokens, as in Whisper
    tokens, mask = tok.build_target("the dog", "en", prev_text=long_prev)
    assert tokens.index(tok.sot) == 1 + 448 // 2 - 1 and mask.count(False) == 448 // 2 + 1


def test_build_target_refuses_too_long_and_bad_arguments(tok):
    with pytest.raises(ValueError, match="exceeds max_len=10"):
        tok.build_target("the quick brown fox jumps over the lazy dog", "en", max_len=10)
    with pytest.raises(ValueError, match="task"):
        tok.sot_sequence("en", task="summarize")
    with pytest.raises(KeyError):
        tok.build_target("hi", "xx")


def test_save_then_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "ours")
    assert {p.name for p in (tmp_path / "ours").iterdir()} >= {
        "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
        "tokenizer_config.json"}
    back = load_tokenizer(tmp_path / "ours")
    assert back.tokenizer.to_str() == tok.tokenizer.to_str()
    (tmp_path / "ours" / "tokenizer.json").unlink()  # the vocab.json + merges.txt path
    for loaded in (back, load_tokenizer(tmp_path / "ours")):
        assert loaded.vocab_size == tok.vocab_size and loaded.languages == tok.languages
        target = {"text": "the fox", "language": "ru", "prev_text": "the dog"}
        assert loaded.build_target(**target) == tok.build_target(**target)
        assert [loaded.encode(t) for t in MULTILINGUAL] == [tok.encode(t) for t in MULTILINGUAL]


def test_loads_what_transformers_saves(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "ours")
    transformers.WhisperTokenizer.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    loaded = load_tokenizer(tmp_path / "hf")
    assert (loaded.eot, loaded.timestamp_begin, loaded.vocab_size) == (tok.eot, tok.timestamp_begin, tok.vocab_size)
    assert [loaded.encode(t) for t in MULTILINGUAL] == [tok.encode(t) for t in MULTILINGUAL]


def test_loads_an_older_checkpoint_without_timestamp_tokens(tok, tmp_path):
    """Hub checkpoints written before timestamps were added tokens: <|endoftext|> in vocab.json, no tokenizer.json."""
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").unlink()
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": tok.eot}))
    added = json.loads((tmp_path / "added_tokens.json").read_text())
    added = {t: i for t, i in added.items() if i < tok.timestamp_begin}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    loaded = load_tokenizer(tmp_path)
    assert loaded.timestamp_begin == tok.timestamp_begin and loaded.vocab_size == tok.vocab_size
    assert loaded.tokenizer.token_to_id("<|30.00|>") == tok.vocab_size - 1


def test_a_tokenizer_without_whisper_specials_is_refused():
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match="not a Whisper tokenizer"):
        AsrTokenizer(Tokenizer(models.BPE()))
