"""ModelRunner: one resident model, its KV pool tensors, and the forward pass of a scheduled batch."""
from __future__ import annotations

import functools
import itertools

import torch

import tandem_kernels as kernels
from workers.engine.config import ModelConfig
from workers.engine.cuda_graph import DecodeGraphs
from workers.engine.scheduler import ScheduledSeq
from workers.models import LoadedModel
from workers.models.decoder import ForwardBatch
from workers.models.packed_linear import can_pack, map_embeddings, pack_linears
from workers.models.spec import rope_cache


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: ModelConfig):
        self.loaded = loaded
        self.model = loaded.model
        self.spec = spec = loaded.spec
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = loaded.dtype
        self.block_size = config.block_size
        self.max_model_len = min(spec.max_model_len, config.max_model_len or spec.max_model_len)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if config.cpu_packed_linear and can_pack(self.dtype, self.device):
            pack_linears(self.model)
            map_embeddings(self.model)
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.block_bytes = spec.kv_bytes_per_token * self.block_size * elem
        self.num_blocks = max(1, int(config.kv_cache_mb * 2**20) // self.block_bytes)
        shape = (2, spec.num_layers, self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.k_caches, self.v_caches = list(self.kv[0]), list(self.kv[1])
        self.rope = {}
        for layer_type, (inv_freq, scale) in spec.rope.items():
            cos, sin = rope_cache(inv_freq, scale, self.max_model_len)
            self.rope[layer_type] = (cos.to(self.device, self.dtype), sin.to(self.device, self.dtype))
        self.graphs = DecodeGraphs(self) if self.device.type == "cuda" and config.cuda_graphs else None

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def forward_batch(self, meta: kernels.AttentionMetadata) -> ForwardBatch:
        return ForwardBatch(meta, self.k_caches, self.v_caches, self.rope)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq], sample_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward the batch's new tokens; return the last hidden state and logits of `sample_rows`."""
        if self.graphs is not None and self.graphs.fits(batch):
            hidden = self.graphs.run(batch)
        else:
            ids = [t for s in batch for t in s.seq.token_ids[s.start : s.start + s.num_new]]
            meta = kernels.build_metadata(
                [s.seq.block_table for s in batch], [s.start for s in batch], [s.num_new for s in batch],
                self.block_size, self.device, self.num_splits(len(batch)),
            )
            hidden = self.model(torch.tensor(ids, dtype=torch.long).to(self.device), self.forward_batch(meta))
        ends = list(itertools.accumulate(s.num_new for s in batch))
        idx = [ends[i] - 1 for i in sample_rows]
        rows = hidden if idx == list(range(hidden.shape[0])) else hidden[self._device_index(idx)]
        return rows, self.model.logits(rows)

    def _device_index(self, idx: list[int]) -> torch.Tensor:
        """A pinned host copy, so the transfer does not wait for the GPU."""
        host = torch.tensor(idx, dtype=torch.long, pin_memory=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)

    def num_splits(self, batch: int) -> int:
        if self.device.type != "cuda":
            return 1
        from tandem_kernels.triton_decode import num_splits_for

        return num_splits_for(batch, self.spec.num_kv_heads, self.max_model_len, self.num_sms)

    @functools.cached_property
    def num_sms(self) -> int:
        return torch.cuda.get_device_properties(self.device).multi_processor_count

    @torch.inference_mode()
    def read_kv(self, slots: torch.Tensor, layers: range) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.kv[0, layers.start : layers.stop].flatten(1, 2)[:, slots]
        v = self.kv[1, layers.start : layers.stop].flatten(1, 2)[:, slots]
        return k.clone(), v.clone()

    @torch.inference_mode()
    def write_kv(self, slots: torch.Tensor, layers: range, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv[0, layers.start : layers.stop].flatten(1, 2)[:, slots] = k.to(self.device, self.dtype)
        self.kv[1, layers.start : layers.stop].flatten(1, 2)[:, slots] = v.to(self.device, self.dtype)
