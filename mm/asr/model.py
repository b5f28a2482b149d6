"""A Whisper encoder-decoder laid out exactly like openai/whisper's model.py (same module and parameter names,
so an OpenAI state dict loads as is), plus what training on short utterances needs:

- a variable-length encoder: mel of any length up to 2 * n_audio_ctx frames, with per-sample lengths, whose
  output for a sample's valid frames does not depend on how much padding its batch has;
- a decoder whose cross-attention skips padded audio frames, and an explicit KV cache (no forward hooks);
- an optional CTC head on the encoder (`Whisper(dims, ctc=True)`; blank = its last class).

Attention is `F.scaled_dot_product_attention`; its default 1/sqrt(d_head) scale equals Whisper's
d_head^-0.25 applied to both q and k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelDimensions:
    """openai-whisper's fields, in its order: `asdict(dims)` is what an OpenAI checkpoint stores as "dims"."""
    n_mels: int
    n_audio_ctx: int  # encoder positions: the longest mel is 2 * n_audio_ctx frames (1500 -> 30 s at 100 frames/s)
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int  # decoder positions: prompt + generated tokens
    n_text_state: int
    n_text_head: int
    n_text_layer: int


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> Tensor:
    """[length, channels] sinusoidal positions, sin half then cos half (openai-whisper's formula)."""
    assert channels % 2 == 0
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[B] lengths -> [B, max_len] bool, True at valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def conv_output_lengths(mel_lengths: Tensor) -> Tensor:
    """Encoder frames per sample for `mel_lengths` mel frames: conv2 (stride 2, padding 1) gives ceil(T / 2)."""
    return (mel_lengths + 1) // 2


