"""A session turn's tokens, appended to the exact token history, equal a fresh render of the whole chat."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from workers.chat import encode, render, turn_tokens

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}</s>{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant</s>{% endif %}")


@pytest.fixture()
def tok(tiny_path):
    t = AutoTokenizer.from_pretrained(tiny_path)
    t.chat_template = TEMPLATE
    return t


@pytest.mark.parametrize("ended_with_eos", [True, False])
def test_turn_two_continues_the_token_history_exactly(tok, ended_with_eos):
    eos = tok.convert_tokens_to_ids("</s>")
    first = [{"role": "user", "content": "hello there"}]
    prompt = turn_tokens(tok, [], first, True)
    answer = encode(tok, "fine thanks") + ([eos] if ended_with_eos else [])
    history = first + [{"role": "assistant", "content": "fine thanks"}]
    second = [{"role": "user", "content": "and you"}]
    tokens = prompt + answer
    tokens += turn_tokens(tok, history, second, True, tokens[-4:])
    assert tokens == encode(tok, render(tok, history + second, True))
