"""``LycheeRerank``: the Lychee multimodal reranker as a LangChain document compressor.

Plug it into ``ContextualCompressionRetriever`` to rerank what any retriever returns::

    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_lychee import LycheeRerank

    retriever = ContextualCompressionRetriever(
        base_compressor=LycheeRerank(target="rerank.internal:50051", top_n=4),
        base_retriever=vector_store.as_retriever(search_kwargs={"k": 20}),
    )
    docs = retriever.invoke("How do I request a travel refund?")
    docs[0].metadata["relevance_score"]

Images. A document's image is read from ``metadata[image_metadata_key]`` (default ``"image"``)
and may be: ``bytes`` (JPEG/PNG/WebP, the type is taken from the bytes), a ``data:`` URI,
a LangChain image content block (``{"type": "image", "base64": ..., "mime_type": ...}`` or the
older ``{"type": "image", "source_type": "base64", "data": ...}``), a PIL image, or a local
file path (``str`` / ``Path``) only when ``allow_local_paths=True`` — off by default because
metadata often comes from untrusted sources and must not make the process read arbitrary
files. Remote URLs are never fetched. A document whose ``page_content`` is ``""`` is
image-only.

Image queries. ``query`` is text, or an image when it is a ``data:image/...;base64,`` URI
(so an image query works through ``ContextualCompressionRetriever``, which only passes a
string). ``compress_documents`` / ``rerank`` and their async twins also take a keyword-only
``query_image`` (any image value above) for a text+image query.

Errors are raised, never swallowed, and are the client's own exceptions, which already fit
Python's vocabulary: a request the server rejects (INVALID_ARGUMENT / FAILED_PRECONDITION) is
:class:`lychee.rerank.client.InvalidRequestError`, a ``ValueError``; an expired deadline is
:class:`~lychee.rerank.client.DeadlineExceededError`, a ``TimeoutError``; anything else is a
:class:`~lychee.rerank.client.LycheeError` subclass. Each is chained (``__cause__``) to the
gRPC error. Inputs the adapter cannot encode raise ``ValueError``/``TypeError`` before any call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any, cast

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from lychee.rerank.client import (
    AsyncLycheeClient,
    Doc,
    EncodedImage,
    ImageInput,
    LycheeClient,
    Query,
    RankedDocument,
)
from lychee.rerank.client._inputs import decode_base64_data_uri, decode_base64_image
from lychee.rerank.client._ranking import select_ranked as _select

__all__ = ["LycheeRerank"]

API_KEY_ENV = "LYCHEE_API_KEY"
_DATA_IMAGE_PREFIX = "data:image/"


def _api_key_from_env() -> SecretStr | None:
    value = os.environ.get(API_KEY_ENV)
    return SecretStr(value) if value else None


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://", "gs://", "s3://"))


def select_ranked(
    results: Sequence[RankedDocument],
    n_documents: int,
    *,
    top_n: int | None,
    score_threshold: float | None,
) -> list[dict[str, Any]]:
    """Turn server results into ``[{"index", "relevance_score"}]`` by descending score.

    Order of operations is fixed and documented: sort (ties keep input order), keep the best
    ``top_n``, then drop scores below ``score_threshold``. Results that cannot be attributed to
    exactly one input document (out of range, repeated, missing) raise :class:`ServerError`:
    attaching a score to the wrong document would be a silent, unrecoverable bug downstream.
    """
    ranked = _select(results, n_documents, top_n=top_n, score_threshold=score_threshold)
    return [{"index": r.index, "relevance_score": r.score} for r in ranked]


class LycheeRerank(BaseDocumentCompressor):
    """Rerank LangChain documents (text, images, or both) with a Lychee rerank server.

    Results are new ``Document`` objects (the inputs are never mutated) of the same class, with
    the same ``id`` and a shallow copy of the metadata plus ``metadata["relevance_score"]``.
    ``compress_documents`` returns at most ``top_n`` of them, best first; ties keep the input
    order. ``acompress_documents`` is natively async (grpc.aio), not a thread hop.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    target: str = "localhost:50051"
    """gRPC target: ``host:port`` or a target URI (several replicas: ``ipv4:a:p,b:p``)."""
    use_tls: bool = False
    """Use TLS with the system's root certificates (implied by ``tls_root_cert``)."""
    tls_root_cert: Path | None = None
    """PEM file of the CA that signed the server certificate (turns TLS on)."""
    api_key: SecretStr | None = Field(default_factory=_api_key_from_env)
    """Bearer token; defaults to the ``LYCHEE_API_KEY`` environment variable."""
    instruction: str | None = None
    """Task instruction for the reranker (server default: web-search passage retrieval)."""
    top_n: int | None = Field(default=3, ge=1)
    """How many documents to keep (``None``: all)."""
    score_threshold: float | None = None
    """Drop documents scoring below this (applied after ``top_n``)."""
    timeout: float | None = Field(default=30.0, gt=0)
    """Deadline per rerank call in seconds, retries included (``None``: no deadline)."""
    image_metadata_key: str = "image"
    """Metadata key holding a document's image."""
    allow_local_paths: bool = False
    """Let image values that are file paths be read from the local disk."""
    client: LycheeClient | None = Field(default=None, exclude=True)
    """Client used by the sync methods (default: built from the fields above)."""
    async_client: AsyncLycheeClient | None = Field(default=None, exclude=True)
    """Client used by the async methods (default: built from the fields above)."""

    _own_client: LycheeClient | None = PrivateAttr(default=None)
    _own_async_client: AsyncLycheeClient | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # -- clients ------------------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "api_key": self.api_key.get_secret_value() if self.api_key is not None else None,
            "tls": self.use_tls or self.tls_root_cert is not None,
            "root_certificates": self.tls_root_cert,
            "timeout": self.timeout,
        }

    def _sync_client(self) -> LycheeClient:
        if self.client is not None:
            return self.client
        with self._lock:
            if self._own_client is None:
                self._own_client = LycheeClient(self.target, **self._client_kwargs())
            return self._own_client

    def _async_client(self) -> AsyncLycheeClient:
        if self.async_client is not None:
            return self.async_client
        with self._lock:
            if self._own_async_client is None:
                self._own_async_client = AsyncLycheeClient(self.target, **self._client_kwargs())
            return self._own_async_client

    # -- input conversion ---------------------------------------------------------------------

    def _image(self, value: object, where: str) -> ImageInput | None:
        """Resolve an image value to something the client accepts (see the module docstring)."""
        if value is None:
            return None
        if isinstance(value, bytes | bytearray | memoryview):
            if not value:
                raise ValueError(f"{where}: image data is empty")
            return bytes(value)
        if isinstance(value, dict):
            return self._image_from_block(value, where)
        if isinstance(value, str):
            if value.startswith("data:"):
                return decode_base64_data_uri(value, where)
            if _is_url(value):
                raise ValueError(f"{where}: remote image URLs are not fetched; pass the bytes instead")
            return self._local_path(Path(value), where)
        if isinstance(value, PurePath):
            return self._local_path(Path(value), where)
        if isinstance(value, EncodedImage) or type(value).__module__.startswith("PIL."):
            return cast("ImageInput", value)  # the client validates / encodes these
        raise TypeError(
            f"{where}: unsupported image value of type {type(value).__name__}; use bytes, a data: URI, "
            "an image content block, a PIL image, or (with allow_local_paths=True) a file path"
        )

    def _image_from_block(self, block: dict[Any, Any], where: str) -> bytes:
        kind = block.get("type")
        if kind not in ("image", "image_url"):
            raise ValueError(f"{where}: content block of type {kind!r} is not an image")
        if isinstance(block.get("base64"), str | bytes):  # LangChain v1 standard block
            return decode_base64_image(block["base64"], where)
        if block.get("source_type") == "base64" and isinstance(block.get("data"), str | bytes):
            return decode_base64_image(block["data"], where)  # LangChain v0 block
        url = block.get("url")
        if isinstance(block.get("image_url"), dict):  # OpenAI chat format
            url = block["image_url"].get("url")
        if isinstance(url, str) and url.startswith("data:"):
            return decode_base64_data_uri(url, where)
        if isinstance(url, str):
            raise ValueError(f"{where}: remote image URLs are not fetched; pass the bytes instead")
        raise ValueError(f"{where}: image block carries no inline base64 data")

    def _local_path(self, path: Path, where: str) -> Path:
        if not self.allow_local_paths:
            raise ValueError(
                f"{where}: image given as a local path, which is refused unless allow_local_paths=True"
            )
        if not path.is_file():
            raise ValueError(f"{where}: image file {str(path)!r} does not exist")
        return path

    def _to_doc(self, document: Document | str, index: int) -> Doc:
        if isinstance(document, str):
            if not document:
                raise ValueError(f"documents[{index}] is an empty string")
            return Doc(text=document)
        where = f"documents[{index}].metadata[{self.image_metadata_key!r}]"
        image = self._image(document.metadata.get(self.image_metadata_key), where)
        text = document.page_content or None
        if text is None and image is None:
            raise ValueError(f"documents[{index}] has neither page_content nor an image")
        return Doc(text=text, image=image)

    def _to_query(self, query: str, query_image: object | None) -> Query:
        text: str | None = query or None
        image = self._image(query_image, "query_image")
        if text is not None and text.startswith(_DATA_IMAGE_PREFIX) and ";base64," in text:
            if image is not None:
                raise ValueError("query is an image data URI and query_image is set too; pass one image")
            image, text = decode_base64_data_uri(text, "query"), None
        if text is None and image is None:
            raise ValueError("query is empty: give text, an image data URI, or query_image")
        return Query(text=text, image=image)

    def _wire_top_n(self, n: int) -> int | None:
        return None if self.top_n is None else min(self.top_n, n)

    # -- public API ---------------------------------------------------------------------------

    def rerank(
        self,
        documents: Sequence[Document | str],
        query: str,
        *,
        query_image: object | None = None,
    ) -> list[dict[str, Any]]:
        """Score ``documents`` against ``query``.

        Returns ``[{"index": i, "relevance_score": s}, ...]`` by descending score, after
        ``top_n`` and ``score_threshold``; ``index`` points into ``documents``.
        """
        if not documents:
            return []
        docs = [self._to_doc(d, i) for i, d in enumerate(documents)]
        result = self._sync_client().rerank(
            self._to_query(query, query_image),
            docs,
            instruction=self.instruction,
            top_n=self._wire_top_n(len(docs)),
            timeout=self.timeout,
        )
        return select_ranked(
            result.results, len(docs), top_n=self.top_n, score_threshold=self.score_threshold
        )

    async def arerank(
        self,
        documents: Sequence[Document | str],
        query: str,
        *,
        query_image: object | None = None,
    ) -> list[dict[str, Any]]:
        """Async :meth:`rerank` over grpc.aio."""
        if not documents:
            return []
        docs = [self._to_doc(d, i) for i, d in enumerate(documents)]
        result = await self._async_client().rerank(
            self._to_query(query, query_image),
            docs,
            instruction=self.instruction,
            top_n=self._wire_top_n(len(docs)),
            timeout=self.timeout,
        )
        return select_ranked(
            result.results, len(docs), top_n=self.top_n, score_threshold=self.score_threshold
        )

    @staticmethod
    def _annotate(documents: Sequence[Document], ranked: list[dict[str, Any]]) -> list[Document]:
        out = []
        for r in ranked:
            doc = documents[r["index"]]
            metadata = {**doc.metadata, "relevance_score": r["relevance_score"]}
            out.append(doc.model_copy(update={"metadata": metadata}))
        return out

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
        *,
        query_image: object | None = None,
    ) -> Sequence[Document]:
        """Rerank and keep the best documents, as copies with ``metadata["relevance_score"]``."""
        return self._annotate(documents, self.rerank(documents, query, query_image=query_image))

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
        *,
        query_image: object | None = None,
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents` (grpc.aio, no thread)."""
        return self._annotate(documents, await self.arerank(documents, query, query_image=query_image))
