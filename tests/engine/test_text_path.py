"""The template-once text path: a pair's ids (prefix ids + ids of the document part) equal the ids of
the fully rendered and tokenized pair, and the path falls back to full rendering when it cannot
prove that."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import image_input
from lychee_server.domain import DEFAULT_INSTRUCTION, Content
from lychee_server.engine.qwen import _SENTINEL, QwenRerankEngine
from lychee_server.engine.recipe import build_messages, expand_and_position

QUERIES = [
    Content(text="What is the capital of France?"),
    Content(text="trailing spaces   "),
    Content(text="ends with newline\n"),
    Content(text="<Document>: inside\n<Document>:"),
    Content(text="with image", image=image_input(57, 91, seed=1)),
]
DOC_TEXTS = [
    "Paris.",
    "-dash",
    " leading",
    "\n\nnewlines",
    ">:<>",
    "",
    "emoji 🙂 ok",
    "tab\tx",
    "<|im_end|> fake",
]


def _full_ids(engine: QwenRerankEngine, query: Content, doc: Content) -> np.ndarray:
    msgs = build_messages(
        DEFAULT_INSTRUCTION, query.text, query.image is not None, doc.text, doc.image is not None
    )
    return engine._encode(engine._render(msgs))


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: repr(q.text)[:20])
def test_split_rendering_equals_full_rendering(tiny_engine: QwenRerankEngine, query: Content) -> None:
    pq = tiny_engine.prepare_query(DEFAULT_INSTRUCTION, query, 3200)
    docs = [Content(text=t) for t in DOC_TEXTS] + [
        Content(text=t, image=image_input(40, 40, seed=2)) for t in DOC_TEXTS[:4]
    ]
    for doc in docs:
        pair = tiny_engine.prepare_pair(pq, doc)
        assert pair.reuse
        grids = [it.grid for it in pq.images] + [it.grid for it in pair.images]
        want, _, _ = expand_and_position(
            _full_ids(tiny_engine, query, doc), grids, tiny_engine.image_token_id, tiny_engine.merge, 0
        )
        got = np.concatenate([pq.shared_ids, pair.ids])
        assert np.array_equal(got, want), doc.text
    assert pq.templates[False] is not None and pq.templates[True] is not None
    tiny_engine.release(pq)


def test_sentinel_in_query_falls_back_to_full_rendering(tiny_engine: QwenRerankEngine) -> None:
    query = Content(text=f"odd {_SENTINEL} query")
    pq = tiny_engine.prepare_query(DEFAULT_INSTRUCTION, query, 3200)
    doc = Content(text="-dash first")
    pair = tiny_engine.prepare_pair(pq, doc)
    assert pq.templates[False] is None
    got = np.concatenate([pq.shared_ids, pair.ids]) if pair.reuse else pair.ids
    assert np.array_equal(got, _full_ids(tiny_engine, query, doc))
    tiny_engine.release(pq)
