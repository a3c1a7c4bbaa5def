"""Load a checkpoint (Hugging Face directory or GGUF file) into our CausalLM."""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tandem.errors import CheckpointError
from workers.models.decoder import CausalLM
from workers.models.spec import ModelSpec

_PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_NAME = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|model\.)?(.*)$")


@dataclass
class LoadedModel:
    model: CausalLM
    spec: ModelSpec
    tokenizer: object
    path: Path
    dtype: torch.dtype


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path.is_file() or path.suffix == ".gguf":
        return _load_gguf(path, dtype, device)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json (expected a Hugging Face model directory or a .gguf file)")
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"{path}/config.json could not be read: {e}") from e
    spec = ModelSpec.from_hf_config(config)
    dtype = _resolve_dtype(dtype, config)
    model = _empty_model(spec, dtype, device)
    _copy_weights(model, spec, _safetensors_items(path), str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"{path}: tokenizer could not be loaded: {e}") from e
    return LoadedModel(model.eval(), spec, tokenizer, path, dtype)


def _load_gguf(path: Path, dtype, device) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise CheckpointError(f"GGUF file {path} could not be loaded: {e}") from e
    spec = ModelSpec.from_hf_config(hf.config)
    dtype = _resolve_dtype(dtype, hf.config)
    model = _empty_model(spec, dtype, device)
    _copy_weights(model, spec, iter(hf.state_dict().items()), str(path))
    return LoadedModel(model.eval(), spec, tokenizer, path, dtype)


def _resolve_dtype(dtype, config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, str):
            found = getattr(torch, found, None)
        return found if isinstance(found, torch.dtype) else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16") from None


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _empty_model(spec: ModelSpec, dtype: torch.dtype, device) -> CausalLM:
    with torch.device("meta"), _default_dtype(dtype):
        model = CausalLM(spec)
    model = model.to_empty(device=device)
    if spec.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_items(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Read tensors one at a time with plain file reads (no mmap), so loading never holds the
    whole file in memory beside the model."""
    seen: set[str] = set()
    for f in _weight_files(path):
        for name, tensor in _read_safetensors(f):
            if name in seen:
                raise CheckpointError(f"{f}: tensor {name} is also in another weights file of {path}")
            seen.add(name)
            yield name, tensor


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint's weights as transformers picks them: the index's shards, else model.safetensors, else
    the one *.safetensors there is (other files, such as adapters or backups, are not the model's)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index with a weight_map: {e!r}") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {path}: {missing[:3]} (an interrupted download?)")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{path} holds no model.safetensors, no model.safetensors.index.json and "
                              f"{len(files)} other *.safetensors files: {[f.name for f in files][:5]}")
    return files


@dataclass
class _FileTensor:
    """A tensor still on disk; `read_into` reads it straight into its destination when the dtypes
    match, so no second copy of the weights is ever in memory."""

    fh: object
    path: Path
    name: str
    offset: int
    nbytes: int
    shape: torch.Size
    dtype: torch.dtype

    def read_into(self, dst: torch.Tensor) -> None:
        if dst.shape != self.shape:
            raise CheckpointError(f"{self.path}: tensor {self.name} has shape {tuple(self.shape)}, expected {tuple(dst.shape)}")
        if dst.dtype == self.dtype and dst.is_contiguous() and dst.device.type == "cpu":
            self._read(dst)
        else:
            tmp = torch.empty(self.shape, dtype=self.dtype)
            self._read(tmp)
            dst.copy_(tmp)

    def _read(self, dst: torch.Tensor) -> None:
        self.fh.seek(self.offset)
        if self.nbytes and self.fh.readinto(memoryview(dst.view(-1).view(torch.uint8).numpy())) != self.nbytes:
            raise CheckpointError(f"weights file {self.path} is corrupt or unreadable: tensor {self.name} is truncated")


def _read_safetensors(f: Path) -> Iterator[tuple[str, _FileTensor]]:
    size = f.stat().st_size
    with open(f, "rb") as fh:
        try:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(fh.read(n))
            entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
            tensors = []
            for name, info in entries:
                begin, end = info["data_offsets"]
                dtype = _ST_DTYPES[info["dtype"]]
                shape = torch.Size(info["shape"])
                nbytes = shape.numel() * dtype.itemsize
                if end - begin != nbytes or 8 + n + end > size:
                    raise ValueError(f"tensor {name} is truncated or inconsistent")
                tensors.append((name, _FileTensor(fh, f, name, 8 + n + begin, nbytes, shape, dtype)))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"weights file {f} is corrupt or unreadable: {e}") from e
        yield from tensors


def _assign(dst: torch.Tensor, src, name: str, source: str) -> None:
    if isinstance(src, _FileTensor):
        src.read_into(dst)
        return
    if dst.shape != src.shape:
        raise CheckpointError(f"{source}: tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def _copy_weights(model: CausalLM, spec: ModelSpec, items: Iterator[tuple[str, torch.Tensor]], source: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    with torch.no_grad():
        for hf_name, tensor in items:
            name = hf_name if hf_name.startswith("lm_head") else "model." + _NAME.match(hf_name).group(1)
            if "rotary_emb" in name or name.endswith("inv_freq"):
                continue
            if name == "lm_head.weight" and spec.tie_embeddings:
                continue
            parts = name.split(".")
            packed = _PACKED.get(parts[-2]) if len(parts) >= 2 else None
            if packed is not None:
                parts[-2] = packed[0]
                target_name = ".".join(parts)
                target = params.get(target_name)
                if target is None:
                    raise CheckpointError(f"{source}: unexpected tensor {hf_name}")
                _copy_shard(target, tensor, packed[1], spec, parts[-2], hf_name, source)
                filled.add(f"{target_name}#{packed[1]}")
                continue
            target = params.get(name)
            if target is None:
                raise CheckpointError(f"{source}: unexpected tensor {hf_name}")
            _assign(target, tensor, hf_name, source)
            filled.add(name)
    expected = set()
    for name, p in params.items():
        if name == "lm_head.weight" and spec.tie_embeddings:
            continue
        if ".qkv_proj." in name:
            expected |= {f"{name}#{i}" for i in range(3)}
        elif ".gate_up_proj." in name:
            expected |= {f"{name}#{i}" for i in range(2)}
        else:
            expected.add(name)
    missing = sorted(expected - filled)
    if missing:
        raise CheckpointError(f"{source}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _copy_shard(target, tensor, shard, spec: ModelSpec, kind: str, hf_name: str, source: str) -> None:
    if kind == "qkv_proj":
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        offsets, sizes = [0, q, q + kv], [q, kv, kv]
    else:
        offsets, sizes = [0, spec.intermediate_size], [spec.intermediate_size] * 2
    _assign(target.narrow(0, offsets[shard], sizes[shard]), tensor, hf_name, source)
