"""Packed attention without a T x T mask: "mm_varlen", a transformers attention implementation.

mm.vlm packs samples into one row with position ids restarting at 0 per sample and no attention mask
(mm.vlm.model.pack_batch). transformers' sdpa and eager paths keep those samples apart by building a dense
block-diagonal [T, T] mask from the position ids, which costs the whole row's T^2 in memory and compute.
mm_varlen instead finds the sample boundaries in the position ids and runs causal SDPA on each sample's slice:
sum(L_i^2) work, no mask at all, the same numbers. Flash-attention's varlen kernel does the same on GPUs
(transformers' flash_attention_2 path gets cu_seqlens from the position ids the same way); this one runs anywhere.

    import mm.vlm.attention  # registers "mm_varlen" (load_lm and load_vlm import it)
    AutoModelForCausalLM.from_config(config, attn_implementation="mm_varlen")

Anything else goes to transformers' own sdpa function unchanged: a batch with an attention mask (padding),
cache and generation steps (fewer queries than keys), non-causal attention. For full causal attention only
(Llama, Qwen2, SmolLM2, ...): a sliding-window layer is refused rather than silently attended in full.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "mm_varlen"


def segment_starts(position_ids: torch.Tensor, batch: int) -> list[list[int]]:
    """position_ids [1 or B, T] -> per row, the index where each sample starts: wherever the position does not
    follow the previous one by 1 (the rule transformers' packed-sequence mask uses), and 0.
    [[0, 1, 2, 0, 1, 0]] -> [[0, 3, 5]]. One host sync for the whole batch."""
    positions = position_ids.expand(batch, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    rows, cols = starts.nonzero(as_tuple=True)
    out: list[list[int]] = [[] for _ in range(batch)]
    for row, col in zip(rows.tolist(), cols.tolist()):
        out[row].append(col)
    return out


_last_starts: tuple = (None, -1, 0, None)  # (weakref to a position_ids tensor, its _version, batch, its starts)


def cached_segment_starts(position_ids: torch.Tensor, batch: int) -> list[list[int]]:
    """segment_starts, computed once per forward instead of once per layer: every layer of one forward gets the
    same position_ids tensor, so the last answer is kept for that tensor object (held by a weak reference, and
    checked against its in-place version counter). On a GPU this saves a host sync per layer. Tensors made under
    torch.inference_mode() have no version counter, so they are looked at every time."""
    global _last_starts
    if position_ids.is_inference():
        return segment_starts(position_ids, batch)
    ref, version, rows, starts = _last_starts
    if ref is not None and ref() is position_ids and version == position_ids._version and rows == batch:
        return starts
    version = position_ids._version  # read first: a write during the search must not pair with these starts
    starts = segment_starts(position_ids, batch)
    _last_starts = (weakref.ref(position_ids), version, batch, starts)
    return starts


def attend_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, starts: list[list[int]],
                    dropout: float, scaling: float | None, gqa: bool) -> torch.Tensor:
    """Causal attention inside each segment only. query [B, H, T, D], key / value [B, H_kv, T, D], starts from
    segment_starts -> [B, T, H, D] (the layout transformers' attention functions return)."""
    backends = _without_cudnn() if query.is_cuda else []
    if backends:
        with sdpa_kernel(backends):
            return _attend_segments(query, key, value, starts, dropout, scaling, gqa)
    return _attend_segments(query, key, value, starts, dropout, scaling, gqa)


def _without_cudnn() -> list:
    """The SDPA backends the caller has enabled, less cuDNN's ([] when cuDNN is off already, or is all there is).

    Each segment length is a new shape, and cuDNN's kernel plans a graph for every one: on an H100 it trained a
    packed 0.5B LM at 2,417 tokens/s against 18,179 without it (benchmarks/RESULTS.md, "GPU: a ~0.5B LM with a
    ViT-B/16 tower"). Torch then picks flash (bf16/fp16; it takes grouped KV heads), else memory-efficient (not with
    grouped heads), else math. A caller's own choice, e.g. sdpa_kernel(SDPBackend.MATH), is kept."""
    cuda = torch.backends.cuda
    if not cuda.cudnn_sdp_enabled():
        return []
    return [backend for backend, enabled in ((SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
                                             (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
                                             (SDPBackend.MATH, cuda.math_sdp_enabled())) if enabled]


def _attend_segments(query, key, value, starts, dropout, scaling, gqa) -> torch.Tensor:
    # split, not a slice per segment: each slice's backward writes its gradient into a zeroed tensor of the whole
    # row, so n segments cost n full-row zero fills and adds; split's backward is one concatenation
    # (the built-in vision-chat run trains 7-14% more tokens/s with it on 2 CPU cores, benchmarks/RESULTS.md)
    length = query.shape[2]
    rows = []
    for b, (q, k, v) in enumerate(zip(*(t.split(1, dim=0) for t in (query, key, value)))):
        sizes = [e - s for s, e in zip(starts[b], starts[b][1:] + [length])]
        parts = [F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=scaling, is_causal=True,
                                                enable_gqa=gqa)
                 for qs, ks, vs in zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2))]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return (torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]).transpose(1, 2).contiguous()


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """The AttentionInterface signature: query [B, H, T, D], key / value [B, H_kv, S, D] -> ([B, T, H, D], None).
    Per-sample causal SDPA when the keys are exactly the queries' row and no mask is given; sdpa otherwise."""
    if getattr(module, "sliding_window", None) is not None:
        raise NotImplementedError(f"attn_implementation={ATTENTION_NAME!r} does full causal attention only; this model "
                                  f"has sliding-window layers: use 'sdpa'")
    position_ids = kwargs.get("position_ids")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if attention_mask is not None or not causal or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if position_ids is None:  # varlen_mask built no mask, so only the position ids can keep samples apart
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} needs the position ids in the attention call; "
                         f"{type(module).__name__} does not pass them: use 'sdpa'")
    starts = cached_segment_starts(position_ids, query.shape[0])
    if all(row == [0] for row in starts):  # nothing packed: one call for the whole batch, as sdpa does
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    return attend_segments(query, key, value, starts, dropout, scaling, gqa), None


def varlen_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
                local_size: int | None = None, use_vmap: bool = False, **kwargs) -> torch.Tensor | None:
    """The mask transformers builds for mm_varlen: none where varlen_attention_forward separates packed samples
    itself (no padding mask, as many keys as queries, plain causal), so no [T, T] block-diagonal mask is made;
    sdpa's mask otherwise (padding, cache steps; custom mask functions, which come with use_vmap)."""
    if attention_mask is None and q_length == kv_length and local_size is None and not use_vmap:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                     local_size=local_size, use_vmap=use_vmap, **kwargs)


def register_varlen_attention() -> None:
    """Register mm_varlen with transformers (idempotent). A custom attention name without a mask function of its
    own would get no mask at all, padding included, so the mask function is registered with it."""
    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, varlen_mask)


register_varlen_attention()
