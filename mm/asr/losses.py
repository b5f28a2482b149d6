"""ASR losses, pure functions of tensors: the decoder's label-smoothed cross-entropy and the encoder's CTC."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def label_smoothed_ce(logits: Tensor, targets: Tensor, loss_mask: Tensor | None = None, smoothing: float = 0.0,
                      reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits [B, L, V] against next tokens targets [B, L], over the positions where
    loss_mask [B, L] is True (None: all). A `smoothing` share of each target's probability is spread
    uniformly over all V tokens (F.cross_entropy's label_smoothing). "mean" divides by the number of counted
    tokens; "sum" leaves that to the caller (to average over all ranks' tokens). Masked positions may hold
    any target id. Computed in float32, without a host sync."""
    if loss_mask is None:
        loss_mask = torch.ones_like(targets, dtype=torch.bool)
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.masked_fill(~loss_mask, 0).flatten(),
                                label_smoothing=smoothing, reduction="none")
    total = (per_token * loss_mask.flatten()).sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
    return total / loss_mask.sum().clamp(min=1)


def ctc_loss(ctc_logits: Tensor, enc_mask: Tensor | None, targets: Tensor | Sequence[Sequence[int]],
             target_lengths: Tensor | Sequence[int] | None = None, blank: int | None = None) -> Tensor:
    """CTC loss of the encoder's per-frame logits [B, T', V + 1] (Whisper.ctc_head's), blank = the last class
    unless given. enc_mask [B, T'] bool True at valid frames (None: all). targets: a padded LongTensor [B, S]
    with target_lengths [B] (padding may hold any value), or one list of token ids per sample (lengths then
    implied). Returns F.ctc_loss's "mean": each sample's loss divided by its target length, averaged over
    the batch. A sample whose frames are too few for its target (CTC needs at least one frame per token, more
    for repeats) would be infinite; it counts as 0 instead (zero_infinity) so it cannot wreck a step."""
    batch, n_frames, n_classes = ctc_logits.shape
    blank = n_classes - 1 if blank is None else blank
    device = ctc_logits.device
    if not isinstance(targets, Tensor):
        target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
        width = max(int(target_lengths.max()), 1) if batch else 1
        targets = torch.tensor([list(t) + [0] * (width - len(t)) for t in targets], dtype=torch.long)
    if target_lengths is None:
        raise ValueError("ctc_loss: padded targets need target_lengths")
    target_lengths = torch.as_tensor(target_lengths, dtype=torch.long, device=device)
    targets = targets.to(device)
    valid = torch.arange(targets.shape[1], device=device)[None, :] < target_lengths[:, None]
    targets = targets.masked_fill(~valid, 0)  # padding like -100 would be out of range for the kernels
    input_lengths = (enc_mask.sum(1) if enc_mask is not None
                     else torch.full((batch,), n_frames, dtype=torch.long, device=device))
    log_probs = F.log_softmax(ctc_logits.float(), dim=-1).transpose(0, 1)  # [T', B, V + 1], as F.ctc_loss wants
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=blank, reduction="mean",
                      zero_infinity=True)
