"""Tiny random checkpoints of each supported family, made with transformers."""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


def make_tiny(family: str, root: Path, *, tied: bool | None = None, seed: int = 0, vocab: int = 384) -> Path:
    from transformers import (
        Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
        Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
    )

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True if tied is None else tied,
                          rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
        cls = LlamaForCausalLM
    elif family == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=False if tied is None else tied)
        cls = Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=32, tie_word_embeddings=True if tied is None else tied)
        cls = Qwen3ForCausalLM
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**common, head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               tie_word_embeddings=True if tied is None else tied)
        cls = Gemma3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    perturb(model)
    out = root / f"{family}-{seed}"
    model.save_pretrained(out)
    _write_tokenizer(out, vocab)
    return out


def perturb(model) -> None:
    """Random norm weights and biases, so a wrong norm or a dropped bias changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)


def _write_tokenizer(out: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer with `vocab` entries, so text round-trips (multi-byte characters too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bytes_map = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>"]
    tokens = specials + sorted(bytes_map)
    merges = []
    base = sorted(bytes_map)
    for a in "etaoinsrhl ":
        for b in "etaoinsrhl":
            if len(tokens) >= vocab:
                break
            a_ = "Ġ" if a == " " else a
            merges.append((a_, b))
            tokens.append(a_ + b)
    tokens += [f"<extra_{i}>" for i in range(vocab - len(tokens))]
    del base
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    fast.save_pretrained(out)
