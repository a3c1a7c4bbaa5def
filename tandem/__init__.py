"""Tandem: small and large language models working on one request together."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "AsyncClient", "__version__"]


def __getattr__(name: str) -> Any:
    """`from tandem import Client, AsyncClient`, imported on first use so `import tandem` stays cheap."""
    if name == "Client":
        from tandem.client import Client

        return Client
    if name == "AsyncClient":
        from tandem.aio_client import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
