from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from tiny import FAMILIES, make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_paths(tiny_root) -> dict[str, Path]:
    return {f: make_tiny(f, tiny_root) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_path(tiny_paths) -> Path:
    return tiny_paths["qwen2"]


def make_engine(path, *, block_size: int = 4, kv_cache_mb: float = 4.0, **kw):
    from workers.engine import Engine, EngineConfig, ModelConfig

    model = ModelConfig("m", str(path), dtype="float32", block_size=block_size, kv_cache_mb=kv_cache_mb)
    return Engine(EngineConfig([model], **kw))


def hf_greedy(path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
