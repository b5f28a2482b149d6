"""A conversation -> token ids and labels, the loss found from the tokenizer's own chat template.

    chat = tokenize_chat(tokenizer, messages, max_tokens=2048, image_tokens=64, name="sample train:3")
    chat.input_ids, chat.labels    # labels: the token id where it is in the loss, IGNORE_INDEX elsewhere;
                                   # aligned with input_ids, not shifted (the model shifts, as in transformers)

`messages` are the canonical messages of mm.decoders.chat_decoder: {"role", "content": [{"type": "text",
"text"} | {"type": "image", "index"}], "weight": 0|1}. The template sees each message's parts joined with
"\\n", an image part as IMAGE_TOKEN (LLaVA's "<image>\\nWhat colour ..."). IMAGE_TOKEN is one special
token of the tokenizer; each is then expanded into `image_tokens` copies, one per vision token the
projector yields for an image.

How the answers are found, without one hand-written role string (a hand-written "### Assistant:" that
does not match the tokenizer masks every label: LLaVA #1166, #1706): for each assistant message i the
template renders prompt_i = messages[:i] with the generation prompt, and full_i = messages[:i+1].
full_i must start with prompt_i, and the answer span is full_i[len(prompt_i):] less trailing whitespace:
the answer text and the end-of-turn marker (<|im_end|>, <|eot_id|>) the model must learn to emit. The
whole conversation is rendered once (it must start with every full_i, so each span sits at the same
place in it), tokenized once with character offsets, and the tokens inside a span of a weight-1 message
are the labels. Whatever the template adds or drops elsewhere (a default system prompt, a date) is simply
not labelled. Every way this can go wrong raises TemplateMismatch naming the sample: a prompt that is not
a prefix, a template that renders no assistant text or rewrites it, a token across a span's edge, label
tokens that do not decode to the answer.
"""
from __future__ import annotations

from dataclasses import dataclass

from mm.batching import SampleTooLong
from mm.decoders import ChatFormatError
from mm.vlm.lm import IMAGE_TOKEN  # one definition, beside the LM loader that registers it

IGNORE_INDEX = -100  # what torch's cross_entropy and transformers' losses skip


class TemplateMismatch(ValueError):
    """The chat template and the tokenizer do not give a clean answer span: training would silently learn
    the wrong tokens or nothing. The message names the sample and shows where."""


class NoAnswerTokens(SampleTooLong):
    """No token of the sample is in the loss once truncated: the loader drops and counts it (as too_long,
    being a SampleTooLong), never trains it as a zero-loss sample (lmms-finetune #45)."""


@dataclass
class TokenizedChat:
    """One conversation as the model trains on it; all lists have the same length, at most max_tokens."""
    input_ids: list[int]
    labels: list[int]      # input_ids where in the loss, IGNORE_INDEX elsewhere
    n_images: int          # images kept: the first n_images of the conversation's images
    n_full_tokens: int     # tokens before truncation
    truncated: bool = False

    @property
    def n_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------- rendering

def _prefix(name: str) -> str:
    return f"{name}: " if name else ""


def template_messages(messages: list[dict], name: str = "") -> list[dict]:
    """Canonical messages -> what a chat template takes: [{"role", "content": str}], images as IMAGE_TOKEN."""
    out = []
    for i, message in enumerate(messages):
        pieces = []
        for part in message["content"]:
            if part["type"] == "image":
                pieces.append(IMAGE_TOKEN)
            elif IMAGE_TOKEN in part["text"]:  # it would become an image token with no image behind it
                raise ChatFormatError(f"{_prefix(name)}message {i}: the text holds {IMAGE_TOKEN!r}, the image "
                                      "placeholder; give images as image_url parts (mm.vlm.formats converts "
                                      "LLaVA and ShareGPT data)")
            else:
                pieces.append(part["text"])
        out.append({"role": message["role"], "content": "\n".join(pieces)})
    return out


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, name: str = "") -> str:
    """The tokenizer's chat template applied to template_messages(messages), as text."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateMismatch(f"{_prefix(name)}the tokenizer has no chat template")
    try:
        return tokenizer.apply_chat_template(template_messages(messages, name), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except ChatFormatError:
        raise
    except Exception as e:  # jinja2's TemplateError, or raise_exception() in the template ("roles must alternate")
        raise TemplateMismatch(f"{_prefix(name)}the chat template refused the conversation: "
                               f"{type(e).__name__}: {e}") from None


def _divergence(a: str, b: str) -> str:
    """Where two renders part, for a message: the text around the first differing character."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: {a[max(0, i - 30):i + 30]!r} vs {b[max(0, i - 30):i + 30]!r}"


