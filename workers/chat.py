"""Prompt rendering: chat templates, and the tokens a new turn adds to a conversation."""
from __future__ import annotations

from typing import Any


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def turn_tokens(tokenizer: Any, history: list[dict[str, str]], messages: list[dict[str, str]],
                add_generation_prompt: bool, history_tail: list[int] | None = None) -> list[int]:
    """Tokens of `messages` rendered as a continuation of `history` (the conversation so far).

    The template is rendered with and without the new messages and the difference is encoded, so the
    caller can append it to the exact token history of earlier turns (and hit the prefix cache). The
    token history ends where the last answer's generation stopped, so the template's text after that
    answer (its end-of-turn token when generation did not produce it, then e.g. a newline) comes first."""
    if not history:
        return encode(tokenizer, render(tokenizer, messages, add_generation_prompt))
    before = render(tokenizer, history, False)
    full = render(tokenizer, history + messages, add_generation_prompt)
    text = full[len(before):] if full.startswith(before) else render(tokenizer, messages, add_generation_prompt)
    return encode(tokenizer, _after_answer(tokenizer, before, history, history_tail or []) + text)


def _after_answer(tokenizer: Any, rendered: str, history: list[dict[str, str]], tail: list[int]) -> str:
    last = history[-1]
    if last.get("role") != "assistant" or not last.get("content") or not getattr(tokenizer, "chat_template", None):
        return ""
    at = rendered.rfind(last["content"])
    if at < 0:
        return ""
    after = rendered[at + len(last["content"]):]
    if tail:
        ended_with = tokenizer.decode([tail[-1]], skip_special_tokens=False)
        if ended_with and after.startswith(ended_with):
            after = after[len(ended_with):]
    return after
