"""The vision-language model by composition: vision tower -> projector -> causal LM (LLaVA, nanoVLM).

The token sequence holds `tokens_per_image` copies of the <image> id per image; forward overwrites the
embeddings at those positions with the projected image features, images in order of appearance. With
static_image_tokens those positions keep the projected features through every LM layer (StaticImageStates).

Batches come in two layouts, both exact:
- packed (the default for training): ONE row [1, sum T_i] of concatenated samples, position_ids restarting at 0
  for each sample, attention_mask=None, use_cache=False. No padding is computed; with the LM's attention set to
  "mm_varlen" (mm.vlm.attention) no [T, T] mask either, each sample attends within its own slice.
- padded (kept for comparison and generation): [B, max T_i], right padding, attention_mask.
Losses are sums with their token counts (lm_loss), so a per-token mean stays exact across packs and accumulation.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mm.checkpoint import atomic_write
from mm.optim import no_decay_names
from mm.vlm.lm import add_image_token
from mm.vlm.vision import VisionTower, build_vision_tower

IGNORE_INDEX = -100  # label of a position that is not a target (prompt, image, pad, a sample's first token)
VLM_CONFIG = "vlm_config.json"
VLM_WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------- projector
def pixel_shuffle(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """[n, N, D] -> [n, N / factor^2, D * factor^2]: each factor x factor block of the square token grid becomes one
    token (nanoVLM / SmolVLM), so the LM reads factor^2 fewer image tokens for the same pixels."""
    n, count, dim = tokens.shape
    side = math.isqrt(count)
    if side * side != count or side % factor:
        raise ValueError(f"pixel shuffle by {factor} needs a square token grid with a side divisible by {factor}; "
                         f"the vision tower gives {count} tokens")
    cells = side // factor
    grid = tokens.reshape(n, cells, factor, cells, factor, dim).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, cells * cells, factor * factor * dim)


def grid_positions(count: int, dim: int) -> torch.Tensor:
    """[count, dim] fixed 2-D sine/cosine features of a square token grid (row-major), in the spirit of DETR's for
    its ResNet map: x and y each at dim / 4 frequencies (pi, 2 pi, 4 pi, ...) of the cell centre in [0, 1]. On a small
    grid the highest ones repeat (on 4 x 4, 8 pi is the same in every cell); kept so, as measured (RESULTS.md)."""
    side = math.isqrt(count)
    if side * side != count or dim % 4:
        raise ValueError(f"grid positions need a square token grid and a dim divisible by 4; got {count} tokens, "
                         f"dim {dim} (the recipe's --image_positions=0 turns them off)")
    centre = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    y, x = (c.reshape(-1, 1) for c in torch.meshgrid(centre, centre, indexing="ij"))
    angles = math.pi * 2.0 ** torch.arange(dim // 4, dtype=torch.float32)
    return torch.cat([(x * angles).sin(), (x * angles).cos(), (y * angles).sin(), (y * angles).cos()], dim=1)


class Projector(nn.Module):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear from vision width to LM width, after an optional pixel
    shuffle. forward(tokens [n, N, in_dim]) -> [n, N / factor^2, out_dim].

    position_dim > 0 appends grid_positions to each token before the MLP. A ViT's patch tokens carry their place
    (its position embedding is added at the input), but a convnet's feature map does not, and the LM's RoPE only
    weighs attention by distance, never puts a place into what it reads: without them, "where is the star?" has
    no answer in the LM's input. DETR adds the same kind of fixed features to its ResNet map."""

    def __init__(self, in_dim: int, out_dim: int, pixel_shuffle: int = 1, position_dim: int = 0):
        super().__init__()
        self.in_dim, self.out_dim, self.factor, self.position_dim = in_dim, out_dim, pixel_shuffle, position_dim
        self.net = nn.Sequential(nn.Linear(in_dim * pixel_shuffle ** 2 + position_dim, out_dim), nn.GELU(),
                                 nn.Linear(out_dim, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.factor > 1:
            tokens = pixel_shuffle(tokens, self.factor)
        if self.position_dim:
            places = grid_positions(tokens.shape[1], self.position_dim).to(tokens)
            tokens = torch.cat([tokens, places.expand(tokens.shape[0], -1, -1)], dim=-1)
        return self.net(tokens)

    def describe(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "pixel_shuffle": self.factor,
                "position_dim": self.position_dim}


# ---------------------------------------------------------------- static image tokens


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's transformer blocks: the first ModuleList of config.num_hidden_layers modules in it (Llama's
    model.layers, GPT-2's transformer.h), through a peft wrapper too."""
    n = lm.config.num_hidden_layers
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(lm).__name__}: no list of its {n} decoder layers found")


class StaticImageStates:
    """A forward hook for each decoder layer that puts the image positions' hidden states back to the projector's
    output (`set` before the LM runs). Text then reads an image through each layer's keys and values of the same
    vectors, and the LM's layers never transform the image tokens themselves. ShortV (Yuan et al. 2025) freezes
    them in the layers where updating them does not help; Flamingo's cross-attention reads fixed image features at
    every layer. A hook, not a layer of our own, because the LM is any transformers causal LM.

    Why (benchmarks/RESULTS.md): the tiny LM trained from scratch learnt, in its per-token layers, image features
    tied to the colour-shape pairs it trained on, and misread pairs it never saw, although a linear probe of its
    own input read them. Kept static, the tokens are read through linear maps at every layer: VQA on the built-in
    data's held-out split rose from a mean of 0.818 to 0.853 over five seeds. A pretrained LM's layers expect to
    process the image tokens, as LLaVA trains them to, so the recipe keeps this off for one."""

    def __init__(self):
        self.is_image = self.embeds = None

    def set(self, is_image: torch.Tensor | None, embeds: torch.Tensor | None) -> None:
        self.is_image, self.embeds = is_image, embeds

    def __call__(self, module, args, output):
        if self.is_image is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[:2] != self.is_image.shape:  # a decoding step after the prompt: no image positions in it
            return None
        hidden = torch.where(self.is_image.unsqueeze(-1), self.embeds.to(hidden.dtype), hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __deepcopy__(self, memo):  # a copied model gets its own, empty (a non-leaf tensor cannot be deep-copied)
        return StaticImageStates()


# ---------------------------------------------------------------- the model
class VisionLanguageModel(nn.Module):
    """vision tower + projector + causal LM. `lm` is any transformers causal LM (or a peft model wrapping one)."""

    def __init__(self, vision: VisionTower, projector: Projector, lm: nn.Module, image_token_id: int,
                 static_image_tokens: bool = False):
        super().__init__()
        self.vision, self.projector, self.lm = vision, projector, lm
        self.image_token_id = int(image_token_id)
        self.tokens_per_image = vision.num_tokens // projector.factor ** 2
        self.image_states, self.static_image_tokens = StaticImageStates(), False
        self.set_static_image_tokens(static_image_tokens)

    def set_static_image_tokens(self, enabled: bool) -> None:
        """Image positions keep the projector's output through every LM layer (StaticImageStates), or not.
        The hook is found by identity, not kept as a handle: a deep copy of the model copies it with the layers."""
        if enabled == self.static_image_tokens:
            return
        for layer in decoder_layers(self.lm):
            if enabled:
                layer.register_forward_hook(self.image_states)
            else:
                for key in [k for k, hook in layer._forward_hooks.items() if hook is self.image_states]:
                    del layer._forward_hooks[key]
        self.static_image_tokens = bool(enabled)

    def _run_lm(self, input_ids: torch.Tensor, embeds: torch.Tensor, call):
        """call() with the image states set for the static-image hooks. They stay set after a forward that
        backward will recompute (gradient checkpointing reruns the layers and their hooks), else are dropped."""
        if not self.static_image_tokens:
            return call()
        self.image_states.set(input_ids == self.image_token_id, embeds)
        try:
            return call()
        finally:
            if not (torch.is_grad_enabled() and getattr(self.lm, "is_activation_checkpointing", False)):
                self.image_states.set(None, None)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images, tokens_per_image, lm hidden]."""
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """[B, T] ids (+ images) -> [B, T, hidden] LM input embeddings with image features at <image> positions."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if int(is_image.sum()) != n_images * self.tokens_per_image:
            raise ValueError(f"the batch has {int(is_image.sum())} <image> tokens but {n_images} images x "
                             f"{self.tokens_per_image} tokens per image: each image needs exactly "
                             f"{self.tokens_per_image} consecutive <image> tokens")
        if n_images == 0:
            return embeds
        features = self.embed_images(pixel_values).to(embeds.dtype)
        # masked_scatter fills positions in row-major order: images in the order they appear in the batch
        return embeds.masked_scatter(is_image.unsqueeze(-1), features)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, use_cache: bool = False,
                logits_to_keep: int | torch.Tensor = 0):
        """input_ids [B, T], pixel_values [n_images, 3, H, W] | None, labels [B, T] (IGNORE_INDEX where not a target)
        -> (logits [B, T, vocab], loss: mean over target tokens, or None without labels).

        logits_to_keep: as transformers' (0: every position); a 1-D tensor of positions, e.g. loss_positions(labels),
        gives logits [B, K, vocab] at those positions only, and the loss is computed from them."""
        check_packed_arguments(position_ids, attention_mask, use_cache)
        if labels is not None and not torch.is_tensor(logits_to_keep) and logits_to_keep != 0:
            raise ValueError("with labels, logits_to_keep is 0 (every position) or a 1-D tensor of positions "
                             "(loss_positions(labels)), not a count of last positions")
        embeds = self.embed(input_ids, pixel_values)
        out = self._run_lm(input_ids, embeds, lambda: self.lm(
            inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, use_cache=use_cache,
            logits_to_keep=logits_to_keep))
        if labels is None:
            return out.logits, None
        positions = logits_to_keep if torch.is_tensor(logits_to_keep) else None
        total, count = lm_loss(out.logits, labels, positions)
        return out.logits, total / count.clamp(min=1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Left-padded prompts [B, T] (+ their images) -> new token ids [B, T_new] (transformers' generate with
        inputs_embeds returns only the continuation)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, pixel_values)
        return self._run_lm(input_ids, embeds, lambda: self.lm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs))


