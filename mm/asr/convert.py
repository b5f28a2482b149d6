"""Whisper checkpoints in and out, from local paths only: Hugging Face folders and OpenAI .pt files.

Our export IS these two formats, so a model trained here loads in plain transformers
(`WhisperForConditionalGeneration.from_pretrained(dir)`) and in plain openai-whisper (`whisper.load_model(path)`).
Neither format has a place for our CTC head: exports leave it out. Loading reads an OpenAI-style file holding
`ctc_head.*` too (our training checkpoints' model part), and then builds the model with the head.

Nothing is unpickled beyond tensors and plain containers: .pt and .bin files go through
mm.checkpoint.load_checkpoint (`torch.load(weights_only=True)`), safetensors through safetensors.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch

from mm.asr.model import ModelDimensions, Whisper
from mm.checkpoint import atomic_write, load_checkpoint

HF_CONFIG, HF_WEIGHTS, HF_INDEX, HF_BIN = "config.json", "model.safetensors", "model.safetensors.index.json", \
    "pytorch_model.bin"
HF_PREPROCESSOR = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "normalizer.json")

# Names inside a block (ours -> Hugging Face's), the inverse of transformers' convert_openai_to_hf.py.
_HF_BLOCK = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
             "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm",
             "cross_attn.query": "encoder_attn.q_proj", "cross_attn.key": "encoder_attn.k_proj",
             "cross_attn.value": "encoder_attn.v_proj", "cross_attn.out": "encoder_attn.out_proj",
             "cross_attn_ln": "encoder_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2",
             "mlp_ln": "final_layer_norm"}
_HF_TOP = {"encoder.positional_embedding": "encoder.embed_positions.weight",
           "decoder.positional_embedding": "decoder.embed_positions.weight",
           "decoder.token_embedding.weight": "decoder.embed_tokens.weight",
           "encoder.ln_post.weight": "encoder.layer_norm.weight", "encoder.ln_post.bias": "encoder.layer_norm.bias",
           "decoder.ln.weight": "decoder.layer_norm.weight", "decoder.ln.bias": "decoder.layer_norm.bias",
           **{f"encoder.{c}.{p}": f"encoder.{c}.{p}" for c in ("conv1", "conv2") for p in ("weight", "bias")}}
_BLOCK_NAME = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
HF_TIED_OUTPUT = "proj_out.weight"  # = model.decoder.embed_tokens.weight in every Whisper


def hf_name(name: str) -> str:
    """Our (= OpenAI's) parameter name -> Hugging Face's, e.g. encoder.blocks.0.mlp.0.weight ->
    model.encoder.layers.0.fc1.weight. KeyError for a name that has no counterpart (the CTC head)."""
    if m := _BLOCK_NAME.match(name):
        tower, i, part, kind = m.groups()
        if part in _HF_BLOCK:
            return f"model.{tower}.layers.{i}.{_HF_BLOCK[part]}.{kind}"
    elif name in _HF_TOP:
        return f"model.{_HF_TOP[name]}"
    raise KeyError(f"{name} has no Hugging Face Whisper counterpart")


# ---------------------------------------------------------------- loading

def load_whisper(path: str | Path, device: str | torch.device = "cpu") -> tuple[Whisper, ModelDimensions]:
    """(model in eval mode, dims) from a Hugging Face Whisper folder (config.json + model.safetensors, sharded
    model.safetensors.index.json, or pytorch_model.bin read with weights_only=True) or an OpenAI-style .pt
    file ({"dims": {...}, "model_state_dict": {...}}). Missing files, unknown or missing weights and shape
    mismatches are errors naming the file and the weight."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such Whisper checkpoint (a Hugging Face folder or an OpenAI .pt file)")
    if path.is_dir():
        dims, state, source = _read_hf(path)
    elif path.suffix == ".safetensors":
        raise ValueError(f"{path}: pass the Hugging Face folder holding it (with its config.json), not the file")
    else:
        dims, state, source = _read_openai(path)
    ctc = "ctc_head.weight" in state
    model = Whisper(dims, ctc=ctc, ctc_vocab=state["ctc_head.weight"].shape[0] - 1 if ctc else None)
    _load_state(model, state, source)
    return model.to(device).eval(), dims


