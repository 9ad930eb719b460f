"""LangChain integration for the Lychee rerank service.

:class:`LycheeRerank` is a ``BaseDocumentCompressor``: use it inside
``ContextualCompressionRetriever`` (or call ``rerank`` / ``compress_documents`` directly) to
rerank text and image documents with a Lychee server. Only ``langchain-core`` and the base
``lychee-rerank`` client are needed; neither torch nor the server is imported.
"""

from langchain_lychee.rerank import LycheeRerank

__all__ = ["LycheeRerank"]