def build_vlm(vision: VisionTower, lm: nn.Module, tokenizer, pixel_shuffle: int = 1,
              position_dim: int = 0, static_image_tokens: bool = False) -> VisionLanguageModel:
    """Compose a new model: registers <image> in the tokenizer (growing the LM's embeddings if needed) and makes
    a freshly initialised projector from the tower's width to the LM's. static_image_tokens: StaticImageStates."""
    if position_dim:  # a grid that cannot take them fails here, not at the first batch
        grid_positions(vision.num_tokens // pixel_shuffle ** 2, position_dim)
    image_token_id = add_image_token(lm, tokenizer)
    projector = Projector(vision.out_dim, lm.get_input_embeddings().embedding_dim, pixel_shuffle, position_dim)
    return VisionLanguageModel(vision, projector, lm, image_token_id, static_image_tokens)


def is_packed(position_ids: torch.Tensor | None) -> bool:
    """Whether position_ids restart inside a row, i.e. several samples share it."""
    return position_ids is not None and bool((position_ids[..., 1:] - position_ids[..., :-1] != 1).any())


def check_packed_arguments(position_ids, attention_mask, use_cache: bool) -> None:
    """Refuse the packed layouts that silently attend across samples.

    We rely on transformers 5.23 masking_utils: create_causal_mask -> _preprocess_mask_arguments calls
    find_packed_sequence_indices(position_ids) only when `attention_mask is None and past_key_values is None`;
    the resulting packed_sequence_mask keeps each query inside its own sample (sdpa and eager alike; mm_varlen
    reads the same position ids and falls back to sdpa when a mask is given). Any 2-D mask,
    even all ones, or use_cache=True (the model then creates a DynamicCache) skips that detection, and every
    sample attends to the samples before it in the row.
    """
    if not is_packed(position_ids):
        return
    if attention_mask is not None:
        raise ValueError("packed batch (position_ids restart at 0): pass attention_mask=None. transformers only "
                         "separates packed samples when no 2-D mask is given; a mask lets them attend to each other")
    if use_cache:
        raise ValueError("packed batch (position_ids restart at 0): use_cache=True makes a KV cache, which turns off "
                         "transformers' packed-sample detection; train with use_cache=False")


# ---------------------------------------------------------------- batches
def _ids(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1)


def _images(samples: list[dict]) -> torch.Tensor | None:
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None and len(s["pixel_values"])]
    return torch.cat(images) if images else None


