"""lychee.rerank: generated stubs and the typed client for the Lychee rerank service.

The client API is re-exported here lazily (``from lychee.rerank import LycheeClient``): the
server imports the stubs under ``lychee.rerank.v1`` and should not pay for loading the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lychee.rerank.client import (
        AsyncLycheeClient,
        Doc,
        LycheeClient,
        LycheeError,
        Query,
        RerankResult,
    )

__all__ = ["AsyncLycheeClient", "Doc", "LycheeClient", "LycheeError", "Query", "RerankResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lychee.rerank import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
