"""``LycheeRanker``: the Lychee multimodal reranker as a Haystack ranker component.

Put it after a retriever::

    from haystack import Pipeline
    from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
    from haystack_lychee import LycheeRanker

    pipeline = Pipeline()
    pipeline.add_component("retriever", InMemoryBM25Retriever(document_store, top_k=20))
    pipeline.add_component("ranker", LycheeRanker(target="rerank.internal:50051", top_k=4))
    pipeline.connect("retriever.documents", "ranker.documents")
    question = "How do I request a travel refund?"
    result = pipeline.run({"retriever": {"query": question}, "ranker": {"query": question}})
    result["ranker"]["documents"][0].score       # p("yes") from the reranker, in [0, 1]

``run`` returns ``{"documents": [...]}``: new ``Document`` objects (same ``id``, a shallow copy
of ``meta``) with the reranker's score in ``score``, best first, at most ``top_k``, then
those below ``score_threshold`` dropped; ties keep the input order. The inputs are never
modified. ``run_async`` is natively async (grpc.aio), so ``Pipeline.run_async`` awaits it on
the event loop instead of a thread.

Text. A document's ``content``, preceded by the values of ``meta_fields_to_embed`` (joined
with ``embedding_separator``), as Haystack's other rankers do.

Images. In this order: ``blob`` when it is an image (a ``ByteStream`` whose ``mime_type`` is
``image/*``, or undeclared and the bytes are JPEG/PNG/WebP; other blobs are not images and
are ignored); ``meta[image_meta_field]`` (default ``"image"``: ``bytes``, a ``ByteStream``, an
``ImageContent``, a ``data:`` URI or a file path); ``meta[file_path_meta_field]`` (default
``"file_path"``, what ``ImageFileToDocument`` writes) when it names an image file. Files are
read only with ``allow_local_paths=True``, or inside ``root_path`` when it is set (relative
paths resolve against it); remote URLs are never fetched. A document without ``content`` is
image-only.

Image queries. ``run(..., query_image=...)`` (a ``ByteStream`` or ``ImageContent``) adds an
image to the query; a ``query`` that is a ``data:image/...;base64,`` URI is an image query.

Errors are raised, never swallowed, and are the client's own exceptions: a request the server
rejects is :class:`lychee.rerank.client.InvalidRequestError` (a ``ValueError``), an expired
deadline :class:`~lychee.rerank.client.DeadlineExceededError` (a ``TimeoutError``), anything
else a :class:`~lychee.rerank.client.LycheeError`, each chained to the gRPC error (inside a
pipeline, Haystack wraps it in ``PipelineRuntimeError`` with the original as ``__cause__``).
"""

from __future__ import annotations

import dataclasses
import mimetypes
import re
import threading
from pathlib import Path
from typing import Any, cast

from haystack import Document, component, default_from_dict, default_to_dict
from haystack.dataclasses import ByteStream, ImageContent
from haystack.utils import Secret, deserialize_secrets_inplace

from lychee.rerank.client import (
    AsyncLycheeClient,
    Doc,
    EncodedImage,
    ImageInput,
    LycheeClient,
    Query,
    RerankResult,
    ServerInfo,
)
from lychee.rerank.client._inputs import decode_base64_data_uri, decode_base64_image
from lychee.rerank.client._ranking import select_ranked

__all__ = ["LycheeRanker"]

API_KEY_ENV = "LYCHEE_API_KEY"
_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp")
_DATA_IMAGE_PREFIX = "data:image/"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def _typed(data: bytes, mime_type: str | None, where: str) -> ImageInput:
    """Declare the media type when it is one the service takes; else let the client sniff."""
    if not data:
        raise ValueError(f"{where}: image data is empty")
    if mime_type in _MEDIA_TYPES:
        return EncodedImage(data, cast("Any", mime_type))
    return data


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