def pack_batch(samples: list[dict]) -> dict:
    """Samples {"input_ids": [T_i], "labels": [T_i], "pixel_values": [n_i, 3, H, W] | None} -> one packed row:
    input_ids, labels, position_ids (0..T_i-1 per sample) and sample_index (which sample each token is), all
    [1, sum T_i], and pixel_values [sum n_i, 3, H, W] | None.

    Labels follow transformers' convention (logits at t predict labels at t+1), so the label at each sample's first
    position is set to IGNORE_INDEX: otherwise sample k's last token would learn to predict sample k+1's first.
    """
    ids, labels, positions, index = [], [], [], []
    for k, sample in enumerate(samples):
        sample_ids, sample_labels = _ids(sample["input_ids"]), _ids(sample["labels"]).clone()
        if len(sample_ids) != len(sample_labels) or len(sample_ids) == 0:
            raise ValueError(f"sample {k}: {len(sample_ids)} input_ids but {len(sample_labels)} labels")
        sample_labels[0] = IGNORE_INDEX
        ids.append(sample_ids), labels.append(sample_labels)
        positions.append(torch.arange(len(sample_ids))), index.append(torch.full_like(sample_ids, k))
    return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None], "sample_index": torch.cat(index)[None],
            "pixel_values": _images(samples)}


