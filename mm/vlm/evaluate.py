"""Held-out evaluation of a vision-chat model: teacher-forced loss, and exact-match VQA accuracy by generation.

VQA accuracy asks every short-answer assistant turn of the held-out chat JSONL (reference of at most
`max_answer_words` words), given the turns before it, and compares the greedy answer with the
reference after `normalize_answer` (the VQA benchmark's normalisation: lower case, punctuation and
articles dropped, number words as digits). Longer references ("describe the image") are counted
but not scored.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str, synonyms: dict[str, str] | None = None) -> str:
    """'The Red circle.' -> 'red circle'; 'Three' -> '3' (VQA-style answer normalisation); words in
    `synonyms` are replaced ({"grey": "gray"})."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    synonyms = synonyms or {}
    return " ".join(NUMBER_WORDS.get(w) or synonyms.get(w, w) for w in words if w not in ARTICLES)


def read_eval_turns(path: str | Path, max_answer_words: int = 4, limit: int | None = None,
                    types: dict[int, str] | None = None) -> tuple[list[dict], int]:
    """Each short-answer assistant turn of a chat JSONL -> {"messages": the turns before it (OpenAI format),
    "answer", "line", "type"}; plus how many long-answer turns were left out. Bad lines are skipped (the
    loss pass counts them). "type" (for per-type scores) comes from `types` {line number: type} when
    given (lines it leaves out are not asked), else "all"."""
    turns, long_answers = [], 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                messages = record["messages"]
            except (ValueError, KeyError, TypeError):
                continue
            if types is not None and line_no not in types:
                continue
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") != "assistant" or m.get("weight", 1) == 0 or i == 0:
                    continue
                answer = m.get("content") if isinstance(m.get("content"), str) else None
                if answer is None:
                    continue
                if len(answer.split()) > max_answer_words:
                    long_answers += 1
                    continue
                turns.append({"messages": messages[:i], "answer": answer, "line": line_no,
                              "type": (types or {}).get(line_no, "all")})
                if limit and len(turns) >= limit:
                    return turns, long_answers
    return turns, long_answers


def evaluate_vqa(chat, path: str | Path, batch_size: int = 32, max_new_tokens: int = 16,
                 max_answer_words: int = 4, limit: int | None = None, types: dict[int, str] | None = None,
                 normalize=normalize_answer) -> dict:
    """Exact-match accuracy of `chat` (a VisionChat) on the held-out file's short-answer turns, overall
    and per type; `normalize` maps an answer to what is compared."""
    turns, long_answers = read_eval_turns(path, max_answer_words, limit, types)
    root = str(Path(path).resolve().parent)
    right, seen, examples = defaultdict(int), defaultdict(int), []
    for start in range(0, len(turns), batch_size):
        chunk = turns[start:start + batch_size]
        replies = chat.chat_batch([t["messages"] for t in chunk], max_new_tokens=max_new_tokens, image_root=root)
        for turn, reply in zip(chunk, replies):
            ok = normalize(reply.text) == normalize(turn["answer"])
            seen[turn["type"]] += 1
            right[turn["type"]] += ok
            if len(examples) < 20:
                examples.append({"line": turn["line"], "answer": turn["answer"], "reply": reply.text, "ok": ok})
    total = sum(seen.values())
    out = {"vqa_acc": sum(right.values()) / total if total else float("nan"), "vqa_n": total,
           "vqa_long_answers_skipped": long_answers, "examples": examples}
    if len(seen) > 1:
        out |= {f"vqa_acc/{k}": right[k] / seen[k] for k in sorted(seen)}
    return out


@torch.no_grad()
def heldout_loss(model, batches, device) -> dict:
    """Mean token loss over held-out batches (packed or padded), and the tokens it covers."""
    from mm.vlm.model import batch_loss
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss_sum, n = batch_loss(model, batch)
        total, tokens = total + float(loss_sum), tokens + int(n)
    model.train(was_training)
    return {"eval_loss": total / tokens if tokens else float("nan"), "eval_tokens": tokens}