@component
class LycheeRanker:
    """Rank Haystack documents (text, images, or both) by relevance to a query with a Lychee server.

    Usage::

        ranker = LycheeRanker(target="localhost:50051", top_k=3)
        ranker.warm_up()
        result = ranker.run(query="How do I reset my VPN password?", documents=docs)
        result["documents"][0].score
    """

    def __init__(
        self,
        *,
        target: str = "localhost:50051",
        api_key: Secret | None = Secret.from_env_var(API_KEY_ENV, strict=False),  # noqa: B008
        use_tls: bool = False,
        tls_root_cert: str | None = None,
        instruction: str | None = None,
        top_k: int | None = 10,
        score_threshold: float | None = None,
        timeout: float | None = 30.0,
        meta_fields_to_embed: list[str] | None = None,
        embedding_separator: str = "\n",
        image_meta_field: str | None = "image",
        file_path_meta_field: str | None = "file_path",
        root_path: str | None = None,
        allow_local_paths: bool = False,
    ) -> None:
        """
        Create a ranker; no connection is made until ``warm_up`` or the first ``run``.

        :param target: gRPC target (``host:port``, or a target URI such as ``dns:///host:port``).
        :param api_key: bearer token; by default ``$LYCHEE_API_KEY`` (not required).
        :param use_tls: use TLS with the system's root certificates.
        :param tls_root_cert: PEM file of the CA that signed the server certificate (turns TLS on).
        :param instruction: task instruction for the reranker (server default when ``None``).
        :param top_k: how many documents to return (``None``: all).
        :param score_threshold: drop documents scoring below it (applied after ``top_k``).
        :param timeout: deadline per call in seconds, retries included (``None``: none).
        :param meta_fields_to_embed: meta fields whose values precede the content in the scored text.
        :param embedding_separator: separator between those values and the content.
        :param image_meta_field: meta field that may hold a document's image (``None``: none).
        :param file_path_meta_field: meta field naming an image file (``None``: not used).
        :param root_path: directory that relative image paths resolve against; files inside it may be read.
        :param allow_local_paths: let image paths anywhere on the local disk be read.
        :raises ValueError: ``top_k`` or ``timeout`` not positive.
        """
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be > 0, got {top_k}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.target = target
        self.api_key = api_key
        self.use_tls = use_tls
        self.tls_root_cert = tls_root_cert
        self.instruction = instruction
        self.top_k = top_k
        self.score_threshold = score_threshold
        self.timeout = timeout
        self.meta_fields_to_embed = list(meta_fields_to_embed or [])
        self.embedding_separator = embedding_separator
        self.image_meta_field = image_meta_field
        self.file_path_meta_field = file_path_meta_field
        self.root_path = root_path
        self.allow_local_paths = allow_local_paths
        self.server_info: ServerInfo | None = None
        """What the server runs (set by ``warm_up`` / ``warm_up_async``)."""
        self._client: LycheeClient | None = None
        self._async_client: AsyncLycheeClient | None = None
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "api_key": self.api_key.resolve_value() if self.api_key is not None else None,
            "tls": self.use_tls or self.tls_root_cert is not None,
            "root_certificates": Path(self.tls_root_cert) if self.tls_root_cert is not None else None,
            "timeout": self.timeout,
        }

    def _sync_client(self) -> LycheeClient:
        with self._lock:
            if self._client is None:
                self._client = LycheeClient(self.target, **self._client_kwargs())
            return self._client

    def _aio_client(self) -> AsyncLycheeClient:
        with self._lock:
            if self._async_client is None:
                self._async_client = AsyncLycheeClient(self.target, **self._client_kwargs())
            return self._async_client

    def warm_up(self) -> None:
        """Connect and fetch the server's description (``server_info``) once; errors are raised."""
        if self.server_info is None:
            self.server_info = self._sync_client().server_info(timeout=self.timeout)

    async def warm_up_async(self) -> None:
        """``warm_up`` on the event loop (grpc.aio)."""
        if self.server_info is None:
            self.server_info = await self._aio_client().server_info(timeout=self.timeout)

    def close(self) -> None:
        """Close the sync channel (a later ``run`` opens a new one)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    async def close_async(self) -> None:
        """Close both channels (a later ``run`` / ``run_async`` opens new ones)."""
        self.close()
        with self._lock:
            aclient, self._async_client = self._async_client, None
        if aclient is not None:
            await aclient.close()

    # -- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Serialise the component (the API key only as the environment variable naming it)."""
        return default_to_dict(
            self,
            target=self.target,
            api_key=self.api_key.to_dict() if self.api_key is not None else None,
            use_tls=self.use_tls,
            tls_root_cert=self.tls_root_cert,
            instruction=self.instruction,
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            timeout=self.timeout,
            meta_fields_to_embed=self.meta_fields_to_embed,
            embedding_separator=self.embedding_separator,
            image_meta_field=self.image_meta_field,
            file_path_meta_field=self.file_path_meta_field,
            root_path=self.root_path,
            allow_local_paths=self.allow_local_paths,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LycheeRanker:
        """Build the component from ``to_dict``'s output."""
        init = dict(data.get("init_parameters", {}))
        deserialize_secrets_inplace(init, keys=["api_key"])
        return default_from_dict(cls, {**data, "init_parameters": init})

    # -- input conversion -------------------------------------------------------------------------

    def _path(self, value: str | Path, where: str) -> Path:
        path = Path(value)
        if self.root_path is not None:
            root = Path(self.root_path).resolve()
            path = (root / path).resolve()
            if not self.allow_local_paths and not path.is_relative_to(root):
                raise ValueError(f"{where}: image path {str(value)!r} is outside root_path")
        elif not self.allow_local_paths:
            raise ValueError(
                f"{where}: image given as a local path, which is refused unless allow_local_paths=True "
                "or root_path is set"
            )
        if not path.is_file():
            raise ValueError(f"{where}: image file {str(path)!r} does not exist")
        return path

    def _image_value(self, value: object, where: str) -> ImageInput | None:
        if value is None:
            return None
        if isinstance(value, ByteStream):
            return _typed(value.data, value.mime_type, where)
        if isinstance(value, ImageContent):
            return _typed(decode_base64_image(value.base64_image, where), value.mime_type, where)
        if isinstance(value, bytes | bytearray | memoryview):
            return _typed(bytes(value), None, where)
        if isinstance(value, str):
            if value.startswith("data:"):
                return decode_base64_data_uri(value, where)
            if _URL.match(value):
                raise ValueError(f"{where}: remote image URLs are not fetched; pass the bytes instead")
            return self._path(value, where)
        if isinstance(value, Path):
            return self._path(value, where)
        raise TypeError(
            f"{where}: unsupported image value of type {type(value).__name__}; use bytes, a ByteStream, "
            "an ImageContent, a data: URI or a file path"
        )

    def _document_image(self, doc: Document, where: str) -> ImageInput | None:
        blob = doc.blob
        if blob is not None:
            mime = blob.mime_type
            if (mime is not None and mime.startswith("image/")) or (
                mime is None and _looks_like_image(blob.data)
            ):
                return _typed(blob.data, mime, f"{where}.blob")
        if self.image_meta_field is not None and doc.meta.get(self.image_meta_field) is not None:
            field = self.image_meta_field
            return self._image_value(doc.meta[field], f"{where}.meta[{field!r}]")
        if self.file_path_meta_field is not None:
            value = doc.meta.get(self.file_path_meta_field)
            if isinstance(value, str | Path) and (mimetypes.guess_type(value)[0] or "").startswith("image/"):
                return self._path(value, f"{where}.meta[{self.file_path_meta_field!r}]")
        return None

    def _document_text(self, doc: Document) -> str | None:
        parts = [str(doc.meta[k]) for k in self.meta_fields_to_embed if doc.meta.get(k) not in (None, "")]
        if doc.content:
            parts.append(doc.content)
        return self.embedding_separator.join(parts) or None

    def _to_doc(self, doc: Document, index: int) -> Doc:
        where = f"documents[{index}]"
        image = self._document_image(doc, where)
        text = self._document_text(doc)
        if text is None and image is None:
            raise ValueError(f"{where} has neither content nor an image")
        return Doc(text=text, image=image)

    def _to_query(self, query: str, query_image: ByteStream | ImageContent | None) -> Query:
        text: str | None = query or None
        image = self._image_value(query_image, "query_image")
        if text is not None and text.startswith(_DATA_IMAGE_PREFIX) and ";base64," in text:
            if image is not None:
                raise ValueError("query is an image data URI and query_image is set too; pass one image")
            image, text = decode_base64_data_uri(text, "query"), None
        if text is None and image is None:
            raise ValueError("query is empty: give text, an image data URI, or query_image")
        return Query(text=text, image=image)

    def _prepare(self, top_k: int | None, documents: list[Document]) -> tuple[int | None, list[Doc]]:
        k = self.top_k if top_k is None else top_k
        if k is not None and k <= 0:
            raise ValueError(f"top_k must be > 0, got {k}")
        return k, [self._to_doc(d, i) for i, d in enumerate(documents)]

    @staticmethod
    def _output(
        documents: list[Document], result: RerankResult, top_k: int | None, score_threshold: float | None
    ) -> dict[str, list[Document]]:
        ranked = select_ranked(result.results, len(documents), top_n=top_k, score_threshold=score_threshold)
        out = [
            dataclasses.replace(documents[r.index], score=r.score, meta=dict(documents[r.index].meta))
            for r in ranked
        ]
        return {"documents": out}

    # -- component API ----------------------------------------------------------------------------

    @component.output_types(documents=list[Document])
    def run(
        self,
        query: str,
        documents: list[Document],
        top_k: int | None = None,
        score_threshold: float | None = None,
        query_image: ByteStream | ImageContent | None = None,
    ) -> dict[str, list[Document]]:
        """
        Rank ``documents`` by relevance to ``query``.

        :param query: the query text (or a ``data:image/...;base64,`` URI: an image query).
        :param documents: the documents to rank.
        :param top_k: overrides the component's ``top_k`` for this call.
        :param score_threshold: overrides the component's ``score_threshold`` for this call.
        :param query_image: an image added to the query.
        :returns: ``{"documents": [...]}``, best first, each with ``score`` set.
        :raises ValueError: an input cannot be encoded, or the server rejected the request.
        :raises TimeoutError: the deadline expired.
        :raises lychee.rerank.client.LycheeError: any other failure of the call.
        """
        if not documents:
            return {"documents": []}
        k, docs = self._prepare(top_k, documents)
        result = self._sync_client().rerank(
            self._to_query(query, query_image),
            docs,
            instruction=self.instruction,
            top_n=None if k is None else min(k, len(docs)),
            timeout=self.timeout,
        )
        threshold = self.score_threshold if score_threshold is None else score_threshold
        return self._output(documents, result, k, threshold)

    @component.output_types(documents=list[Document])
    async def run_async(
        self,
        query: str,
        documents: list[Document],
        top_k: int | None = None,
        score_threshold: float | None = None,
        query_image: ByteStream | ImageContent | None = None,
    ) -> dict[str, list[Document]]:
        """``run`` over grpc.aio (same arguments and result)."""
        if not documents:
            return {"documents": []}
        k, docs = self._prepare(top_k, documents)
        result = await self._aio_client().rerank(
            self._to_query(query, query_image),
            docs,
            instruction=self.instruction,
            top_n=None if k is None else min(k, len(docs)),
            timeout=self.timeout,
        )
        threshold = self.score_threshold if score_threshold is None else score_threshold
        return self._output(documents, result, k, threshold)
