"""Our own forward pass for the Llama, Qwen2, Qwen3 and Gemma3 families."""
from __future__ import annotations

from workers.models.loader import LoadedModel, load_model
from workers.models.spec import ModelSpec

__all__ = ["LoadedModel", "ModelSpec", "load_model"]