def answer_spans(tokenizer, messages: list[dict], name: str = "") -> tuple[str, list[tuple[int, int, int]]]:
    """(the whole conversation rendered, [(start, end, weight)] per assistant message): the characters of
    each answer in the text, its end-of-turn marker included, trailing whitespace left out."""
    where = _prefix(name)
    text = render(tokenizer, messages, name=name)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True, name=name)
        full = render(tokenizer, messages[:i + 1], name=name)
        if not full.startswith(prompt):
            raise TemplateMismatch(f"{where}the template's prompt for message {i} is not a prefix of the "
                                   f"conversation rendered with it, {_divergence(prompt, full)}")
        if not text.startswith(full):
            raise TemplateMismatch(f"{where}the template renders messages[:{i + 1}] differently once later "
                                   f"messages follow, {_divergence(full, text)}")
        answer = full[len(prompt):].rstrip()
        said = template_messages([message])[0]["content"].strip()
        if not answer or said not in answer:  # a template that drops or rewrites what the assistant said
            raise TemplateMismatch(f"{where}the template renders assistant message {i} as {answer!r:.80}, "
                                   f"which does not hold its text {said!r:.80}: nothing right to learn")
        spans.append((len(prompt), len(prompt) + len(answer), message["weight"]))
    if not spans:
        raise TemplateMismatch(f"{where}no assistant message: no text to learn")
    return text, spans


# ---------------------------------------------------------------- labels from offsets

def loss_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], name: str = "") -> list[bool]:
    """Per token (character offsets [a, b)): inside one of the spans [s, e)? A token across a span's
    edge raises: the answer would start or end mid-token, unlike what the model sees at inference."""
    mask = []
    for t, (a, b) in enumerate(offsets):
        inside = False
        for s, e in spans:
            if (s <= a and b <= e and a < e) or (a == b and s <= a < e):
                inside = True
            elif a < e and b > s:
                raise TemplateMismatch(f"{_prefix(name)}token {t} (characters {a}-{b}) crosses the edge of the "
                                       f"answer at characters {s}-{e}: the tokenizer merges answer and prompt text")
        mask.append(inside)
    return mask


