"""Adapter fixtures: a real server (tiny random checkpoint), a real LangChain retriever.

No part of the reranking path is simulated: the retriever is LangChain's InMemoryVectorStore
with a small deterministic embedding, the compressor talks gRPC to the in-process server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_classic")
pytest.importorskip("PIL")

from adapter_support import HashedBagOfWords, corpus
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from server_support import tiny_server


@pytest.fixture(scope="session")
async def adapter_server(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    async with tiny_server(request) as srv:
        yield srv


@pytest.fixture
def documents() -> list[Document]:
    return corpus()


@pytest.fixture
def vector_retriever(documents: list[Document]) -> Any:
    """A real LangChain retriever over the corpus returning every document (k = corpus size)."""
    store = InMemoryVectorStore(HashedBagOfWords())
    store.add_documents(documents)
    return store.as_retriever(search_kwargs={"k": len(documents)})