class KVCache:
    """Keys and values of earlier decoder calls, so each new token costs one position, not the whole prefix.

    `layers[i]` holds block i's tensors, each [B, *, n_text_state]: "self_k"/"self_v" grow by the tokens of
    every call; "cross_k"/"cross_v" are projected from the audio once, on the first call. `offset` is how many
    tokens were decoded so far: the position of the next one. A new cache is empty: `KVCache()`.
    """

    def __init__(self):
        self.layers: list[dict[str, Tensor]] = []
        self.offset = 0

    def layer(self, i: int) -> dict[str, Tensor]:
        while len(self.layers) <= i:
            self.layers.append({})
        return self.layers[i]

    def select_rows(self, rows: Tensor) -> None:
        """Keep only batch rows `rows` (LongTensor of indices), e.g. to drop finished samples while decoding."""
        self.layers = [{k: v[rows] for k, v in layer.items()} for layer in self.layers]


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # a key bias only shifts each query's scores uniformly
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: Tensor, xa: Tensor | None = None, mask: Tensor | None = None,
                cache: dict[str, Tensor] | None = None, is_causal: bool = False) -> Tensor:
        """x [B, L, D] attends to itself (xa None) or to xa [B, S, D]. mask: bool, broadcastable to
        [B, n_head, L, S], True = may attend. cache: this block's KVCache entry; self-attention appends its new
        keys/values to it, cross-attention reads them from it once they are there. Returns [B, L, D]."""
        q = self.query(x)
        if xa is None:
            k, v = self.key(x), self.value(x)
            if cache is not None:
                if "self_k" in cache:
                    k, v = torch.cat([cache["self_k"], k], dim=1), torch.cat([cache["self_v"], v], dim=1)
                cache["self_k"], cache["self_v"] = k, v
        elif cache is not None and "cross_k" in cache:
            k, v = cache["cross_k"], cache["cross_v"]
        else:
            k, v = self.key(xa), self.value(xa)
            if cache is not None:
                cache["cross_k"], cache["cross_v"] = k, v
        q, k, v = (t.view(*t.shape[:2], self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        return self.out(out.transpose(1, 2).flatten(2))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, optional cross-attention, GELU MLP of width 4 * n_state."""

    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: Tensor, xa: Tensor | None = None, mask: Tensor | None = None, is_causal: bool = False,
                xa_mask: Tensor | None = None, cache: dict[str, Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.attn_ln(x), mask=mask, cache=cache, is_causal=is_causal)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), xa, mask=xa_mask, cache=cache)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        # He init: with PyTorch's default the front end's output (std ~0.04 on Whisper log-mels) is drowned by
        # the sinusoidal positions (std ~0.6) it is added to, and from scratch the encoder takes hundreds of
        # steps to hear anything; at ~0.4 it learns at once. (Loading a checkpoint overwrites all this.)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))  # persistent: OpenAI stores it
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, mel: Tensor, mel_lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """mel [B, n_mels, T] log-mel, T <= 2 * n_ctx; mel_lengths [B] valid frames per sample (None: all T).
        Returns (x [B, T', n_state], mask [B, T'] bool True at valid frames, or None without mel_lengths),
        T' = ceil(T / 2).

        Frames past a sample's length may hold anything (the collate pads with 0): they are zeroed here, the
        value conv1's own zero padding gives, then conv1's outputs there are zeroed again before conv2 and
        padded frames are masked as keys. So a sample's valid outputs equal those of it encoded alone."""
        mel = mel.to(self.conv1.weight.dtype)  # a model cast to bf16/fp16 takes fp32 log-mel (an fp32 model: no-op)
        n_frames = (mel.shape[-1] + 1) // 2
        if n_frames > self.positional_embedding.shape[0]:
            raise ValueError(f"mel of {mel.shape[-1]} frames gives {n_frames} encoder positions, more than "
                             f"n_audio_ctx={self.positional_embedding.shape[0]} (at most "
                             f"{2 * self.positional_embedding.shape[0]} mel frames)")
        mask = attn_mask = None
        if mel_lengths is not None:
            shortest, longest = mel_lengths.aminmax()
            if int(shortest) < 1 or int(longest) > mel.shape[-1]:
                raise ValueError(f"mel_lengths must lie in [1, {mel.shape[-1]}], got {mel_lengths.tolist()}")
            if int(shortest) == mel.shape[-1]:  # nothing padded (e.g. every input padded to 30 s): masks cost ~8%
                mel_lengths = None
        if mel_lengths is not None:
            frame_mask = lengths_to_mask(mel_lengths, mel.shape[-1])[:, None, :]  # [B, 1, T]
            mel = mel.masked_fill(~frame_mask, 0)
            x = F.gelu(self.conv1(mel)).masked_fill(~frame_mask, 0)
            mask = lengths_to_mask(conv_output_lengths(mel_lengths), n_frames)
            attn_mask = mask[:, None, None, :]  # padded frames are never keys; as queries they are ignored
        else:
            x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positional_embedding[:n_frames].to(x.dtype)
        for block in self.blocks:
            x = block(x, mask=attn_mask)
        return self.ln_post(x), mask


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        # It is also the output projection: nn.Embedding's std 1 would start training at logits of std
        # ~sqrt(n_state); 0.02 (Hugging Face's init_std) starts near the uniform distribution.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        nn.init.normal_(self.positional_embedding, std=0.01)  # OpenAI leaves it empty: it always loads weights
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head, cross_attention=True)
                                     for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_state)

    def forward(self, tokens: Tensor, xa: Tensor, xa_mask: Tensor | None = None,
                kv_cache: KVCache | None = None) -> Tensor:
        """tokens [B, L] following the kv_cache's `offset` earlier ones (0 without a cache); xa [B, T', D] audio
        features; xa_mask [B, T'] bool True at valid frames (None: all valid). Returns float logits
        [B, L, n_vocab], the output projection tied to token_embedding. Advances kv_cache.offset by L."""
        offset = kv_cache.offset if kv_cache is not None else 0
        n_tokens = tokens.shape[1]
        if offset + n_tokens > self.positional_embedding.shape[0]:
            raise ValueError(f"{offset} cached + {n_tokens} new tokens exceed n_text_ctx="
                             f"{self.positional_embedding.shape[0]}")
        x = self.token_embedding(tokens) + self.positional_embedding[offset:offset + n_tokens]
        x = x.to(xa.dtype)
        # Causal: new token i (position offset + i) sees cached keys and new keys up to itself. Without a prefix
        # SDPA's own is_causal does it; with one, its top-left alignment would be wrong, so the mask is explicit.
        mask, is_causal = None, offset == 0 and n_tokens > 1
        if offset > 0 and n_tokens > 1:
            mask = torch.ones(n_tokens, offset + n_tokens, dtype=torch.bool, device=x.device).tril(offset)
        cross_mask = xa_mask[:, None, None, :] if xa_mask is not None else None
        for i, block in enumerate(self.blocks):
            cache = kv_cache.layer(i) if kv_cache is not None else None
            x = block(x, xa, mask=mask, is_causal=is_causal, xa_mask=cross_mask, cache=cache)
        if kv_cache is not None:
            kv_cache.offset += n_tokens
        x = self.ln(x)
        return (x @ self.token_embedding.weight.to(x.dtype).T).float()  # float: softmax and loss over ~52k tokens