def _read_openai(path: Path) -> tuple[ModelDimensions, dict[str, torch.Tensor], dict[str, str]]:
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"dims", "model_state_dict"} <= ckpt.keys():
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not an OpenAI Whisper checkpoint: it needs 'dims' and 'model_state_dict', "
                         f"found {found}")
    dims = ckpt["dims"]
    names = {f.name for f in fields(ModelDimensions)}
    if not isinstance(dims, dict) or set(dims) != names:
        raise ValueError(f"{path}: 'dims' must have exactly the fields {sorted(names)}, found "
                         f"{sorted(dims) if isinstance(dims, dict) else dims!r}")
    state = ckpt["model_state_dict"]
    return ModelDimensions(**{k: int(v) for k, v in dims.items()}), state, {k: f"{path}: {k}" for k in state}


def dims_from_hf_config(config_file: str | Path) -> ModelDimensions:
    """ModelDimensions of a Hugging Face WhisperConfig JSON; ValueError if it is not an architecture we can hold."""
    from transformers import WhisperConfig

    cfg = WhisperConfig.from_json_file(str(config_file))  # fills in the defaults a saved diff leaves out
    unsupported = {"encoder_ffn_dim": (cfg.encoder_ffn_dim, 4 * cfg.d_model),
                   "decoder_ffn_dim": (cfg.decoder_ffn_dim, 4 * cfg.d_model),
                   "activation_function": (cfg.activation_function, "gelu"),
                   "scale_embedding": (cfg.scale_embedding, False)}
    bad = [f"{k}={got!r} (we need {want!r})" for k, (got, want) in unsupported.items() if got != want]
    if bad:
        raise ValueError(f"{config_file}: a Whisper variant we do not build: {', '.join(bad)}")
    return ModelDimensions(n_mels=cfg.num_mel_bins, n_audio_ctx=cfg.max_source_positions, n_audio_state=cfg.d_model,
                           n_audio_head=cfg.encoder_attention_heads, n_audio_layer=cfg.encoder_layers,
                           n_vocab=cfg.vocab_size, n_text_ctx=cfg.max_target_positions, n_text_state=cfg.d_model,
                           n_text_head=cfg.decoder_attention_heads, n_text_layer=cfg.decoder_layers)


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / HF_WEIGHTS).is_file():
        return load_file(str(folder / HF_WEIGHTS))
    if (folder / HF_INDEX).is_file():
        shards = sorted(set(json.loads((folder / HF_INDEX).read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: {HF_INDEX} names shards that are not there: {missing}")
        return {k: v for s in shards for k, v in load_file(str(folder / s)).items()}
    if (folder / HF_BIN).is_file():
        return load_checkpoint(folder / HF_BIN)  # weights_only=True: a pickle that holds code is refused
    raise FileNotFoundError(f"{folder}: no weights: expected {HF_WEIGHTS}, {HF_INDEX} (sharded) or {HF_BIN}")


def _read_hf(folder: Path) -> tuple[ModelDimensions, dict[str, torch.Tensor], dict[str, str]]:
    if not (folder / HF_CONFIG).is_file():
        raise FileNotFoundError(f"{folder}: not a Hugging Face Whisper folder: it has no {HF_CONFIG}")
    dims = dims_from_hf_config(folder / HF_CONFIG)
    tensors = _read_hf_tensors(folder)
    if not any(k.startswith("model.") for k in tensors):  # saved from WhisperModel, not ...ForConditionalGeneration
        tensors = {k if k == HF_TIED_OUTPUT else f"model.{k}": v for k, v in tensors.items()}
    ours = _hf_to_ours(dims)
    if HF_TIED_OUTPUT in tensors:  # tied: a copy of the token embedding, unless someone untied it
        out, emb = tensors.pop(HF_TIED_OUTPUT), tensors.get("model.decoder.embed_tokens.weight")
        if emb is not None and not torch.equal(out, emb):
            raise ValueError(f"{folder}: {HF_TIED_OUTPUT} differs from model.decoder.embed_tokens.weight; an "
                             "untied output projection is not supported (Whisper ties them)")
    unknown = sorted(k for k in tensors if k not in ours)
    if unknown:
        raise ValueError(f"{folder}: weights we have no place for: {', '.join(unknown[:8])}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    return dims, {ours[k]: v for k, v in tensors.items()}, {v: f"{folder}: {k}" for k, v in ours.items()}


def _hf_to_ours(dims: ModelDimensions) -> dict[str, str]:
    """Hugging Face name -> ours, for every weight of a model of `dims` (names only: built on the meta device)."""
    with torch.device("meta"):
        names = list(Whisper(dims).state_dict())
    return {hf_name(k): k for k in names}


def _load_state(model: Whisper, state: dict[str, torch.Tensor], source: dict[str, str]) -> None:
    """Copy `state` (our names) into `model`; each error names the weight as the file calls it (`source`)."""
    expected = model.state_dict()
    unknown = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state)
    if unknown:
        raise ValueError(f"weights the model has no place for: {', '.join(source.get(k, k) for k in unknown[:8])}")
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {', '.join(source.get(k, k) for k in missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{source.get(k, k)}: shape {tuple(v.shape)}, but the model built from the checkpoint's "
                             f"dims needs {tuple(expected[k].shape)} for {k}")
    model.load_state_dict(state)  # copies into the model's float32 tensors, as whisper.load_model does


# ---------------------------------------------------------------- exporting

def _export_state(model: Whisper) -> dict[str, torch.Tensor]:
    """The state dict without the CTC head, which neither format can hold."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("ctc_head.")}


def export_openai(model: Whisper, path: str | Path) -> Path:
    """Write `{"dims": asdict(dims), "model_state_dict": ...}` atomically: what `whisper.load_model(path)` reads."""
    state = {"dims": asdict(model.dims), "model_state_dict": _export_state(model)}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def export_hf(model: Whisper, out_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
              decoder_start_token_id: int = 50258, eos_token_id: int = 50257, pad_token_id: int = 50257,
              bos_token_id: int = 50257, **config_kwargs) -> Path:
    """Write a Hugging Face Whisper folder: config.json (a WhisperConfig), model.safetensors (tied proj_out left
    out, as transformers itself saves it), preprocessor_config.json (WhisperFeatureExtractor for n_mels) and,
    from `tokenizer_dir`, the tokenizer's files. Each file is written atomically. The token ids default to
    multilingual Whisper's (<|startoftranscript|> 50258, <|endoftext|> 50257); a model with its own vocabulary
    must pass its own. `config_kwargs` go to WhisperConfig as is (e.g. suppress_tokens, begin_suppress_tokens,
    which default to None here since Hugging Face's defaults are GPT-2 token ids)."""
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor

    dims, out_dir = model.dims, Path(out_dir)
    if dims.n_audio_state != dims.n_text_state:
        raise ValueError(f"Hugging Face Whisper has one d_model; this model has n_audio_state={dims.n_audio_state} "
                         f"and n_text_state={dims.n_text_state}")
    ids = {"decoder_start_token_id": decoder_start_token_id, "eos_token_id": eos_token_id,
           "pad_token_id": pad_token_id, "bos_token_id": bos_token_id}
    bad = {k: v for k, v in ids.items() if not 0 <= v < dims.n_vocab}
    if bad:
        raise ValueError(f"token ids outside the vocabulary of {dims.n_vocab}: {bad}; pass the ids of your tokenizer")
    config_kwargs.setdefault("begin_suppress_tokens", None)
    config = WhisperConfig(
        vocab_size=dims.n_vocab, num_mel_bins=dims.n_mels, d_model=dims.n_audio_state,
        encoder_layers=dims.n_audio_layer, encoder_attention_heads=dims.n_audio_head,
        encoder_ffn_dim=4 * dims.n_audio_state, decoder_layers=dims.n_text_layer,
        decoder_attention_heads=dims.n_text_head, decoder_ffn_dim=4 * dims.n_text_state,
        max_source_positions=dims.n_audio_ctx, max_target_positions=dims.n_text_ctx, **ids, **config_kwargs)
    tensors = {hf_name(k): v.clone() for k, v in _export_state(model).items()}
    atomic_write(out_dir / HF_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    preprocessor = WhisperFeatureExtractor(feature_size=dims.n_mels).to_dict()
    atomic_write(out_dir / HF_PREPROCESSOR, lambda tmp: Path(tmp).write_text(json.dumps(preprocessor, indent=2)))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    # config.json last: a folder with a config loads, so it should have everything else already
    atomic_write(out_dir / HF_CONFIG, lambda tmp: Path(tmp).write_text(config.to_json_string(use_diff=False)))
    return out_dir


def copy_tokenizer_files(tokenizer_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Copy the Hugging Face tokenizer files (TOKENIZER_FILES) found in `tokenizer_dir`; error if there are none."""
    src = Path(tokenizer_dir)
    found = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not found:
        raise FileNotFoundError(f"tokenizer_dir={src}: none of the tokenizer files {', '.join(TOKENIZER_FILES)}")
    return [atomic_write(Path(out_dir) / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp)) for f in found]


def load_checkpoint_tokenizer(path: str | Path):
    """The tokenizer that goes with a Whisper checkpoint: a Hugging Face folder's own files; for a .pt file,
    tokenizer files beside it, else (an OpenAI checkpoint carries none) OpenAI's vocabulary from openai-whisper's bundled tiktoken file (the optional
    `whisper` extra: pip install 'mm[whisper]'), with as many languages as the model's n_vocab implies."""
    from mm.asr.tokenizer import load_tokenizer, tokenizer_from_tiktoken
    path = Path(path)
    if path.is_dir():
        return load_tokenizer(path)
    if any((path.parent / name).exists() for name in ("tokenizer.json", "vocab.json")):
        return load_tokenizer(path.parent)  # a .pt with its own tokenizer files beside it
    dims = ModelDimensions(**{k: int(v) for k, v in load_checkpoint(path)["dims"].items()})
    if dims.n_vocab not in (51864, 51865, 51866):
        raise ValueError(f"{path}: n_vocab={dims.n_vocab} is not one of OpenAI's vocabularies and no tokenizer files "
                         f"(tokenizer.json / vocab.json) lie beside it; pass the Hugging Face folder exported with "
                         f"it (export/hf), which carries its tokenizer")
    try:
        import whisper
    except ImportError:
        raise ImportError(f"{path} is an OpenAI checkpoint without a tokenizer; its vocabulary comes from the "
                          "openai-whisper package: pip install 'mm[whisper]'") from None
    multilingual = dims.n_vocab >= 51865
    assets = Path(whisper.__file__).parent / "assets"
    ranks = assets / ("multilingual.tiktoken" if multilingual else "gpt2.tiktoken")
    n_ranks = sum(1 for line in open(ranks, encoding="ascii") if line.strip())
    num_languages = dims.n_vocab - n_ranks - 1509 if multilingual else 0  # 1509 = the other specials + timestamps
    return tokenizer_from_tiktoken(ranks, num_languages)


# ---------------------------------------------------------------- openai-whisper over our tokenizer

class OpenAITokenizer:
    """What whisper.decoding and whisper.transcribe use of their Tokenizer, answered by our AsrTokenizer, so that
    openai-whisper can decode a checkpoint of ours (it builds its tokenizer from its own tiktoken vocabulary, whose
    ids are not our BPE's): the parity tests and benchmarks/asr_decode.py swap it in for `get_tokenizer`."""

    def __init__(self, tokenizer, language: str | None = None, task: str | None = None):
        from mm.asr.logit_filters import non_speech_tokens

        self.tokenizer, self.language, self.task = tokenizer, language, task
        sequence = [tokenizer.sot]
        if language is not None:
            sequence.append(tokenizer.language_token(language))
        if task is not None:
            sequence.append(tokenizer.transcribe if task == "transcribe" else tokenizer.translate)
        self.sot_sequence = tuple(sequence)
        self.sot_sequence_including_notimestamps = (*sequence, tokenizer.no_timestamps)
        for name in ("eot", "sot", "sot_prev", "sot_lm", "no_speech", "no_timestamps", "timestamp_begin",
                     "transcribe", "translate"):
            setattr(self, name, getattr(tokenizer, name))
        self.all_language_tokens = tuple(tokenizer.language_token_ids)
        self.all_language_codes = tuple(tokenizer.languages)
        self.non_speech_tokens = tuple(non_speech_tokens(tokenizer))

    @property
    def language_token(self) -> int:
        return self.tokenizer.language_token(self.language)

    def encode(self, text, **kwargs):
        return self.tokenizer.encode(text)

    def decode(self, ids, **kwargs):
        return self.tokenizer.decode(ids)

    def decode_with_timestamps(self, ids, **kwargs):
        return self.tokenizer.decode_with_timestamps(ids)
