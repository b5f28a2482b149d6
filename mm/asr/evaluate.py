"""Held-out evaluation of a speech recogniser: WER/CER per language, language-ID accuracy and the real-time
factor, two ways.

    scores = evaluate_asr(model, tokenizer, "data/asr_synth/heldout", device)    # during training
    result = evaluate_transcriber(Transcriber.from_checkpoint("runs/asr"), "data/asr_synth/heldout")
    print(format_eval(result))                                                   # python -m mm.asr eval

evaluate_asr is the recipe's: batched decoding of whole clips, greedy or (jointly with the CTC head) by beam search
with the language chosen with the transcript, no timestamps, every rank decoding its slice (rank 0's result covers
all of them). evaluate_transcriber decodes as
a user's transcription does (Transcriber: long-form windows, timestamps, temperature fallback, the checkpoint's
settings) and also returns the worst utterances.
"""
from __future__ import annotations

import functools
import math
import time

import torch

from mm.asr.data import asr_collate, asr_decoder
from mm.asr.decode import detect_language, greedy_decode, joint_beam_search
from mm.asr.metrics import asr_scores, error_rates, format_scores, normalize_text
from mm.decoders import audio_decoder
from mm.distributed import all_gather_objects
from mm.shards import iterate_eval_batches


@torch.no_grad()
def transcribe_features(model, tokenizer, features: torch.Tensor, mask: torch.Tensor | None, languages: list[str],
                        max_new_tokens: int = 128, ctc_weight: float = 0.0) -> list[str]:
    """Greedy transcripts, without timestamps, of encoded audio [B, T, D] in the given languages; ctc_weight > 0
    decodes jointly with the model's CTC head (mm.asr.decode.greedy_decode)."""
    ids = greedy_decode(model, features, mask, text_prompts(tokenizer, languages, features.device), tokenizer.eot,
                        max_new_tokens, text_only(tokenizer), ctc_weight)
    return [tokenizer.decode(t).strip() for t in ids]


def text_prompts(tokenizer, languages: list[str], device) -> torch.Tensor:
    """[B, 4] decoder prompts [sot, language, transcribe, notimestamps]."""
    return torch.tensor([tokenizer.sot_sequence(lang, timestamps=False) for lang in languages], device=device)


def text_only(tokenizer) -> list[int]:
    """The ids to suppress for a transcript without timestamps: every special token but <|endoftext|>."""
    return list(range(tokenizer.eot + 1, tokenizer.vocab_size))


@torch.no_grad()
def transcribe_jointly(model, tokenizer, features: torch.Tensor, mask: torch.Tensor | None,
                       language_probs: torch.Tensor | None, languages: list[str] | None = None,
                       max_new_tokens: int = 128, ctc_weight: float = 0.5, beam_size: int = 8,
                       length_bonus: float = 1.5, languages_tried: int = 3, sure: float = 0.9
                       ) -> tuple[list[str], list[str]]:
    """(texts, languages) by beam search joint with the CTC head (mm.asr.decode.joint_beam_search) of encoded
    audio [B, T, D]. In the given `languages`, or (None) chosen with the transcript: language_probs [B, n_lang]
    (detect_language's) ranks them, and a clip whose likeliest language has a probability below `sure` is
    also decoded in the next languages_tried - 1; the language whose transcript scores best, with
    (1 - ctc_weight) x log P(language) added (the language token scored as the hypothesis' first decoder
    token, which the CTC does not see), wins. On a clip of one or two words, the words tell two close
    languages apart better than the first decoder step alone (held-out LID 0.915 -> 0.985, RESULTS.md). The
    scores compared include the length bonus, as the hypotheses' own do (without it: dev-split LID 0.965 ->
    0.948)."""
    batch = features.shape[0]
    if languages is not None:
        jobs = [(i, lang, 0.0) for i, lang in enumerate(languages)]
    else:
        log_p = language_probs.float().log()
        ranked = log_p.argsort(dim=1, descending=True)[:, :languages_tried].tolist()
        unsure = (log_p.max(dim=1).values < math.log(sure)).tolist()
        jobs = [(i, tokenizer.languages[ranked[i][j]], float(log_p[i, ranked[i][j]]))
                for j in range(len(ranked[0])) for i in range(batch) if j == 0 or unsure[i]]
    rows = torch.tensor([i for i, _, _ in jobs], device=features.device)
    ids, scores = joint_beam_search(model, features[rows], mask[rows] if mask is not None else None,
                                    text_prompts(tokenizer, [lang for _, lang, _ in jobs], features.device),
                                    tokenizer.eot, max_new_tokens, text_only(tokenizer), ctc_weight, beam_size,
                                    length_bonus=length_bonus)
    best: dict[int, tuple[float, list[int], str]] = {}
    for (i, lang, log_p_lang), tokens, score in zip(jobs, ids, scores):
        score += (1 - ctc_weight) * log_p_lang
        if i not in best or score > best[i][0]:
            best[i] = (score, tokens, lang)
    return [tokenizer.decode(best[i][1]).strip() for i in range(batch)], [best[i][2] for i in range(batch)]