class WhisperOutput(NamedTuple):
    logits: Tensor  # [B, L, n_vocab] float
    audio_features: Tensor  # [B, T', n_audio_state]
    audio_mask: Tensor | None  # [B, T'] bool, True at valid frames; None without mel_lengths
    ctc_logits: Tensor | None  # [B, T', n_vocab + 1], blank = n_vocab; None without a CTC head


class Whisper(nn.Module):
    """AudioEncoder + TextDecoder. With `ctc=True`, `ctc_head` maps encoder frames to ctc_vocab + 1 classes, the
    last (index ctc_vocab) being the CTC blank; it is not part of OpenAI's or Hugging Face's formats."""

    def __init__(self, dims: ModelDimensions, ctc: bool = False, ctc_vocab: int | None = None):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                    dims.n_audio_layer)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                   dims.n_text_layer)
        # ctc_vocab: the token ids the head covers, 0..ctc_vocab-1 (default n_vocab). Text tokens are enough:
        # Whisper's 1.6k special and timestamp tokens come after them, and a from-scratch CPU model's head
        # is then 2.6x smaller.
        self.ctc_head = nn.Linear(dims.n_audio_state, (ctc_vocab or dims.n_vocab) + 1) if ctc else None

    @property
    def ctc_blank(self) -> int:
        return self.ctc_head.out_features - 1

    def embed_audio(self, mel: Tensor, mel_lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """-> (audio_features [B, T', n_audio_state], audio_mask [B, T'] or None); see AudioEncoder.forward."""
        return self.encoder(mel, mel_lengths)

    def logits(self, tokens: Tensor, audio_features: Tensor, audio_mask: Tensor | None = None,
               kv_cache: KVCache | None = None) -> Tensor:
        """-> [B, L, n_vocab] float; see TextDecoder.forward."""
        return self.decoder(tokens, audio_features, audio_mask, kv_cache)

    def forward(self, mel: Tensor, tokens: Tensor, mel_lengths: Tensor | None = None,
                return_encoder: bool = False) -> Tensor | WhisperOutput:
        """mel [B, n_mels, T], tokens [B, L], mel_lengths [B] or None -> logits [B, L, n_vocab]; with
        `return_encoder`, a WhisperOutput that adds the encoder's output, its mask and the CTC head's logits
        (computed here, inside forward, so that DDP/FSDP see the head used)."""
        audio_features, audio_mask = self.encoder(mel, mel_lengths)
        logits = self.decoder(tokens, audio_features, audio_mask)
        if not return_encoder:
            return logits
        ctc_logits = self.ctc_head(audio_features).float() if self.ctc_head is not None else None
        return WhisperOutput(logits, audio_features, audio_mask, ctc_logits)


# ---------------------------------------------------------------- named sizes

MULTILINGUAL_VOCAB = 51865  # tiny ... large-v2; large-v3 adds one language token: 51866


def _dims(n_mels, n_vocab, state, head, enc_layers, dec_layers, n_audio_ctx=1500, n_text_ctx=448):
    return ModelDimensions(n_mels=n_mels, n_audio_ctx=n_audio_ctx, n_audio_state=state, n_audio_head=head,
                           n_audio_layer=enc_layers, n_vocab=n_vocab, n_text_ctx=n_text_ctx, n_text_state=state,
                           n_text_head=head, n_text_layer=dec_layers)


# The official sizes (multilingual), n_vocab and n_mels replaceable to train the architecture from scratch.
def tiny(n_vocab: int | None = None, n_mels: int | None = None) -> ModelDimensions:  # 39M
    return _dims(n_mels or 80, n_vocab or MULTILINGUAL_VOCAB, 384, 6, 4, 4)


def base(n_vocab: int | None = None, n_mels: int | None = None) -> ModelDimensions:  # 74M
    return _dims(n_mels or 80, n_vocab or MULTILINGUAL_VOCAB, 512, 8, 6, 6)


def small(n_vocab: int | None = None, n_mels: int | None = None) -> ModelDimensions:  # 244M
    return _dims(n_mels or 80, n_vocab or MULTILINGUAL_VOCAB, 768, 12, 12, 12)


def medium(n_vocab: int | None = None, n_mels: int | None = None) -> ModelDimensions:  # 769M
    return _dims(n_mels or 80, n_vocab or MULTILINGUAL_VOCAB, 1024, 16, 24, 24)


def large_v2(n_vocab: int | None = None, n_mels: int | None = None) -> ModelDimensions:  # 1550M (also large-v1)
    return _dims(n_mels or 80, n_vocab or MULTILINGUAL_VOCAB, 1280, 20, 32, 32)


def large_v3(n_vocab: int | None = None, n_mels: int | None = None) -> ModelDimensions:  # 1550M
    return _dims(n_mels or 128, n_vocab or MULTILINGUAL_VOCAB + 1, 1280, 20, 32, 32)


def large_v3_turbo(n_vocab: int | None = None, n_mels: int | None = None) -> ModelDimensions:  # 809M
    return _dims(n_mels or 128, n_vocab or MULTILINGUAL_VOCAB + 1, 1280, 20, 32, 4)


# Our CPU sizes, for tests and small runs: meant for a tokenizer of our own, so n_vocab is usually given.
def cpu_tiny(n_vocab: int | None = None, n_mels: int | None = None) -> ModelDimensions:  # 0.29M + 64 * n_vocab
    return _dims(n_mels or 80, n_vocab or 256, 64, 2, 2, 2)


def cpu_small(n_vocab: int | None = None, n_mels: int | None = None) -> ModelDimensions:  # 1.73M at n_vocab 2109 (+64k CTC head)
    return _dims(n_mels or 80, n_vocab or 1024, 128, 4, 4, 2)


SIZES = {"tiny": tiny, "base": base, "small": small, "medium": medium, "large_v2": large_v2,
         "large_v3": large_v3, "large_v3_turbo": large_v3_turbo, "cpu_tiny": cpu_tiny, "cpu_small": cpu_small}


def dims_for(name: str, n_vocab: int | None = None, n_mels: int | None = None) -> ModelDimensions:
    """The dims of size `name` (a key of SIZES), with n_vocab / n_mels replaced where given."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}")
    return SIZES[name](n_vocab, n_mels)


def count_parameters(model_or_dims: nn.Module | ModelDimensions, trainable_only: bool = False) -> int:
    """Parameters of a model (the tied embedding once, buffers not at all). Given dims, the model is built on
    the meta device: no memory, no time, any size."""
    model = model_or_dims
    if isinstance(model_or_dims, ModelDimensions):
        with torch.device("meta"):
            model = Whisper(model_or_dims)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
