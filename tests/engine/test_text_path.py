"""The template-once text path: a pair's ids (prefix ids + ids of the document part) equal the ids of
the whole pair as the naive reference builds them, and the path falls back to the uncut prompt when
it cannot prove that. No caller text (not even the engine's own slot marks) leaves the fast path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from reference import reference_logit, reference_prompt_ids

from helpers import image_input
from lychee_server.domain import DEFAULT_INSTRUCTION, Content
from lychee_server.engine.interface import probability
from lychee_server.engine.qwen import QwenRerankEngine
from lychee_server.engine.recipe import SLOTS, expand_and_position

OLD_SENTINEL = "\ue000lychee-doc\ue000"  # the mark the engine used to look for in rendered text

QUERIES = [
    Content(text="What is the capital of France?"),
    Content(text="trailing spaces   "),
    Content(text="ends with newline\n"),
    Content(text="<Document>: inside\n<Document>:"),
    Content(text="with image", image=image_input(57, 91, seed=1)),
    Content(image=image_input(40, 60, seed=3)),
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


def _full_ids(processor: Any, query: Content, doc: Content) -> np.ndarray:
    return np.asarray(reference_prompt_ids(processor, DEFAULT_INSTRUCTION, query, doc), dtype=np.int64)


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: repr(q.text)[:20])
def test_split_rendering_equals_full_rendering(
    tiny_engine: QwenRerankEngine, query: Content, ref_processor: Any
) -> None:
    pq = tiny_engine.prepare_query(DEFAULT_INSTRUCTION, query, 3200)
    docs = [
        *(Content(text=t) for t in DOC_TEXTS),
        *(Content(text=t, image=image_input(40, 40, seed=2)) for t in DOC_TEXTS[:4]),
        Content(image=image_input(30, 50, seed=4)),
    ]
    for doc in docs:
        pair = tiny_engine.prepare_pair(pq, doc)
        assert pair.reuse
        grids = [it.grid for it in pq.images] + [it.grid for it in pair.images]
        want, _, _ = expand_and_position(
            _full_ids(ref_processor, query, doc), grids, tiny_engine.image_token_id, tiny_engine.merge, 0
        )
        got = np.concatenate([pq.shared_ids, pair.ids])
        assert np.array_equal(got, want), doc.text
    assert all(pq.templates[k] is not None for k in ((True, False), (True, True), (False, True)))
    tiny_engine.release(pq)


@pytest.mark.parametrize(
    "text",
    [
        f"odd {OLD_SENTINEL} query",
        OLD_SENTINEL,
        *(f"x {m} y" for m in SLOTS.values()),
        "".join(SLOTS.values()),
    ],
    ids=["old-sentinel", "only-old-sentinel", "slot-instruction", "slot-query", "slot-document", "all-slots"],
)
def test_marks_in_caller_text_take_the_fast_path(
    tiny_engine: QwenRerankEngine, text: str, ref_model: Any, ref_processor: Any
) -> None:
    """The engine's marks are never searched in caller text: a query, instruction or document
    spelling them is plain text, takes the cut (fast) path and scores as the reference."""
    query = Content(text=text)
    pq = tiny_engine.prepare_query(text, query, 3200)  # in the instruction too
    docs = [Content(text="-dash first"), Content(text=f"doc with {text}")]
    pairs = [tiny_engine.prepare_pair(pq, d) for d in docs]
    assert pq.templates[(True, False)] is not None and all(p.reuse for p in pairs)
    for doc, pair, got in zip(docs, pairs, tiny_engine.score(pairs), strict=True):
        ids = np.concatenate([pq.shared_ids, pair.ids])
        assert np.array_equal(ids, reference_prompt_ids(ref_processor, text, query, doc))
        want, _ = reference_logit(ref_model, ref_processor, text, query, doc, 3200)
        assert abs(got - want) <= 1e-5 and abs(probability(got) - probability(want)) <= 1e-5
    tiny_engine.release(pq)


def test_prompts_are_compiled_once_not_rendered_per_request(tiny_engine: QwenRerankEngine) -> None:
    """The chat template is rendered at start-up (one compiled prompt per pair shape), not per call."""
    calls = 0
    render = tiny_engine._render

    def counting(messages):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return render(messages)

    tiny_engine._render = counting  # type: ignore[method-assign]
    try:
        pq = tiny_engine.prepare_query(DEFAULT_INSTRUCTION, Content(text="q?"), 3200)
        tiny_engine.prepare_pair(pq, Content(text="d"))
        tiny_engine.prepare_pair(pq, Content(text="e", image=image_input(30, 30, seed=5)))
    finally:
        del tiny_engine._render
    assert calls == 0
    assert len(tiny_engine._prompts) == 9
    tiny_engine.release(pq)


def test_unproven_cut_falls_back_to_the_uncut_prompt(
    tiny_engine: QwenRerankEngine, ref_processor: Any
) -> None:
    """A document part that does not reproduce the uncut prompt on the probes is not used (here a
    wrong one: the part of another document shape); pairs then take the uncut prompt, same ids."""
    shape = (True, False, True, False)
    right = tiny_engine._suffixes[shape]
    tiny_engine._suffixes[shape] = tiny_engine._suffixes[(True, False, True, True)]
    try:
        query = Content(text="What is the capital of France?")
        pq = tiny_engine.prepare_query(DEFAULT_INSTRUCTION, query, 3200)
        docs = [Content(text=t) for t in DOC_TEXTS]
        pairs = [tiny_engine.prepare_pair(pq, d) for d in docs]
        assert pq.templates[(True, False)] is None
        for doc, pair in zip(docs, pairs, strict=True):
            got = np.concatenate([pq.shared_ids, pair.ids]) if pair.reuse else pair.ids
            assert np.array_equal(got, _full_ids(ref_processor, query, doc)), doc.text
        tiny_engine.release(pq)
    finally:
        tiny_engine._suffixes[shape] = right
