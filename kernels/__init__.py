"""Attention and KV-cache kernels. Each has a plain-torch reference (CPU path and test oracle)."""
from __future__ import annotations

from kernels.metadata import AttentionMetadata, build_metadata
from kernels.reference import paged_attention, store_kv

__all__ = ["AttentionMetadata", "build_metadata", "paged_attention", "store_kv"]
