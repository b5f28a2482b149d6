"""Whisper's token layout on a byte-level BPE from `tokenizers`: text tokens, then the special tokens.

The layout (openai-whisper's get_encoding, and Hugging Face's WhisperTokenizer):
    [BPE vocabulary: ids 0 .. n-1]
    <|endoftext|> (id n: eot), <|startoftranscript|>, one <|xx|> per language (LANGUAGES' order),
    <|translate|>, <|transcribe|>, <|startoflm|>, <|startofprev|>, <|nospeech|>, <|notimestamps|>,
    <|0.00|> <|0.02|> ... <|30.00|> (1501 timestamps, 0.02 s apart: one audio encoder position)
So every special id is >= eot and every timestamp id is >= timestamp_begin, which is how decoding
tells them apart. A tokenizer comes from `train_bpe` (from scratch), `load_tokenizer` (a folder we or
Hugging Face saved) or `tokenizer_from_tiktoken` (OpenAI's vocabulary, for OpenAI's .pt checkpoints).

Text never turns into special tokens: `encode` runs the BPE alone, so a transcript that happens to
contain "<|en|>" is encoded as those characters (openai-whisper raises there; Hugging Face would
emit the special token).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# openai-whisper's table, in its order: a language's token id is sot + 1 + its index here.
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao",
    "uz": "uzbek", "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa",
    "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
TASKS = ("transcribe", "translate")
TIME_PRECISION = 0.02  # seconds per timestamp token (one position of the audio encoder)
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
MAX_TARGET_LEN = 448  # Whisper's text context (n_text_ctx)
_TEXT_SPECIALS = ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                  "<|notimestamps|>")


def timestamp_text(index: int) -> str:
    """The text of timestamp token `index` (0..1500): "<|1.20|>" for 60."""
    return f"<|{index * TIME_PRECISION:.2f}|>"  # openai-whisper's own expression, so the strings agree


def special_tokens(languages: Sequence[str]) -> list[str]:
    """Whisper's special tokens in id order, with a language token for each of `languages`."""
    return ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in languages), *_TEXT_SPECIALS,
            *(timestamp_text(i) for i in range(N_TIMESTAMPS))]