@torch.no_grad()
def transcribe_batch(model, tokenizer, mel: torch.Tensor, mel_lengths: torch.Tensor | None,
                     languages: list[str] | None = None, max_new_tokens: int = 128) -> tuple[list[str], list[str]]:
    """(texts, languages) for a batch of log-mels [B, n_mels, F]. Each language is detected from the
    audio unless given."""
    features, mask = model.embed_audio(mel, mel_lengths)
    if languages is None:
        best, _ = detect_language(model, features, mask, tokenizer.sot, tokenizer.language_token_ids)
        languages = [tokenizer.languages[i] for i in best.tolist()]
    return transcribe_features(model, tokenizer, features, mask, languages, max_new_tokens), languages


@torch.no_grad()
def evaluate_asr(model, tokenizer, spec: str, device: torch.device, n_mels: int | None = None,
                 batch_size: int = 32, max_seconds: float = 30.0, pad_to_30s: bool = False,
                 language: str = "detect", max_new_tokens: int = 128, rank: int = 0, world_size: int = 1,
                 autocast=None, ctc_weight: float = 0.0, beam_size: int = 1, length_bonus: float = 1.5,
                 languages_tried: int = 3) -> dict:
    """Scores over every sample of `spec` (see mm.asr.metrics.asr_scores) plus "rtf": decoding seconds
    per second of audio, "eval_utterances" and "eval_audio_s". language="detect" transcribes in the
    detected language (the end-to-end number); "given" uses the sample's own (LID is still measured).
    ctc_weight > 0 decodes jointly with the model's CTC head: greedily (greedy_decode), or with beam_size > 1 by
    beam search, the language chosen with the transcript among the languages_tried likeliest
    (transcribe_jointly); and also by the decoder alone, greedily in the language of its first step:
    "cer_mean_decoder_alone", "cer_decoder_alone", "wer_decoder_alone" and "lid_acc_decoder_alone" are what the
    exports, which have no CTC head, score in transformers or openai-whisper. The real-time factor is the joint
    decoding's; "eval_beam_size" says which decoding (1: greedy). Clips are decoded in batches of similar
    durations (unless padded to 30 s)."""
    if beam_size > 1 and not ctc_weight:
        raise ValueError("beam_size > 1 is the joint beam search here: it needs ctc_weight > 0")
    was_training = model.training
    model.eval()
    n_mels = n_mels or model.dims.n_mels
    decode = asr_decoder(tokenizer, n_mels=n_mels, train=False, max_seconds=max_seconds, pad_to_30s=pad_to_30s)
    refs, hyps, langs, preds, alone, firsts, audio_s, busy_s = [], [], [], [], [], [], 0.0, 0.0
    # clips of similar lengths batched together (less padding to decode); windows padded to 30 s have one length
    by_duration = None if pad_to_30s else (lambda sample: sample["duration"])
    batches = iterate_eval_batches(spec, decode, asr_collate(tokenizer.eot), batch_size, rank, world_size,
                                   sort_key=by_duration)
    for batch in batches:
        t0 = time.perf_counter()
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            mel, lengths = batch["mel"].to(device), batch["mel_lengths"].to(device)
            features, mask = model.embed_audio(mel, lengths)
            best, probs = detect_language(model, features, mask, tokenizer.sot, tokenizer.language_token_ids)
            first = [tokenizer.languages[i] for i in best.tolist()]
            # at most ~10 tokens per second of speech (Whisper's own cap is 224 per 30 s): a model that never
            # says <|endoftext|> must not spend the evaluation writing max_new_tokens of nonsense
            cap = min(max_new_tokens, int(10 * max(batch["durations"])) + 16)
            given = batch["languages"] if language == "given" else None
            if beam_size > 1:
                texts, detected = transcribe_jointly(model, tokenizer, features, mask, probs, given, cap, ctc_weight,
                                                     beam_size, length_bonus, languages_tried)
                detected = detected if given is None else first
            else:
                texts, detected = transcribe_features(model, tokenizer, features, mask, given or first, cap,
                                                      ctc_weight), first
            busy_s += time.perf_counter() - t0
            if ctc_weight:
                alone += transcribe_features(model, tokenizer, features, mask, given or first, cap)
        refs += batch["texts"]
        hyps += texts
        langs += batch["languages"]
        preds += detected
        firsts += first
        audio_s += sum(batch["durations"])
    parts = all_gather_objects((refs, hyps, langs, preds, alone, firsts, audio_s, busy_s))
    if was_training:
        model.train()
    refs, hyps, langs, preds, alone, firsts = ([x for p in parts for x in p[i]] for i in range(6))
    audio_s, busy_s = sum(p[6] for p in parts), max(p[7] for p in parts)
    scores = asr_scores(refs, hyps, langs, preds)
    if ctc_weight and refs:
        decoder_alone = asr_scores(refs, alone, langs, firsts)
        scores.update({f"{k}_decoder_alone": decoder_alone[k] for k in ("cer_mean", "cer", "wer", "lid_acc")})
    scores.update({"rtf": busy_s / max(audio_s, 1e-9), "eval_utterances": len(refs), "eval_audio_s": audio_s,
                   "eval_beam_size": beam_size})
    scores["examples"] = [{"language": lang, "reference": r, "hypothesis": h}
                          for r, h, lang in list(zip(refs, hyps, langs))[:: max(1, len(refs) // 10)]]
    return scores


# ---------------------------------------------------------------- a Transcriber, as python -m mm.asr eval runs it

def evaluate_transcriber(transcriber, spec: str, language: str = "detect", batch_size: int = 16, worst: int = 10,
                         **decode) -> dict:
    """mm.asr.metrics.asr_scores over every sample of `spec`, decoded as `transcribe` decodes, plus "rtf"
    (decoding seconds per second of audio), "eval_utterances", "eval_audio_s" and "worst": the `worst`
    utterances by CER. language="given" decodes in each sample's language, so LID is not measured.
    decode: Transcriber.transcribe's keywords (timestamps, TranscribeOptions fields)."""
    rows, busy_s = [], 0.0
    read = functools.partial(read_keyed, read=audio_decoder(max_seconds=transcriber.max_seconds))
    for batch in iterate_eval_batches(spec, read, list, batch_size):
        groups = group_by_language(batch, transcriber, known=language == "given")  # also checks each has one
        for lang, samples in ({None: batch} if language == "detect" else groups).items():
            t0 = time.perf_counter()
            out = transcriber.transcribe_batch([s["audio"].numpy() for s in samples], language=lang,
                                               batch_size=batch_size, **decode)
            busy_s += time.perf_counter() - t0
            rows += [{"key": s["key"], "language": s["language"], "detected": t.language if lang is None else None,
                      "reference": s["text"], "hypothesis": t.text.strip(), "duration": s["duration"]}
                     for s, t in zip(samples, out)]
    if not rows:
        raise ValueError(f"{spec}: no usable samples (each needs audio, a transcript and a language)")
    scores = asr_scores([r["reference"] for r in rows], [r["hypothesis"] for r in rows],
                        [r["language"] for r in rows], [r["detected"] for r in rows] if language == "detect" else None)
    for r in rows:
        r["wer"], r["cer"] = error_rates([normalize_text(r["reference"], r["language"])],
                                         [normalize_text(r["hypothesis"], r["language"])])
    audio_s = sum(r["duration"] for r in rows)
    return {**scores, "rtf": busy_s / audio_s, "eval_utterances": len(rows), "eval_audio_s": audio_s,
            "worst": sorted(rows, key=lambda r: -r["cer"])[:worst]}


def read_keyed(sample: dict, read) -> dict:
    """read(sample) with the sample's key, so that the worst examples can be found in the shards."""
    return {**read(sample), "key": sample.get("__key__")}


def group_by_language(samples: list[dict], transcriber, known: bool) -> dict[str, list[dict]]:
    """{language: its samples}; ValueError for a sample without a language, or (known) one the model lacks."""
    groups = {}
    for s in samples:
        if s["language"] is None:
            raise ValueError("a sample without a language: scores are per language (set it in the shards)")
        if known and s["language"] not in transcriber.languages:
            raise ValueError(f"a sample in language {s['language']!r}, which {transcriber.name} does not know")
        groups.setdefault(s["language"], []).append(s)
    return groups


def format_eval(result: dict) -> str:
    """evaluate_transcriber's result for people: the per-language table, the real-time factor, the worst examples."""
    lines = [format_scores(result), f"real-time factor {result['rtf']:.4f} ({result['eval_utterances']} "
                                    f"utterances, {result['eval_audio_s']:.1f} s of audio)"]
    if result["worst"]:
        lines.append(f"worst {len(result['worst'])} by CER:")
    for r in result["worst"]:
        heard = "" if r["detected"] in (None, r["language"]) else f", heard as {r['detected']}"
        lines += [f"  CER {r['cer']:.3f}  WER {r['wer']:.3f}  {r['language']}{heard}  ({r['key']})",
                  f"    reference:  {r['reference']}", f"    hypothesis: {r['hypothesis']}"]
    return "\n".join(lines)
