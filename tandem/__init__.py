"""Tandem: small and large language models working on one request together."""
from __future__ import annotations

__version__ = "0.1.0"
