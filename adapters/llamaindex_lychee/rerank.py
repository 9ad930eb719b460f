"""``LycheeRerank``: the Lychee multimodal reranker as a LlamaIndex node postprocessor.

Put it behind any retriever of a query engine::

    from llama_index.core import VectorStoreIndex
    from llamaindex_lychee import LycheeRerank

    index = VectorStoreIndex.from_documents(documents)
    engine = index.as_query_engine(
        similarity_top_k=20,
        node_postprocessors=[LycheeRerank(target="rerank.internal:50051", top_n=4)],
    )
    response = engine.query("How do I request a travel refund?")
    response.source_nodes[0].score        # p("yes") from the reranker, in [0, 1]

Results are new ``NodeWithScore`` objects, best first, with the reranker's score in
``score``; the input list and its ``NodeWithScore`` objects are never modified. The nodes
themselves are passed through as they are, except with ``keep_retrieval_score=True``, which
returns a copy of each node whose metadata adds ``"retrieval_score"`` (the first-stage score).

Text. A node's text is ``node.get_content(metadata_mode=...)`` (``MetadataMode.NONE`` by
default: the content only; ``EMBED`` / ``LLM`` / ``ALL`` prepend the node's metadata the way
LlamaIndex renders it, never the image metadata key).

Images. An image is taken, in this order, from an ``ImageNode`` (``image`` as base64,
``image_url`` as a ``data:`` URI, ``image_path``), from a multimodal ``Node`` / ``Document``
(``image_resource``: data, ``data:`` URL, path), or from ``metadata[image_metadata_key]``
(default ``"image"``: ``bytes``, a ``data:`` URI, a PIL image, a path). Local paths are read
only with ``allow_local_paths=True`` (off by default: metadata often comes from untrusted
sources and must not make the process read arbitrary files); remote URLs are never fetched.
A node whose text is empty is image-only.

Image queries. ``QueryBundle.image_path`` (a path, with ``allow_local_paths=True``, or a
``data:`` URI) is the query image, next to ``query_str`` when it is not empty; a
``query_str`` that is itself a ``data:image/...;base64,`` URI is an image query.

Errors are raised, never swallowed, and are the client's own exceptions: a request the server
rejects is :class:`lychee.rerank.client.InvalidRequestError` (a ``ValueError``), an expired
deadline :class:`~lychee.rerank.client.DeadlineExceededError` (a ``TimeoutError``), anything
else a :class:`~lychee.rerank.client.LycheeError`, each chained to the gRPC error. Inputs that
cannot be encoded raise ``ValueError`` / ``TypeError`` before any call.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any, cast

import llama_index.core.instrumentation as instrument
from llama_index.core.bridge.pydantic import Field, PrivateAttr, SecretStr
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import BaseNode, ImageNode, MetadataMode, Node, NodeWithScore, QueryBundle

from lychee.rerank.client import (
    AsyncLycheeClient,
    Doc,
    EncodedImage,
    ImageInput,
    LycheeClient,
    Query,
    RerankResult,
)
from lychee.rerank.client._inputs import decode_base64_data_uri, decode_base64_image
from lychee.rerank.client._ranking import select_ranked

__all__ = ["LycheeRerank"]

API_KEY_ENV = "LYCHEE_API_KEY"
MODEL_NAME = "lychee-rerank"
_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp")
_DATA_IMAGE_PREFIX = "data:image/"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

dispatcher = instrument.get_dispatcher(__name__)


def _api_key_from_env() -> SecretStr | None:
    value = os.environ.get(API_KEY_ENV)
    return SecretStr(value) if value else None


def _is_remote(value: str) -> bool:
    return _URL.match(value) is not None


def _with_type(data: bytes, mimetype: str | None) -> ImageInput:
    """Declare the node's media type when it is one the service takes; else let the client sniff."""
    if mimetype in _MEDIA_TYPES:
        return EncodedImage(data, cast("Any", mimetype))
    return data