def pack_rows(samples: list[dict], row_tokens: int, pad_id: int) -> dict:
    """Samples packed into rows of up to `row_tokens` tokens (first fit, longest first), the rows then padded at
    their ends to the longest: input_ids / labels / position_ids / sample_index [R, L], pixel_values in row order.

    Why rows and not one long row: attention without a kernel for variable-length packs (SDPA on CPU, eager)
    costs the whole row's T^2 under a block-diagonal mask, so one 2,048-token row of 100-token samples costs
    ~20x the attention the samples need; rows a few samples long keep that small while padding stays a few
    percent. The end pads need no mask: their positions continue the row's last sample, and causal attention
    never lets an earlier (real) token see them; their labels are IGNORE_INDEX.
    """
    lengths = [len(_ids(s["input_ids"])) for s in samples]
    if max(lengths) > row_tokens:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit rows of {row_tokens}")
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(samples)), key=lambda k: -lengths[k]):
        r = next((r for r, left in enumerate(room) if left >= lengths[k]), None)
        if r is None:
            rows.append([]), room.append(row_tokens)
            r = len(rows) - 1
        rows[r].append(k)
        room[r] -= lengths[k]
    packs = [pack_batch([samples[k] for k in row]) for row in rows]
    width = max(p["input_ids"].shape[1] for p in packs)
    out = {"input_ids": [], "labels": [], "position_ids": [], "sample_index": []}
    offset = 0
    for pack in packs:
        pad = width - pack["input_ids"].shape[1]
        last_pos, last_index = int(pack["position_ids"][0, -1]), int(pack["sample_index"][0, -1]) + offset
        out["input_ids"].append(torch.cat([pack["input_ids"][0], torch.full((pad,), pad_id)]))
        out["labels"].append(torch.cat([pack["labels"][0], torch.full((pad,), IGNORE_INDEX)]))
        out["position_ids"].append(torch.cat([pack["position_ids"][0], torch.arange(last_pos + 1, last_pos + 1 + pad)]))
        out["sample_index"].append(torch.cat([pack["sample_index"][0] + offset, torch.full((pad,), last_index)]))
        offset = last_index + 1
    images = [p["pixel_values"] for p in packs if p["pixel_values"] is not None]
    return {k: torch.stack(v) for k, v in out.items()} | {
        "pixel_values": torch.cat(images) if images else None, "order": [k for row in rows for k in row]}


