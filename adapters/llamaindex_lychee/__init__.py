"""LlamaIndex integration for the Lychee rerank service.

:class:`LycheeRerank` is a ``BaseNodePostprocessor``: pass it as ``node_postprocessors=[...]``
to a query engine (or call ``postprocess_nodes`` / ``apostprocess_nodes`` directly) to rerank
text and image nodes with a Lychee server. Only ``llama-index-core`` and the base
``lychee-rerank`` client are needed; neither torch nor the server is imported.
"""

from llamaindex_lychee.rerank import LycheeRerank

__all__ = ["LycheeRerank"]
