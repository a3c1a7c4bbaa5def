"""Write a tiny Hugging Face checkpoint (see tiny.py) as a .gguf file, laid out the way llama.cpp's
convert_hf_to_gguf.py lays one out, so the GGUF loading path is tested with no download.

What is written is what transformers' GGUF reader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`,
the "legacy" path that llama / qwen2 / qwen3 / gemma3 go through) reads back:

* `{arch}.*` hyper-parameters under llama.cpp's key names (`integrations/ggml.py: GGUF_CONFIG_MAPPING`);
* tensors under gguf-py's names (`gguf.get_tensor_name_map`, the same table transformers inverts), with
  llama's q/k rows permuted for llama.cpp's interleaved rope (`LlamaTensorProcessor` reverses it) and
  gemma3's RMSNorm weights stored as `w + 1` (`Gemma2TensorProcessor` subtracts the 1);
* the byte-level BPE tokenizer as `tokenizer.ggml.model = gpt2`, with tokens, merges, token types
  and the special-token ids;
* no `output.weight` when the embeddings are tied: that absence is how the reader sets
  `tie_word_embeddings`.

GGUF cannot say everything a config can. `gguf_losses(config)` lists what the reader would lose
(e.g. qwen3's `head_dim` when it is not Qwen3Config's default 128 -- the reader's qwen3 table has no
`attention.key_length`; gemma3's `query_pre_attn_scalar` and `layer_types`); `write_gguf` refuses such a
checkpoint unless `lossy=True`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # gemma3: one entry per layer type; the file holds the global one
        params = params["full_attention"]
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def gguf_losses(cfg: dict) -> list[str]:
    """Config values that transformers' GGUF reader would not get back from the file we write."""
    from transformers import AutoConfig

    model_type = cfg["model_type"]
    lost = []
    if model_type not in ARCHES:
        return [f"model_type {model_type!r}"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    # What the reader rebuilds: the config class's defaults plus the keys it maps.
    read = AutoConfig.for_model(model_type, num_hidden_layers=cfg["num_hidden_layers"],
                                hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
                                **({"head_dim": head_dim} if model_type in ("llama", "gemma3_text") else {}))
    if model_type in ("qwen3", "gemma3_text"):
        if (read.head_dim or 0) != head_dim:
            lost.append(f"head_dim={head_dim} (reader gives {read.head_dim})")
    if model_type == "gemma3_text":
        for key in ("query_pre_attn_scalar", "layer_types", "final_logit_softcapping", "attn_logit_softcapping"):
            if cfg.get(key) != getattr(read, key):
                lost.append(f"{key}={cfg.get(key)!r} (reader gives {getattr(read, key)!r})")
        local = (cfg.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
        if local is not None and local != read.rope_parameters["sliding_attention"]["rope_theta"]:
            lost.append(f"sliding_attention rope_theta={local}")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if cfg.get(key):
            lost.append(f"{key}=True")
    rope = cfg.get("rope_parameters") or {}
    for params in (rope.values() if "full_attention" in rope else [rope]):
        if params.get("rope_type", "default") != "default":
            lost.append(f"rope_type={params['rope_type']!r}")
    return lost


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: HF's half-split rope rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer(w, hf_dir: Path, cfg: dict) -> None:
    import gguf

    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE" or (tok.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{hf_dir}: only a byte-level BPE tokenizer can be written as tokenizer.ggml.model=gpt2")
    vocab = dict(tok["model"]["vocab"])
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    for t in tok["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [None] * max(len(vocab), cfg["vocab_size"])
    for text, i in vocab.items():
        tokens[i] = text
    if None in tokens:
        raise ValueError(f"{hf_dir}: token ids are not contiguous; missing {tokens.index(None)}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            add(value)
    w.add_add_bos_token(False)  # tiny.py's tokenizer has no post-processor adding one
    template = hf_dir / "chat_template.jinja"
    if template.is_file():
        w.add_chat_template(template.read_text())


def write_gguf(hf_dir: str | Path, out: str | Path, *, dtype: str = "f32", lossy: bool = False) -> Path:
    """Convert `hf_dir` into the GGUF file `out`, with 2-D weights in F32 or F16 (norms and biases stay
    F32, as llama.cpp keeps them). Returns `out`."""
    import gguf
    from safetensors.numpy import load_file

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    model_type = cfg["model_type"]
    if model_type not in ARCHES:
        raise ValueError(f"no GGUF layout for model_type {model_type!r}; have {sorted(ARCHES)}")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype {dtype!r} is not f32 or f16")
    lost = gguf_losses(cfg)
    if lost and not lossy:
        raise ValueError(f"{hf_dir}: transformers' GGUF reader would not get back {lost}; "
                         "pass lossy=True to write anyway")
    arch_name = ARCHES[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    gemma = arch_name == "gemma3"

    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(out, arch_name)
    w.add_name(f"tiny-{hf_dir.name}")  # not containing "mistral": the reader would switch architecture
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_block_count(n_layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(head_dim)  # the reader's llama table takes head_dim from this key
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    if gemma and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    _tokenizer(w, hf_dir, cfg)

    names = gguf.get_tensor_name_map(arch, n_layers)
    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    if cfg.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    for hf_name, t in tensors.items():
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base)
        if name is None:
            raise ValueError(f"{hf_dir}: no GGUF name for tensor {hf_name}")
        name = f"{name}.{suffix}"
        t = t.astype(np.float32)
        if arch_name == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            t = _permute(t, n_head)
        elif arch_name == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            t = _permute(t, n_kv)
        if gemma and name.endswith("norm.weight"):
            t = t + 1.0
        if dtype == "f16" and t.ndim == 2:
            t = t.astype(np.float16)
        w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