def check_answer_tokens(tokenizer, ids: list[int], offsets, mask: list[bool], text: str,
                        spans: list[tuple[int, int]], name: str = "") -> None:
    """Each span's tokens must cover it from edge to edge and decode back to its text."""
    for s, e in spans:
        picked = [t for t, (a, b) in enumerate(offsets) if mask[t] and s <= a < e]
        if not picked or offsets[picked[0]][0] != s or offsets[picked[-1]][1] != e:
            raise TemplateMismatch(f"{_prefix(name)}the tokens do not cover the answer {text[s:e]!r:.80}")
        decoded = tokenizer.decode([ids[t] for t in picked], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
        if decoded != text[s:e]:
            raise TemplateMismatch(f"{_prefix(name)}the label tokens decode to {decoded!r:.80}, not to the "
                                   f"answer {text[s:e]!r:.80}")


# ---------------------------------------------------------------- images and truncation

def image_token_id(tokenizer) -> int:
    """The id of IMAGE_TOKEN, which must be one special token of the tokenizer."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # checked by converting back, not with `in tokenizer.get_vocab()`: that builds the whole vocabulary as a dict
    # (~40 ms for SmolLM2's 49k tokens), and this runs for every sample the loader tokenises
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != IMAGE_TOKEN:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token: add it with tokenizer.add_special_tokens("
                         f"{{'additional_special_tokens': [{IMAGE_TOKEN!r}]}}) and resize the LM's embeddings")
    return token_id


def count_images(messages: list[dict]) -> int:
    return sum(part["type"] == "image" for m in messages for part in m["content"])


def expand_images(ids: list[int], labels: list[int], image_id: int | None,
                  image_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """Each image_id -> image_tokens copies, out of the loss. Returns (ids, labels, start of each image)."""
    out_ids, out_labels, starts = [], [], []
    for token, label in zip(ids, labels):
        if token == image_id:
            starts.append(len(out_ids))
            out_ids += [token] * image_tokens
            out_labels += [IGNORE_INDEX] * image_tokens
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels, starts


def _tokenize(tokenizer, text: str, n_images: int, name: str):
    """(ids, offsets, image id or None) of rendered text; the template must keep every image."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("labels need character offsets: use a fast tokenizer (tokenizers-backed)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # the template writes BOS
    image_id = image_token_id(tokenizer) if n_images else None
    found = enc["input_ids"].count(image_id) if n_images else 0
    if found != n_images:
        raise TemplateMismatch(f"{_prefix(name)}{n_images} images in the messages, {found} image tokens "
                               "in the rendered conversation: the template drops a message that holds one")
    return enc["input_ids"], enc["offset_mapping"], image_id


def _cut(n: int, max_tokens: int | None, starts: list[int], image_tokens: int) -> tuple[int, int]:
    """(tokens kept, images kept): the first max_tokens, less an image that would be cut through."""
    keep = n if max_tokens is None else min(n, max_tokens)
    for start in starts:
        if start < keep < start + image_tokens:
            keep = start
    return keep, sum(start + image_tokens <= keep for start in starts)


# ---------------------------------------------------------------- what the recipe, validator and inference call

def tokenize_chat(tokenizer, messages: list[dict], *, max_tokens: int | None, image_tokens: int,
                  name: str = "") -> TokenizedChat:
    """A conversation -> TokenizedChat, loss on weight-1 assistant messages and their end-of-turn marker.

    Keeps the first max_tokens tokens (None: all), never cutting through an image's tokens (that image and
    all after it go). Raises TemplateMismatch (template and tokenizer disagree), ChatFormatError (text
    holding IMAGE_TOKEN), or NoAnswerTokens when no loss token is left; each message names the sample.
    """
    text, spans = answer_spans(tokenizer, messages, name)
    ids, offsets, image_id = _tokenize(tokenizer, text, count_images(messages), name)
    trained = [(s, e) for s, e, weight in spans if weight]
    loss_mask(offsets, [(s, e) for s, e, _ in spans], name)  # every answer, trained or not, must have clean edges
    mask = loss_mask(offsets, trained, name)
    check_answer_tokens(tokenizer, ids, offsets, mask, text, trained, name)
    labels = [token if m else IGNORE_INDEX for token, m in zip(ids, mask)]
    ids, labels, starts = expand_images(ids, labels, image_id, image_tokens)
    keep, n_images = _cut(len(ids), max_tokens, starts, image_tokens)
    chat = TokenizedChat(ids[:keep], labels[:keep], n_images, len(ids), truncated=keep < len(ids))
    if chat.n_loss_tokens == 0:
        why = f"truncation to {max_tokens} tokens (of {len(ids)}) cuts every answer token" if trained else \
            "every assistant message has weight 0"
        raise NoAnswerTokens(f"{_prefix(name)}nothing left to learn: {why}")
    return chat


def count_tokens(tokenizer, messages: list[dict], image_tokens: int, name: str = "") -> tuple[int, int]:
    """(tokens, tokens in the loss) of the whole conversation, untruncated, images expanded."""
    chat = tokenize_chat(tokenizer, messages, max_tokens=None, image_tokens=image_tokens, name=name)
    return len(chat), chat.n_loss_tokens


def prompt_ids(tokenizer, messages: list[dict], image_tokens: int, name: str = "") -> list[int]:
    """What generation starts from: the template with its generation prompt, images expanded."""
    text = render(tokenizer, messages, add_generation_prompt=True, name=name)
    ids, _, image_id = _tokenize(tokenizer, text, count_images(messages), name)
    return expand_images(ids, ids, image_id, image_tokens)[0]


def tokenize_preference(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict], *,
                        max_tokens: int | None, image_tokens: int,
                        name: str = "") -> tuple[TokenizedChat, TokenizedChat]:
    """(prompt + chosen, prompt + rejected), each with the loss on its answer only (for DPO)."""
    context = [{**m, "weight": 0} for m in prompt]
    return tuple(tokenize_chat(tokenizer, context + [{**m, "weight": 1} for m in answer], max_tokens=max_tokens,
                               image_tokens=image_tokens, name=f"{name} ({side})" if name else side)
                 for side, answer in (("chosen", chosen), ("rejected", rejected)))
