"""The rules Whisper's decoding applies to each step's logits (whisper.decoding's LogitFilter classes, as
functions): which tokens may never be sampled, no blank start, and the grammar of timestamp tokens.

Each filter edits logits [B, V] in place, given tokens [B, L]: every row's context so far, whose sampled
part begins at column `sample_begin` (the same for every row: shorter prompts are left-padded). A decoder
builds them once per call with `build_logit_filters` and applies them in order at every step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

LogitFilter = Callable[[Tensor, Tensor], None]  # (logits [B, V], tokens [B, L]) -> None, edits logits in place

# openai-whisper's Tokenizer.non_speech_tokens: speaker tags, music notes and bracketed annotations that
# subtitles carry but speech does not ("♪♪♪", "( SPEAKING FOREIGN LANGUAGE )", "[DAVID] Hey there,").
NON_SPEECH_SYMBOLS = (list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
                      + "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split())
# U+2640..U+267F: when one of these is several byte-level tokens, its first token (two of its three UTF-8
# bytes, shared by the whole block) is suppressed, which only blocks more symbols of that block.
MISCELLANEOUS_SYMBOLS = "♩♪♫♬♭♮♯"


def _byte_length(tokenizer, token: int) -> int:
    """How many bytes of text `token` stands for (a byte-level BPE writes one character per byte)."""
    return len(tokenizer.tokenizer.id_to_token(token))


def non_speech_tokens(tokenizer) -> list[int]:
    """Ids of the tokens that write only non-speech symbols, computed as openai-whisper does for its own
    vocabulary: each symbol encoded alone and after a space, kept where that is a single token, plus " -"
    and " '" (allowed inside words, not at a word's start). For the music symbols, a first token that
    holds at least two of the symbol's three UTF-8 bytes is kept even when more follow. On Whisper's
    vocabulary this is exactly openai-whisper's set. A small BPE splits more: what it cannot write as one
    token is left out (suppressing a lone space or a lone first byte would block ordinary text)."""
    result = set()
    for text in (" -", " '"):
        ids = tokenizer.encode(text)
        if len(ids) == 1:
            result.add(ids[0])
    for symbol in NON_SPEECH_SYMBOLS + list(MISCELLANEOUS_SYMBOLS):
        for prefix in ("", " "):
            ids = tokenizer.encode(prefix + symbol)
            if len(ids) == 1 or (symbol in MISCELLANEOUS_SYMBOLS and ids
                                 and _byte_length(tokenizer, ids[0]) >= len(prefix) + 2):
                result.add(ids[0])
    return sorted(result)


def suppress_token_ids(tokenizer, suppress_tokens: str | Iterable[int] | None) -> list[int]:
    """The ids SuppressTokens blocks (whisper.decoding's _get_suppress_tokens): `suppress_tokens` as a
    comma-separated string or ids, where -1 stands for `non_speech_tokens`, plus the special tokens that
    must never be generated (task, sot, sot_prev, sot_lm; nospeech, whose probability is read apart)."""
    if isinstance(suppress_tokens, str):
        ids = [int(t) for t in suppress_tokens.split(",") if t.strip()]
    else:
        ids = list(suppress_tokens or [])
    if -1 in ids:
        ids = [t for t in ids if t >= 0] + non_speech_tokens(tokenizer)
    bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise ValueError(f"suppress_tokens outside the vocabulary of {tokenizer.vocab_size}: {bad}")
    ids += [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev, tokenizer.sot_lm,
            tokenizer.no_speech]
    return sorted(set(ids))


def suppress_blank(logits: Tensor, tokens: Tensor, sample_begin: int, blank_ids: list[int]) -> None:
    """At the first sampled position only, forbid `blank_ids` (a space, and eot): no empty transcript."""
    if tokens.shape[1] == sample_begin:
        logits[:, blank_ids] = float("-inf")


def suppress_tokens(logits: Tensor, tokens: Tensor, ids: list[int]) -> None:
    """Forbid `ids` at every step."""
    logits[:, ids] = float("-inf")


def apply_timestamp_rules(logits: Tensor, tokens: Tensor, sample_begin: int, timestamp_begin: int, eot: int,
                          no_timestamps: int, max_initial_timestamp_index: int | None) -> None:
    """Whisper's timestamp grammar (whisper.decoding.ApplyTimestampRules), vectorised over rows:

    - <|notimestamps|> never (timestamp mode was chosen by the prompt);
    - timestamps come in pairs (<|end|><|next start|>), except a lone one right before eot: after one
      timestamp following text, the next token is a timestamp or eot; after two, it is text;
    - timestamps never decrease, and a segment cannot end where it started (after a lone timestamp the
      next may repeat it, to open the next segment; otherwise it must be later);
    - the first sampled token is a timestamp, at most max_initial_timestamp_index (None: no limit);
    - when the probability of all timestamps together beats that of the likeliest text token, a timestamp
      it is (text is forbidden).
    logits [B, V], tokens [B, L] with the sampled part from column sample_begin."""
    logits[:, no_timestamps] = float("-inf")
    sampled = tokens[:, sample_begin:]  # [B, n]
    n, vocab = sampled.shape[1], logits.shape[1]
    columns = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
    if n == 0:
        logits[:, :timestamp_begin] = float("-inf")
        if max_initial_timestamp_index is not None:
            logits[:, timestamp_begin + max_initial_timestamp_index + 1:] = float("-inf")
    else:
        is_timestamp = sampled >= timestamp_begin  # [B, n]
        last = is_timestamp[:, -1]
        penultimate = is_timestamp[:, -2] if n >= 2 else torch.ones_like(last)
        pair_closed = last & penultimate  # two timestamps in a row: text must follow
        lone = last & ~penultimate  # text then a timestamp: a timestamp or eot must follow
        logits.masked_fill_(pair_closed[:, None] & (columns >= timestamp_begin), float("-inf"))
        logits.masked_fill_(lone[:, None] & (columns < eot), float("-inf"))
        # the last timestamp sampled so far (position -1 if none), and the first one still allowed
        position = torch.where(is_timestamp, torch.arange(n, device=tokens.device), -1).amax(dim=1)  # [B]
        last_timestamp = sampled.gather(1, position.clamp(min=0)[:, None])[:, 0]
        first_allowed = torch.where(lone, last_timestamp, last_timestamp + 1)
        forbidden = (position >= 0)[:, None] & (columns >= timestamp_begin) & (columns < first_allowed[:, None])
        logits.masked_fill_(forbidden, float("-inf"))
    logprobs = F.log_softmax(logits.float(), dim=-1)
    timestamp_logprob = logprobs[:, timestamp_begin:].logsumexp(dim=-1)
    max_text_logprob = logprobs[:, :timestamp_begin].amax(dim=-1)
    logits.masked_fill_((timestamp_logprob > max_text_logprob)[:, None] & (columns < timestamp_begin),
                        float("-inf"))


def build_logit_filters(tokenizer, sample_begin: int, suppress: str | Iterable[int] | None = "-1",
                        blank: bool = True, timestamps: bool = True,
                        max_initial_timestamp_index: int | None = 50) -> list[LogitFilter]:
    """The filters of one decoding call, in whisper.decoding's order: SuppressBlank (if `blank`),
    SuppressTokens (if `suppress`), ApplyTimestampRules (if `timestamps`). max_initial_timestamp_index is in
    timestamp steps (50 = 1.0 s at 0.02 s a step)."""
    filters: list[LogitFilter] = []
    if blank:
        filters.append(partial(suppress_blank, sample_begin=sample_begin,
                               blank_ids=tokenizer.encode(" ") + [tokenizer.eot]))
    if suppress:
        filters.append(partial(suppress_tokens, ids=suppress_token_ids(tokenizer, suppress)))
    if timestamps:
        filters.append(partial(apply_timestamp_rules, sample_begin=sample_begin,
                               timestamp_begin=tokenizer.timestamp_begin, eot=tokenizer.eot,
                               no_timestamps=tokenizer.no_timestamps,
                               max_initial_timestamp_index=max_initial_timestamp_index))
    return filters
