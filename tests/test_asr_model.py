"""mm.asr model, losses, conversion and decoding on tiny random models: parity with Hugging Face's and OpenAI's
Whisper both ways, padding independence of the encoder, KV-cache equivalence, greedy decoding against a naive
loop. A test model's weights are drawn wide (std 0.3, not init's 0.02) so that a wrong mapping shows."""
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from mm.asr import convert, decode, losses
from mm.asr.model import KVCache, ModelDimensions, SIZES, Whisper, count_parameters, dims_for

DIMS = ModelDimensions(n_mels=8, n_audio_ctx=50, n_audio_state=64, n_audio_head=2, n_audio_layer=2, n_vocab=200,
                       n_text_ctx=32, n_text_state=64, n_text_head=2, n_text_layer=2)
HF_IDS = dict(decoder_start_token_id=2, eos_token_id=1, pad_token_id=1, bos_token_id=1)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def inputs(batch: int = 2, frames: int = 2 * DIMS.n_audio_ctx, n_tokens: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, DIMS.n_mels, frames, generator=g), torch.randint(0, DIMS.n_vocab, (batch, n_tokens),
                                                                               generator=g)


@pytest.fixture(scope="module")
def model() -> Whisper:
    return randomize(Whisper(DIMS))


def hf_config():
    from transformers import WhisperConfig

    d = DIMS
    return WhisperConfig(vocab_size=d.n_vocab, num_mel_bins=d.n_mels, d_model=d.n_audio_state,
                         encoder_layers=d.n_audio_layer, encoder_attention_heads=d.n_audio_head,
                         encoder_ffn_dim=4 * d.n_audio_state, decoder_layers=d.n_text_layer,
                         decoder_attention_heads=d.n_text_head, decoder_ffn_dim=4 * d.n_text_state,
                         max_source_positions=d.n_audio_ctx, max_target_positions=d.n_text_ctx,
                         begin_suppress_tokens=None, **HF_IDS)


def hf_logits(hf, mel, tokens):
    with torch.no_grad():
        return hf(input_features=mel, decoder_input_ids=tokens).logits


# ---------------------------------------------------------------- parity with the reference implementations

def test_loads_hugging_face_folder_with_equal_logits(tmp_path):
    from transformers import WhisperForConditionalGeneration

    hf = randomize(WhisperForConditionalGeneration(hf_config()))
    hf.save_pretrained(tmp_path)
    ours, dims = convert.load_whisper(tmp_path)
    assert dims == DIMS
    mel, tokens = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(mel, tokens), hf_logits(hf, mel, tokens), atol=1e-4, rtol=1e-4)
    # the same weights sharded, and as a pytorch_model.bin (read with weights_only=True; proj_out.weight included)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    (tmp_path / "config.json").rename(tmp_path / "bin" / "config.json")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("sharded", "bin"):
        other, _ = convert.load_whisper(tmp_path / folder)
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ours.state_dict().values()))


def test_loads_openai_checkpoint_with_equal_logits(tmp_path):
    import whisper.model as wm

    ref = randomize(wm.Whisper(wm.ModelDimensions(**asdict(DIMS))))
    torch.save({"dims": asdict(DIMS), "model_state_dict": ref.state_dict()}, tmp_path / "tiny.pt")
    ours, _ = convert.load_whisper(tmp_path / "tiny.pt")
    mel, tokens = inputs()  # OpenAI's encoder takes exactly 2 * n_audio_ctx frames
    with torch.no_grad():
        torch.testing.assert_close(ours(mel, tokens), ref(mel, tokens), atol=1e-4, rtol=1e-4)


def test_exports_load_in_transformers_and_openai_whisper(model, tmp_path):
    import whisper
    from transformers import WhisperForConditionalGeneration

    with_ctc = Whisper(DIMS, ctc=True)
    with_ctc.load_state_dict(model.state_dict(), strict=False)  # the head is left out of both exports
    convert.export_hf(with_ctc, tmp_path / "hf", **HF_IDS)
    convert.export_openai(with_ctc, tmp_path / "openai.pt")
    mel, tokens = inputs()
    with torch.no_grad():
        want = model(mel, tokens)
        hf = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf_logits(hf, mel, tokens), want, atol=1e-4, rtol=1e-4)
        ref = whisper.load_model(str(tmp_path / "openai.pt"), device="cpu")
        torch.testing.assert_close(ref(mel, tokens), want, atol=1e-4, rtol=1e-4)
        for path in (tmp_path / "hf", tmp_path / "openai.pt"):  # and back into ours, exactly
            back, dims = convert.load_whisper(path)
            assert dims == DIMS and back.ctc_head is None
            torch.testing.assert_close(back(mel, tokens), want, atol=0, rtol=0)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}


