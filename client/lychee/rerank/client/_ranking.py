"""The framework adapters' one selection rule (LangChain, LlamaIndex, Haystack), in one place.

Not part of the public API: the adapters ship in the same distribution as this client.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lychee.rerank.client._errors import ServerError
from lychee.rerank.client._types import RankedDocument

__all__ = ["select_ranked"]


def select_ranked(
    results: Sequence[RankedDocument],
    n_documents: int,
    *,
    top_n: int | None,
    score_threshold: float | None,
) -> list[RankedDocument]:
    """The results by descending score (ties keep input order), the best ``top_n``, then those
    scoring at least ``score_threshold`` (in that order, always).

    Results that cannot be attributed to exactly one input document (out of range, repeated,
    missing) or that carry NaN raise :class:`ServerError` (reason INVALID_RESPONSE): attaching a
    score to the wrong document would be a silent, unrecoverable bug downstream.
    """
    expected = n_documents if top_n is None else min(top_n, n_documents)
    seen: set[int] = set()
    for r in results:
        if not 0 <= r.index < n_documents:
            raise ServerError(
                f"reranker returned index {r.index} for {n_documents} documents", reason="INVALID_RESPONSE"
            )
        if r.index in seen:
            raise ServerError(f"reranker returned index {r.index} twice", reason="INVALID_RESPONSE")
        if math.isnan(r.score):
            raise ServerError(f"reranker returned NaN for index {r.index}", reason="INVALID_RESPONSE")
        seen.add(r.index)
    if len(results) < expected:
        raise ServerError(
            f"reranker returned {len(results)} results, expected {expected}", reason="INVALID_RESPONSE"
        )
    ranked = sorted(results, key=lambda r: (-r.score, r.index))[:expected]
    if score_threshold is not None:
        ranked = [r for r in ranked if r.score >= score_threshold]
    return ranked
