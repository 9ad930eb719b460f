"""Helpers shared by the adapter tests (a uniquely named module: ``conftest`` is ambiguous
when several test directories are collected together)."""

from __future__ import annotations

import base64
import hashlib
import math
import re

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from server_support import noise_image


class HashedBagOfWords(Embeddings):
    """Deterministic embedding: hashed, L2-normalised word counts (enough for a test retriever)."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def _embed(self, text: str) -> list[float]:
        vec = [0.0] * self.dim
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            vec[int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big") % self.dim] += (
                1.0
            )
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._embed(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._embed(text)


def png(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    return noise_image(size[0], size[1], seed=seed)


def corpus() -> list[Document]:
    """Text documents plus image documents in every accepted metadata form."""
    b64 = base64.b64encode(png(3)).decode()
    b64_other = base64.b64encode(png(4)).decode()
    return [
        Document(
            id="t1", page_content="Travel expenses are refunded within 30 days.", metadata={"src": "hr"}
        ),
        Document(id="t2", page_content="Passwords must be rotated every 90 days.", metadata={"src": "it"}),
        Document(id="t3", page_content="The cafeteria opens at 8 am.", metadata={"src": "fac"}),
        Document(id="t4", page_content="Expense reports need a manager's approval.", metadata={"src": "fin"}),
        Document(id="i1", page_content="Chart of travel expenses by quarter", metadata={"image": png(1)}),
        Document(
            id="i2", page_content="", metadata={"image": f"data:image/png;base64,{b64}", "caption": "x"}
        ),
        Document(
            id="i3",
            page_content="Screenshot of the expense tool",
            metadata={"image": {"type": "image", "base64": b64, "mime_type": "image/png"}},
        ),
        Document(
            id="i4",
            page_content="",
            metadata={
                "image": {
                    "type": "image",
                    "source_type": "base64",
                    "data": b64_other,
                    "mime_type": "image/png",
                }
            },
        ),
    ]