def test_ctc_head_loads_back_from_our_checkpoint(tmp_path):
    m = randomize(Whisper(DIMS, ctc=True))
    torch.save({"dims": asdict(DIMS), "model_state_dict": m.state_dict()}, tmp_path / "ckpt.pt")
    back, _ = convert.load_whisper(tmp_path / "ckpt.pt")
    assert back.ctc_head is not None and torch.equal(back.ctc_head.weight, m.ctc_head.weight)


def test_conversion_errors_name_the_problem(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such Whisper checkpoint"):
        convert.load_whisper(tmp_path / "nope")
    convert.export_hf(model, tmp_path / "hf", **HF_IDS)
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert.load_whisper(tmp_path / "hf")
    sd = model.state_dict()
    bad = {**sd, "decoder.extra.weight": torch.zeros(1)}
    torch.save({"dims": asdict(DIMS), "model_state_dict": bad}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="decoder.extra.weight"):
        convert.load_whisper(tmp_path / "extra.pt")
    bad = {**sd, "encoder.conv1.weight": torch.zeros(3, 3, 3)}
    torch.save({"dims": asdict(DIMS), "model_state_dict": bad}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="encoder.conv1.weight: shape"):
        convert.load_whisper(tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        convert.export_hf(model, tmp_path / "hf2")  # Whisper's own ids do not fit a 200-token vocabulary


# ---------------------------------------------------------------- variable length, masks, KV cache

@pytest.mark.parametrize("length", [37, 38])  # odd and even: conv2's last window does / does not reach padding
def test_encoder_output_does_not_depend_on_batch_padding(model, length):
    mel, tokens = inputs(batch=2, frames=90)
    mel[0, :, length:] = 5.0  # whatever the padding holds
    lengths = torch.tensor([length, 90])
    with torch.no_grad():
        alone, no_mask = model.embed_audio(mel[:1, :, :length])
        batched, mask = model.embed_audio(mel, lengths)
        n = (length + 1) // 2
        assert no_mask is None and mask[0].sum() == n and mask[1].all()
        torch.testing.assert_close(batched[0, :n], alone[0], atol=1e-5, rtol=1e-5)
        # and the decoder, attending only to the valid frames, gives the same logits
        torch.testing.assert_close(model.logits(tokens[:1], batched[:1], mask[:1]),
                                   model.logits(tokens[:1], alone), atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_forward(model):
    mel, tokens = inputs(batch=2, frames=60, n_tokens=9)
    with torch.no_grad():
        xa, mask = model.embed_audio(mel, torch.tensor([60, 41]))
        full = model.logits(tokens, xa, mask)
        cache, steps, start = KVCache(), [], 0
        for size in (3, 1, 2, 1, 1, 1):  # a prompt, single tokens, and a chunk after a prefix
            steps.append(model.logits(tokens[:, start:start + size], xa, mask, cache))
            start += size
        assert cache.offset == 9
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_a_model_cast_to_bf16_takes_fp32_mel_and_stays_near_fp32(model):
    """As openai-whisper casts to fp16 on GPUs: the cast model takes the fp32 log-mel the feature code gives."""
    import copy

    mel, tokens = inputs(batch=2, frames=60, n_tokens=5)
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        want = model.logits(tokens, *model.embed_audio(mel, torch.tensor([60, 41])))
        xa, mask = half.embed_audio(mel, torch.tensor([60, 41]))
        got = half.logits(tokens, xa, mask)
    assert xa.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_too_long_inputs_are_clear_errors(model):
    mel, tokens = inputs(batch=1, frames=2 * DIMS.n_audio_ctx + 1)
    with pytest.raises(ValueError, match="n_audio_ctx=50"):
        model.embed_audio(mel)
    xa, _ = model.embed_audio(mel[..., :20])
    with pytest.raises(ValueError, match="n_text_ctx=32"):
        model.logits(torch.zeros(1, 33, dtype=torch.long), xa)


def test_ctc_output_and_losses():
    m = randomize(Whisper(DIMS, ctc=True))
    mel, tokens = inputs(batch=2, frames=40)
    out = m(mel, tokens, mel_lengths=torch.tensor([40, 25]), return_encoder=True)
    assert out.ctc_logits.shape == (2, 20, DIMS.n_vocab + 1) and out.audio_mask.sum(1).tolist() == [20, 13]
    assert m.ctc_blank == DIMS.n_vocab
    targets = [[5, 6, 7], [9, 9]]
    loss = losses.ctc_loss(out.ctc_logits, out.audio_mask, targets)
    padded = torch.tensor([[5, 6, 7], [9, 9, -100]])
    assert torch.equal(loss, losses.ctc_loss(out.ctc_logits, out.audio_mask, padded, [3, 2]))
    log_probs = out.ctc_logits.log_softmax(-1).transpose(0, 1)
    want = F.ctc_loss(log_probs, torch.tensor([5, 6, 7, 9, 9]), torch.tensor([20, 13]), torch.tensor([3, 2]),
                      blank=DIMS.n_vocab)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert m.ctc_head.weight.grad is not None


def test_label_smoothed_ce_counts_only_masked_tokens():
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    targets[0, 3:] = -100
    got = losses.label_smoothed_ce(logits, targets, mask, smoothing=0.1)
    torch.testing.assert_close(got, F.cross_entropy(logits[mask], targets[mask], label_smoothing=0.1))
    torch.testing.assert_close(losses.label_smoothed_ce(logits, targets, mask, 0.1, reduction="sum"), got * 8)


# ---------------------------------------------------------------- sizes

def test_named_sizes_have_the_official_parameter_counts():
    import whisper.model as wm

    # OpenAI's nominal sizes (its README); ours must equal its own modules' counts exactly
    nominal_millions = {"tiny": 39, "base": 74, "small": 244, "medium": 769, "large_v2": 1550, "large_v3": 1550,
                        "large_v3_turbo": 809}
    for name, millions in nominal_millions.items():
        d = dims_for(name)
        with torch.device("meta"):  # no memory, no time
            towers = (wm.AudioEncoder(d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer),
                      wm.TextDecoder(d.n_vocab, d.n_text_ctx, d.n_text_state, d.n_text_head, d.n_text_layer))
        assert count_parameters(d) == sum(p.numel() for t in towers for p in t.parameters()), name
        assert count_parameters(d) / 1e6 == pytest.approx(millions, rel=0.06), name
    assert dims_for("large_v3").n_mels == 128 and dims_for("large_v3").n_vocab == 51866
    assert dims_for("small").n_vocab == 51865 and dims_for("tiny").n_audio_ctx == 1500
    assert 1.4e6 <= count_parameters(dims_for("cpu_small", n_vocab=2109, n_mels=80)) <= 1.8e6  # the default run's model
    assert dims_for("cpu_tiny", n_vocab=300, n_mels=40).n_vocab == 300
    assert count_parameters(Whisper(dims_for("cpu_tiny"))) == count_parameters(dims_for("cpu_tiny"))
    with pytest.raises(ValueError, match="known sizes: tiny, base"):
        dims_for("huge")
    assert set(SIZES) >= {"tiny", "large_v3_turbo", "cpu_tiny", "cpu_small"}


# ---------------------------------------------------------------- decoding

def naive_greedy(model, xa, mask, prompts, eot, max_new_tokens, suppress=()):
    """Full forward every step, one row at a time: the definition greedy_decode must match."""
    out = []
    for i in range(prompts.shape[0]):
        tokens, generated = prompts[i:i + 1], []
        for _ in range(max_new_tokens):
            logits = model.logits(tokens, xa[i:i + 1], None if mask is None else mask[i:i + 1])[0, -1]
            logits[list(suppress)] = float("-inf")
            token = int(logits.argmax())
            if token == eot:
                break
            generated.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        out.append(generated)
    return out


def test_greedy_decode_equals_naive_loop_and_rows_stop_independently(model):
    mel, _ = inputs(batch=3, frames=80, seed=3)
    prompts = torch.tensor([[2, 10, 11], [2, 12, 11], [2, 13, 11]])
    with torch.no_grad():
        xa, mask = model.embed_audio(mel, torch.tensor([80, 51, 23]))
        # pick as eot a token that some row produces midway, so rows finish at different steps
        free = naive_greedy(model, xa, mask, prompts, eot=-1, max_new_tokens=8)
        eot = free[0][3]
        want = naive_greedy(model, xa, mask, prompts, eot, max_new_tokens=8)
        assert len({len(r) for r in want}) > 1, want
        assert decode.greedy_decode(model, xa, mask, prompts, eot, max_new_tokens=8) == want
        suppress = [free[0][0], free[1][0]]
        want = naive_greedy(model, xa, mask, prompts, eot, 8, suppress)
        got = decode.greedy_decode(model, xa, mask, prompts, eot, 8, suppress)
        assert got == want and not set(suppress) & {t for r in got for t in r}


def test_detect_language_softmaxes_over_language_tokens(model):
    mel, _ = inputs(batch=2, frames=30)
    languages = [50, 51, 52, 53]
    with torch.no_grad():
        xa, mask = model.embed_audio(mel, torch.tensor([30, 17]))
        best, probs = decode.detect_language(model, xa, mask, sot=2, language_token_ids=languages)
        logits = model.logits(torch.tensor([[2], [2]]), xa, mask)[:, 0, languages]
    assert probs.shape == (2, 4) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.equal(best, logits.argmax(-1))
