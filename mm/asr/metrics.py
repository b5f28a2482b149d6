"""ASR scores as Whisper reports them: WER and CER after Whisper's text normalisers, per language.

    scores = asr_scores(references, hypotheses, languages, predicted_languages)
    # {"wer": ..., "cer": ..., "lid_acc": ..., "wer/en": ..., "cer/en": ..., "lid_acc/en": ..., "n/en": ...}

WER and CER are corpus-level (total edits / total reference words or characters, as jiwer computes
them over a list), per language and over all utterances. "cer_mean" is the mean of the per-language CERs,
so a language with short utterances counts as much as one with long ones.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jiwer
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

# Whisper's British -> American spelling table (openai/whisper, whisper/normalizers/english.json, MIT
# licence), shipped here because transformers loads it from a hub tokenizer's normalizer.json, which
# we cannot download.
SPELLING_FILE = Path(__file__).with_name("english_spelling.json")


@functools.lru_cache(maxsize=None)
def _normalizers() -> tuple:
    return EnglishTextNormalizer(json.loads(SPELLING_FILE.read_text())), BasicTextNormalizer()


def normalize_text(text: str, language: str | None) -> str:
    """Whisper's normaliser: EnglishTextNormalizer for English, BasicTextNormalizer (lowercase, no
    punctuation or symbols, diacritics kept) for every other language."""
    english, basic = _normalizers()
    return " ".join((english if language == "en" else basic)(text).split())


def error_rates(references: list[str], hypotheses: list[str]) -> tuple[float, float]:
    """(WER, CER) over the list, both strings already normalised. A reference that normalises to
    nothing counts its hypothesis as insertions against one word / character, so it is never dropped."""
    refs = [r if r.strip() else "∅" for r in references]
    hyps = [h if h.strip() else "" if r.strip() else "∅" for r, h in zip(references, hypotheses)]
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    return float(words.wer), float(chars.cer)


def asr_scores(references: list[str], hypotheses: list[str], languages: list[str],
               predicted_languages: list[str] | None = None) -> dict[str, float]:
    """WER, CER (and language-ID accuracy when predictions are given), overall and per language."""
    if not (len(references) == len(hypotheses) == len(languages)):
        raise ValueError(f"{len(references)} references, {len(hypotheses)} hypotheses, {len(languages)} languages")
    if not references:
        return {}
    refs = [normalize_text(r, lang) for r, lang in zip(references, languages)]
    hyps = [normalize_text(h, lang) for h, lang in zip(hypotheses, languages)]
    out = {}
    out["wer"], out["cer"] = error_rates(refs, hyps)
    for lang in sorted(set(languages)):
        idx = [i for i, x in enumerate(languages) if x == lang]
        out[f"wer/{lang}"], out[f"cer/{lang}"] = error_rates([refs[i] for i in idx], [hyps[i] for i in idx])
        out[f"n/{lang}"] = len(idx)
        if predicted_languages is not None:
            out[f"lid_acc/{lang}"] = sum(predicted_languages[i] == lang for i in idx) / len(idx)
    per_lang = sorted(set(languages))
    out["cer_mean"] = sum(out[f"cer/{lang}"] for lang in per_lang) / len(per_lang)
    out["wer_mean"] = sum(out[f"wer/{lang}"] for lang in per_lang) / len(per_lang)
    if predicted_languages is not None:
        out["lid_acc"] = sum(p == t for p, t in zip(predicted_languages, languages)) / len(languages)
    return out


def format_scores(scores: dict[str, float]) -> str:
    """A per-language table: language, utterances, CER, WER, LID accuracy; then the overall row."""
    langs = sorted(k.split("/", 1)[1] for k in scores if k.startswith("cer/"))
    lines = [f"{'language':>8} {'n':>5} {'CER':>7} {'WER':>7} {'LID':>7}"]
    for lang in langs:
        lid = scores.get(f"lid_acc/{lang}")
        lines.append(f"{lang:>8} {scores[f'n/{lang}']:>5} {scores[f'cer/{lang}']:>7.4f} {scores[f'wer/{lang}']:>7.4f} "
                     + (f"{lid:>7.4f}" if lid is not None else f"{'-':>7}"))
    n = sum(scores[f"n/{lang}"] for lang in langs)
    lid = scores.get("lid_acc")
    lines.append(f"{'all':>8} {n:>5} {scores['cer']:>7.4f} {scores['wer']:>7.4f} "
                 + (f"{lid:>7.4f}" if lid is not None else f"{'-':>7}"))
    lines.append(f"mean over languages: CER {scores['cer_mean']:.4f}, WER {scores['wer_mean']:.4f}")
    return "\n".join(lines)
