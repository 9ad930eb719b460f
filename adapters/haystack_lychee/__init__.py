"""Haystack integration for the Lychee rerank service.

:class:`LycheeRanker` is a Haystack ``@component`` ranker: put it after any retriever in a
``Pipeline`` to rerank text and image documents with a Lychee server (``run`` and a native
``run_async``, serialisable to YAML). Only ``haystack-ai`` and the base ``lychee-rerank``
client are needed; neither torch nor the server is imported.
"""

from haystack_lychee.ranker import LycheeRanker

__all__ = ["LycheeRanker"]