class AsrTokenizer:
    """A `tokenizers.Tokenizer` (byte-level BPE + Whisper's special tokens) with Whisper's target format.

    Attributes: eot, sot, translate, transcribe, sot_lm, sot_prev, no_speech, no_timestamps and
    timestamp_begin (special token ids); languages (the codes that have a token, in id order);
    vocab_size (all tokens, specials included: the model's output size); tokenizer (the wrapped one).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # The BPE alone, without the added (special) tokens: what text is encoded and decoded with.
        self._text = Tokenizer(tokenizer.model)
        for part in ("normalizer", "pre_tokenizer", "decoder"):
            if getattr(tokenizer, part) is not None:
                setattr(self._text, part, getattr(tokenizer, part))
        present = [c for c in LANGUAGES if tokenizer.token_to_id(f"<|{c}|>") is not None]
        self.languages = tuple(sorted(present, key=lambda c: tokenizer.token_to_id(f"<|{c}|>")))
        names = special_tokens(self.languages)
        ids = [tokenizer.token_to_id(t) for t in names]
        missing = [t for t, i in zip(names, ids) if i is None]
        if missing:
            more = " ..." if len(missing) > 5 else ""
            raise ValueError(f"not a Whisper tokenizer: no {', '.join(missing[:5])}{more}")
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError("not Whisper's layout: the special tokens' ids are not contiguous in Whisper's order")
        self._special_ids = dict(zip(names, ids))
        self.eot, self.sot = ids[0], ids[1]
        self.translate, self.transcribe, self.sot_lm, self.sot_prev, self.no_speech, self.no_timestamps = (
            self._special_ids[t] for t in _TEXT_SPECIALS)
        self.timestamp_begin = self.no_timestamps + 1
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if self.vocab_size != ids[-1] + 1:
            raise ValueError(f"not Whisper's layout: {self.vocab_size} tokens, but <|30.00|> is id {ids[-1]}")

    def __repr__(self) -> str:
        return f"AsrTokenizer(vocab_size={self.vocab_size}, eot={self.eot}, languages={len(self.languages)})"

    def language_token(self, code: str) -> int:
        """The id of <|code|>; KeyError if this tokenizer has no such language."""
        if code not in self.languages:
            shown = ", ".join(self.languages[:8]) + (", ..." if len(self.languages) > 8 else "")
            raise KeyError(f"no language {code!r} in this tokenizer ({len(self.languages)} languages: {shown})")
        return self._special_ids[f"<|{code}|>"]

    @property
    def language_token_ids(self) -> list[int]:
        """The ids of the language tokens, in id order (as `languages`)."""
        return [self._special_ids[f"<|{code}|>"] for code in self.languages]

    def timestamp_token(self, seconds: float) -> int:
        """The id of the timestamp nearest `seconds`, clamped to 0..30 s."""
        return self.timestamp_begin + round(min(max(seconds, 0.0), 30.0) / TIME_PRECISION)

    # ------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` as given (no leading space added, no special tokens)."""
        return self._text.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special and timestamp tokens left out."""
        return self._text.decode([i for i in map(int, ids) if i < self.eot])

    def decode_with_timestamps(self, ids: Iterable[int]) -> str:
        """The text of `ids` with timestamps written out, as in " Hi.<|1.20|><|1.50|> Bye."; other specials left out.

        (openai-whisper's decode_with_timestamps also writes the other specials; Hugging Face's
        decode(..., decode_with_timestamps=True, skip_special_tokens=True) leaves them out, as here.)
        """
        parts, run = [], []
        for i in map(int, ids):
            if i < self.eot:
                run.append(i)
            elif i >= self.timestamp_begin:
                parts += [self._text.decode(run), timestamp_text(i - self.timestamp_begin)]
                run = []
        return "".join(parts) + self._text.decode(run)

    # ------------------------------------------------------------ training targets

    def sot_sequence(self, language: str | None, task: str = "transcribe", timestamps: bool = False) -> list[int]:
        """[sot, <|language|>, <|task|>] + [<|notimestamps|>] unless timestamps; no language token if None."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        sequence = [self.sot] + ([] if language is None else [self.language_token(language)])
        sequence.append(self.transcribe if task == "transcribe" else self.translate)
        return sequence if timestamps else sequence + [self.no_timestamps]

    def build_target(self, text: str | None, language: str | None, segments: list[dict] | None = None,
                     timestamps: bool = False, prev_text: str | None = None, task: str = "transcribe",
                     max_len: int = MAX_TARGET_LEN) -> tuple[list[int], list[bool]]:
        """A decoder sequence in Whisper's training format, and which of its tokens are loss targets.

        tokens = [<|startofprev|> + prev_text] + sot_sequence + body + [eot], where body is " text"
        or, with timestamps, each segment {"start": s, "end": s, "text": str} (seconds, in the 30 s
        window) as <|start|> " text" <|end|>; times are rounded to 0.02 s and clamped to 0..30.
        Text is encoded with one leading space, as Whisper does (its outputs and prompts begin with one),
        so the first word gets the same token as mid-sentence. prev_text keeps its last
        max_len // 2 - 1 tokens, as Whisper's transcribe() cuts its prompt.

        loss_mask[i] is True when tokens[i] is to be predicted (from tokens[:i]): everything after sot
        (language, task, timestamps mode, body, eot), not the previous text nor sot itself. A step
        feeds tokens[:-1] and scores tokens[1:] where loss_mask[1:]. ValueError if the sequence would be
        longer than max_len.
        """
        prefix = []
        if prev_text and prev_text.strip():
            prefix = [self.sot_prev] + self.encode(" " + prev_text.strip())[-(max_len // 2 - 1):]
        if timestamps:
            if segments is None:
                raise ValueError("timestamps=True needs segments: [{'start': s, 'end': s, 'text': str}, ...]")
            body = []
            for seg in segments:
                words = seg["text"].strip()
                body += [self.timestamp_token(seg["start"]), *(self.encode(" " + words) if words else []),
                         self.timestamp_token(seg["end"])]
        else:
            words = (text or "").strip()
            body = self.encode(" " + words) if words else []
        tokens = prefix + self.sot_sequence(language, task, timestamps) + body + [self.eot]
        if len(tokens) > max_len:
            raise ValueError(f"target of {len(tokens)} tokens ({len(body)} of text) exceeds max_len={max_len}")
        return tokens, [False] * (len(prefix) + 1) + [True] * (len(tokens) - len(prefix) - 1)

    # ------------------------------------------------------------ files

    def save(self, directory: str | Path) -> Path:
        """Write Hugging Face Whisper's tokenizer files; WhisperTokenizer(Fast).from_pretrained reads them.

        tokenizer.json (everything, for `tokenizers` and transformers' fast path), vocab.json +
        merges.txt + added_tokens.json (the older slow path), special_tokens_map.json, tokenizer_config.json.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        model = json.loads(self.tokenizer.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        added = dict(self._special_ids)
        named = list(added)[:-N_TIMESTAMPS]  # the specials but the timestamps, as Hugging Face lists them
        common = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}
        config = {"tokenizer_class": "WhisperTokenizer", **common, "add_prefix_space": False, "errors": "replace",
                  "model_max_length": 1024,
                  # 4.x's key, which 5.x reads too (5.x writes "extra_special_tokens", which 4.x takes for a dict)
                  "additional_special_tokens": named,
                  "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                                    "rstrip": False, "single_word": False, "special": t in named}
                                           for t, i in added.items()}}
        files = {"vocab.json": model["vocab"], "added_tokens.json": added, "tokenizer_config.json": config,
                 "special_tokens_map.json": {**common, "additional_special_tokens": named}}
        for name, content in files.items():
            (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
        return out


# ---------------------------------------------------------------- making one

def _byte_level_bpe(model: models.BPE) -> Tokenizer:
    """GPT-2's byte-level setup, which Whisper uses: its regex splits words, each byte is one symbol."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _with_specials(tokenizer: Tokenizer, languages: Sequence[str]) -> AsrTokenizer:
    """`tokenizer` (a bare BPE) with Whisper's special tokens appended, so eot's id is the BPE's size."""
    names = special_tokens(languages)
    n_timestamps_at = len(names) - N_TIMESTAMPS
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in names[:n_timestamps_at]])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in names[n_timestamps_at:]])
    return AsrTokenizer(tokenizer)