def pad_batch(samples: list[dict], pad_id: int) -> dict:
    """The padded layout of the same samples: input_ids / labels / attention_mask [B, max T_i], right padding,
    labels IGNORE_INDEX on pads; pixel_values as in pack_batch."""
    longest = max(len(_ids(s["input_ids"])) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for k, sample in enumerate(samples):
        sample_ids = _ids(sample["input_ids"])
        ids[k, :len(sample_ids)], labels[k, :len(sample_ids)] = sample_ids, _ids(sample["labels"])
        mask[k, :len(sample_ids)] = 1
    labels[:, 0] = IGNORE_INDEX  # never a target (nothing precedes it); the same rule as pack_batch
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": _images(samples)}


def unpack(values: torch.Tensor, sample_index: torch.Tensor) -> list[torch.Tensor]:
    """Split a packed [1, T, ...] tensor back into per-sample [T_i, ...] tensors."""
    counts = torch.bincount(sample_index.reshape(-1)).tolist()
    return list(values[0].split(counts))


# ---------------------------------------------------------------- losses
def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> the positions (1-D, the same for every row) whose logits score a target: t where any row has
    a label at t + 1. Pass it as logits_to_keep, and the LM's output layer runs on those positions only.

    Why: the output layer is a [hidden, vocab] matmul at every position, and in chat SFT most positions (prompt,
    image, system) are not targets. For SmolLM2 (a 49k vocabulary) on the built-in Q&A, computing it at the ~12%
    of positions that are targets makes a LoRA training step ~1.3x faster and stores no [T, vocab] logits."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor,
            positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy: logits [B, T, V], labels [B, T] -> (sum over target tokens (nats), their count).
    Divide the sums of all micro-batches by the sum of their counts for an exact per-token mean.

    positions: when the logits are only those at these positions ([B, K, V], from logits_to_keep=positions)."""
    targets = labels[:, 1:] if positions is None else labels[:, positions + 1]
    logits = logits[:, :-1] if positions is None else logits
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def batch_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated batch (packed or padded, mm.vlm.data) -> (summed target-token loss, target count), with the
    output layer run only at loss_positions. `model` is the VisionLanguageModel or its DDP/FSDP wrapper."""
    keep = loss_positions(batch["labels"])
    logits = model(batch["input_ids"], batch["pixel_values"], position_ids=batch.get("position_ids"),
                   attention_mask=batch.get("attention_mask"), logits_to_keep=keep)[0]
    return lm_loss(logits, batch["labels"], keep)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                      sample_index: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of target-token log-probs per sample (for DPO): logits [B, T, V], labels [B, T] -> [n_samples].

    sample_index [B, T]: which sample each token belongs to (pack_batch gives it); None means one sample per row.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    shifted = logits[:, :-1].float()
    picked = shifted.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logprobs = (picked - shifted.logsumexp(-1)) * valid
    if sample_index is None:
        return token_logprobs.sum(-1)
    owners = sample_index[:, 1:].reshape(-1)
    sums = torch.zeros(int(sample_index.max()) + 1, dtype=token_logprobs.dtype, device=logits.device)
    return sums.index_add(0, owners, token_logprobs.reshape(-1))


# ---------------------------------------------------------------- training helpers
def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode (frozen BatchNorm statistics and no dropout)."""
    module.requires_grad_(False)
    return module.eval()


def param_groups(model: VisionLanguageModel, lr_lm: float, lr_projector: float, lr_vision: float,
                 weight_decay: float) -> list[dict]:
    """AdamW groups per part, each split into decayed matrices and exempt parameters (mm.optim.no_decay_names);
    frozen parameters and empty groups are left out. Each group carries a "name" for logging."""
    exempt = no_decay_names(model)
    groups = []
    for part, lr in (("vision", lr_vision), ("projector", lr_projector), ("lm", lr_lm)):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(part + ".") and p.requires_grad]
        for suffix, decay, chosen in (("", weight_decay, [p for n, p in params if n not in exempt]),
                                      ("_no_decay", 0.0, [p for n, p in params if n in exempt])):
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": decay, "name": part + suffix})
    return groups


def apply_lora(model: VisionLanguageModel, r: int = 16, alpha: int = 32,
               target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), dropout: float = 0.0) -> VisionLanguageModel:
    """Wrap the LM (only) in peft LoRA adapters; peft freezes the LM's own weights. The projector keeps training;
    the vision tower keeps whatever state it had (freeze it for LLaVA's recipe)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                        task_type="CAUSAL_LM")
    model.lm = get_peft_model(model.lm, config)
    return model


def set_gradient_checkpointing(model: VisionLanguageModel, enabled: bool) -> None:
    """Recompute the LM's activations in backward. Non-reentrant, so it works when the LM's inputs need no grad
    (frozen embeddings under LoRA) and with the image features scattered into inputs_embeds."""
    if enabled:
        model.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.lm.activation_checkpointing_disable()


# ---------------------------------------------------------------- save / load
def _plain_lm(lm: nn.Module) -> nn.Module:
    """The LM to save: LoRA adapters merged into a copy (the training model keeps its adapters), else lm itself."""
    if hasattr(lm, "merge_and_unload"):
        return copy.deepcopy(lm).merge_and_unload()
    return lm


def save_vlm(model: VisionLanguageModel, tokenizer, out_dir: str | Path, extra_config: dict | None = None) -> Path:
    """Write out_dir/vlm_config.json + model.safetensors + the tokenizer files: everything load_vlm needs, with no
    reference to the original LM, tower weights or network. LoRA models are saved merged. vlm_config.json is
    written last, so a folder that has it is complete."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    lm = _plain_lm(model.lm)
    composite = VisionLanguageModel(model.vision, model.projector, lm, model.image_token_id)
    lm_config = {k: v for k, v in lm.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    config = {"format": "mm-vlm", "version": 1, "vision": model.vision.describe(),
              "projector": model.projector.describe(),
              "lm": {"config": lm_config, "attn_implementation": lm.config._attn_implementation,
                     "dtype": str(next(lm.parameters()).dtype).removeprefix("torch.")},
              "image_token_id": model.image_token_id, "tokens_per_image": model.tokens_per_image,
              "static_image_tokens": model.static_image_tokens,
              "image_size": model.vision.image_size, "mean": list(model.vision.mean), "std": list(model.vision.std),
              "extra": extra_config or {}}
    tokenizer.save_pretrained(out)
    # save_model drops the tied copy of shared tensors (LM input/output embeddings), which safetensors refuses
    atomic_write(out / VLM_WEIGHTS, lambda tmp: save_model(composite, tmp, metadata={"format": "pt"}))
    atomic_write(out / VLM_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1)))
    return out


def load_vlm(path: str | Path, device: str | torch.device = "cpu", attn_implementation: str | None = None):
    """(model in eval mode, tokenizer, config) from a save_vlm folder, in one call, offline."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import mm.vlm.attention  # noqa: F401  a model saved with "mm_varlen" needs it registered

    path = Path(path)
    if not (path / VLM_CONFIG).is_file():
        raise FileNotFoundError(f"{path}: no {VLM_CONFIG}; expected a folder written by mm.vlm.model.save_vlm")
    config = json.loads((path / VLM_CONFIG).read_text())
    vision = build_vision_tower(config["vision"])
    if (vision.num_tokens, vision.out_dim) != (config["vision"]["num_tokens"], config["vision"]["out_dim"]):
        raise ValueError(f"{path}: the rebuilt vision tower gives {vision.num_tokens} x {vision.out_dim} tokens, "
                         f"the saved one {config['vision']['num_tokens']} x {config['vision']['out_dim']}")
    lm_saved = config["lm"]
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**lm_saved["config"]),
                                          attn_implementation=attn_implementation or lm_saved["attn_implementation"])
    model = VisionLanguageModel(vision, Projector(**config["projector"]), lm.to(getattr(torch, lm_saved["dtype"])),
                                config["image_token_id"], config.get("static_image_tokens", False))
    load_model(model, path / VLM_WEIGHTS, strict=True, device=str(device))
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path), config