class LycheeRerank(BaseNodePostprocessor):
    """Rerank LlamaIndex nodes (text, images, or both) with a Lychee rerank server.

    ``postprocess_nodes`` returns at most ``top_n`` nodes, best first, scored by the reranker;
    ties keep the input order. ``apostprocess_nodes`` is natively async (grpc.aio), not a
    thread hop.
    """

    target: str = Field(default="localhost:50051", description="gRPC target (host:port or a target URI).")
    use_tls: bool = Field(default=False, description="Use TLS with the system's root certificates.")
    tls_root_cert: Path | None = Field(default=None, description="PEM CA file of the server (turns TLS on).")
    api_key: SecretStr | None = Field(
        default_factory=_api_key_from_env,
        exclude=True,
        description="Bearer token; defaults to $LYCHEE_API_KEY (never serialised).",
    )
    instruction: str | None = Field(default=None, description="Task instruction (server default if unset).")
    top_n: int | None = Field(default=3, ge=1, description="How many nodes to keep (None: all).")
    score_threshold: float | None = Field(default=None, description="Drop nodes scoring below (after top_n).")
    timeout: float | None = Field(
        default=30.0, gt=0, description="Deadline per call in seconds, retries included."
    )
    metadata_mode: MetadataMode = Field(default=MetadataMode.NONE, description="Metadata in the scored text.")
    image_metadata_key: str = Field(default="image", description="Metadata key that may hold an image.")
    allow_local_paths: bool = Field(default=False, description="Let image paths be read from the local disk.")
    keep_retrieval_score: bool = Field(
        default=False, description="Copy each node with metadata['retrieval_score'] = its first-stage score."
    )
    client: LycheeClient | None = Field(default=None, exclude=True, description="Client for the sync path.")
    async_client: AsyncLycheeClient | None = Field(
        default=None, exclude=True, description="Client for the async path."
    )

    _own_client: LycheeClient | None = PrivateAttr(default=None)
    _own_async_client: AsyncLycheeClient | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        return "LycheeRerank"

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

    def _path(self, value: str | PurePath, where: str) -> Path:
        if not self.allow_local_paths:
            raise ValueError(
                f"{where}: image given as a local path, which is refused unless allow_local_paths=True"
            )
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{where}: image file {str(path)!r} does not exist")
        return path

    def _reference(self, value: str, where: str) -> ImageInput:
        """A string naming an image: a ``data:`` URI, or a local path; URLs are refused."""
        if value.startswith("data:"):
            return decode_base64_data_uri(value, where)
        if _is_remote(value):
            raise ValueError(f"{where}: remote image URLs are not fetched; pass the bytes instead")
        return self._path(value, where)

    def _metadata_image(self, value: object, where: str) -> ImageInput | None:
        if value is None:
            return None
        if isinstance(value, bytes | bytearray | memoryview):
            if not value:
                raise ValueError(f"{where}: image data is empty")
            return bytes(value)
        if isinstance(value, str):
            return self._reference(value, where)
        if isinstance(value, PurePath):
            return self._path(value, where)
        if isinstance(value, EncodedImage) or type(value).__module__.startswith("PIL."):
            return cast("ImageInput", value)  # the client validates / encodes these
        raise TypeError(
            f"{where}: unsupported image value of type {type(value).__name__}; use bytes, a data: URI, "
            "a PIL image, or (with allow_local_paths=True) a file path"
        )

    def _node_image(self, node: BaseNode, where: str) -> ImageInput | None:
        if isinstance(node, ImageNode):
            if node.image:
                return _with_type(decode_base64_image(node.image, f"{where}.image"), node.image_mimetype)
            if node.image_url:
                return self._reference(node.image_url, f"{where}.image_url")
            if node.image_path:
                return self._path(node.image_path, f"{where}.image_path")
        if isinstance(node, Node) and node.image_resource is not None:
            res = node.image_resource
            if res.data:
                return _with_type(decode_base64_image(res.data, f"{where}.image_resource.data"), res.mimetype)
            if res.url is not None:
                return self._reference(str(res.url), f"{where}.image_resource.url")
            if res.path is not None:
                return self._path(res.path, f"{where}.image_resource.path")
        key = self.image_metadata_key
        return self._metadata_image(node.metadata.get(key), f"{where}.metadata[{key!r}]")

    def _node_text(self, node: BaseNode) -> str | None:
        if self.metadata_mode is not MetadataMode.NONE and self.image_metadata_key in node.metadata:
            hidden = [self.image_metadata_key]
            node = node.model_copy(
                update={
                    "excluded_embed_metadata_keys": [*node.excluded_embed_metadata_keys, *hidden],
                    "excluded_llm_metadata_keys": [*node.excluded_llm_metadata_keys, *hidden],
                }
            )
        return node.get_content(metadata_mode=self.metadata_mode) or None

    def _to_doc(self, scored: NodeWithScore, index: int) -> Doc:
        where = f"nodes[{index}]"
        image = self._node_image(scored.node, where)
        text = self._node_text(scored.node)
        if text is None and image is None:
            raise ValueError(f"{where} has neither text nor an image")
        return Doc(text=text, image=image)

    def _to_query(self, query_bundle: QueryBundle | None) -> Query:
        if query_bundle is None:
            raise ValueError("LycheeRerank needs a query: pass query_bundle or query_str")
        text: str | None = query_bundle.query_str or None
        image: ImageInput | None = None
        if query_bundle.image_path:
            image = self._reference(str(query_bundle.image_path), "query_bundle.image_path")
        if text is not None and text.startswith(_DATA_IMAGE_PREFIX) and ";base64," in text:
            if image is not None:
                raise ValueError("query_str is an image data URI and image_path is set too; pass one image")
            image, text = decode_base64_data_uri(text, "query_str"), None
        if text is None and image is None:
            raise ValueError("the query is empty: give query_str, an image data URI, or image_path")
        return Query(text=text, image=image)

    def _wire_top_n(self, n: int) -> int | None:
        return None if self.top_n is None else min(self.top_n, n)

    # -- results ------------------------------------------------------------------------------

    def _scored(self, nodes: Sequence[NodeWithScore], result: RerankResult) -> list[NodeWithScore]:
        out = []
        ranked = select_ranked(
            result.results, len(nodes), top_n=self.top_n, score_threshold=self.score_threshold
        )
        for r in ranked:
            original = nodes[r.index]
            node = original.node
            if self.keep_retrieval_score:
                node = node.model_copy(
                    update={"metadata": {**node.metadata, "retrieval_score": original.score}}
                )
            out.append(NodeWithScore(node=node, score=r.score))
        return out

    def _start(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None) -> dict[str, Any]:
        dispatcher.event(
            ReRankStartEvent(
                query=query_bundle, nodes=nodes, top_n=self.top_n or len(nodes), model_name=MODEL_NAME
            )
        )
        return {
            EventPayload.NODES: nodes,
            EventPayload.MODEL_NAME: MODEL_NAME,
            EventPayload.QUERY_STR: query_bundle.query_str if query_bundle is not None else None,
            EventPayload.TOP_K: self.top_n,
        }

    # -- BaseNodePostprocessor ------------------------------------------------------------------

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        payload = self._start(nodes, query_bundle)
        query = self._to_query(query_bundle)
        if not nodes:
            dispatcher.event(ReRankEndEvent(nodes=[]))
            return []
        docs = [self._to_doc(n, i) for i, n in enumerate(nodes)]
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            result = self._sync_client().rerank(
                query,
                docs,
                instruction=self.instruction,
                top_n=self._wire_top_n(len(docs)),
                timeout=self.timeout,
            )
            out = self._scored(nodes, result)
            event.on_end(payload={EventPayload.NODES: out})
        dispatcher.event(ReRankEndEvent(nodes=out))
        return out

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        payload = self._start(nodes, query_bundle)
        query = self._to_query(query_bundle)
        if not nodes:
            dispatcher.event(ReRankEndEvent(nodes=[]))
            return []
        docs = [self._to_doc(n, i) for i, n in enumerate(nodes)]
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            result = await self._async_client().rerank(
                query,
                docs,
                instruction=self.instruction,
                top_n=self._wire_top_n(len(docs)),
                timeout=self.timeout,
            )
            out = self._scored(nodes, result)
            event.on_end(payload={EventPayload.NODES: out})
        dispatcher.event(ReRankEndEvent(nodes=out))
        return out

    def close(self) -> None:
        """Close the sync channel this postprocessor opened (injected clients are left alone)."""
        with self._lock:
            client, self._own_client = self._own_client, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close both channels this postprocessor opened (injected clients are left alone)."""
        self.close()
        with self._lock:
            aclient, self._own_async_client = self._own_async_client, None
        if aclient is not None:
            await aclient.close()