# Written beside a tokenizer trained from scratch: the language codes of its training data (a JSON list).
# Its model has all of Whisper's language tokens but learnt only these.
TRAINED_LANGUAGES = "trained_languages.json"


def train_bpe(texts: Iterable[str], vocab_size: int = 1000, languages: Sequence[str] | None = None) -> AsrTokenizer:
    """A byte-level BPE of `vocab_size` tokens (the 256 bytes included; specials come on top) trained on `texts`.

    Deterministic for the same texts. `languages` (default: all of LANGUAGES) get a token each, in
    LANGUAGES' order; Hugging Face's and openai-whisper's tokenizers compute a language's id as
    sot + 1 + its index in LANGUAGES, so pick a prefix (such as 99 languages) to stay readable by them.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (one token per byte), got {vocab_size}")
    if languages is not None:
        unknown = sorted(set(languages) - set(LANGUAGES))
        if unknown:
            raise ValueError(f"unknown language codes {unknown}; Whisper's are LANGUAGES' keys")
    languages = [c for c in LANGUAGES if languages is None or c in languages]
    tokenizer = _byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return _with_specials(tokenizer, languages)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: how byte-level BPE vocabularies write tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], n = chr(256 + n), n + 1
    return chars


def tokenizer_from_tiktoken(path: str | Path, num_languages: int = 99) -> AsrTokenizer:
    """OpenAI's Whisper vocabulary from a tiktoken rank file (openai-whisper's assets/multilingual.tiktoken).

    OpenAI's .pt checkpoints carry no tokenizer. Each line holds a base64 token and its rank (its id);
    merges are recovered from the ranks as transformers' TikTokenConverter does: every split of a
    token into two tokens is a merge, ranked by the whole token. The specials follow at the number of
    ranks, as in openai-whisper's get_encoding. num_languages: 99 for most models, 100 for large-v3;
    from a checkpoint, n_vocab - len(ranks) - 1509.
    """
    ranks = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1}, one per token")
    byte_chars = _bytes_to_unicode()

    def text_of(token: bytes) -> str:
        return "".join(byte_chars[b] for b in token)

    merges = sorted((rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                    for token, rank in ranks.items() for i in range(1, len(token))
                    if token[:i] in ranks and token[i:] in ranks)
    # ignore_merges: a word that is a token is that token, as tiktoken does before merging.
    bpe = models.BPE({text_of(t): r for t, r in ranks.items()}, [(text_of(a), text_of(b)) for *_, a, b in merges],
                     ignore_merges=True)
    return _with_specials(_byte_level_bpe(bpe), list(LANGUAGES)[:num_languages])


def load_tokenizer(directory: str | Path) -> AsrTokenizer:
    """The tokenizer saved in `directory` by AsrTokenizer.save or by transformers' Whisper tokenizers.

    Reads tokenizer.json when present, else vocab.json + merges.txt + the added tokens (added_tokens.json
    and tokenizer_config.json's added_tokens_decoder). Older Hugging Face checkpoints stop at
    <|notimestamps|>; the timestamp tokens are then appended, at the ids Whisper gives them.
    """
    folder = Path(directory)
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file():
        tokenizer = _from_vocab_and_merges(folder)
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json nor vocab.json")
    if tokenizer.token_to_id(timestamp_text(0)) is None:
        tokenizer.add_tokens([AddedToken(timestamp_text(i), normalized=False, special=False)
                              for i in range(N_TIMESTAMPS)])
    return AsrTokenizer(tokenizer)


def _from_vocab_and_merges(folder: Path) -> Tokenizer:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = _byte_level_bpe(models.BPE(vocab, merges))
    added = {}
    if (folder / "added_tokens.json").is_file():
        listed = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
        added.update({i: t for t, i in listed.items()})
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        added.update({int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()})
    for i in sorted(added):
        if tokenizer.token_to_id(added[i]) is None:
            is_timestamp = added[i][2:3].isdigit()  # Hugging Face adds timestamps as plain (non-special) tokens
            tokenizer.add_tokens([AddedToken(added[i], normalized=False, special=not is_timestamp)])
        if tokenizer.token_to_id(added[i]) != i:
            raise ValueError(f"{folder}: added token {added[i]} has id {i}, but the vocabulary puts it at "
                             f"{tokenizer.token_to_id(added[i])} (a gap in the ids)")
    return tokenizer
