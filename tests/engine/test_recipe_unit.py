"""``engine.recipe`` on its own (no model, no tokenizer: characters as token ids), every expectation
written out by hand: the message layout, M-RoPE positions, the document span and the compiled
prompt's cut. Fast (the mutation-testing subset of the recipe, scripts/mutation.sh)."""

from __future__ import annotations

import numpy as np
import pytest

from lychee_server.domain import SYSTEM_PROMPT
from lychee_server.engine.recipe import (
    DOCUMENT_MARKER,
    Prompt,
    Slot,
    build_messages,
    document_segment,
    expand_and_position,
    image_token_count,
)

SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
PAD = 9  # the image placeholder id in these tests


def _enc(s: str) -> np.ndarray:
    return np.array([ord(c) for c in s], dtype=np.int64)


def test_system_prompt_and_marker_are_the_recipe() -> None:
    assert SYSTEM_PROMPT == SYSTEM
    assert DOCUMENT_MARKER == "\n<Document>:"


def test_messages_text_pair() -> None:
    assert build_messages("inst", "q", False, "d", False) == [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<Instruct>: inst"},
                {"type": "text", "text": "<Query>:"},
                {"type": "text", "text": "q"},
                {"type": "text", "text": "\n<Document>:"},
                {"type": "text", "text": "d"},
            ],
        },
    ]


def test_messages_images_come_before_text_and_absent_parts_are_absent() -> None:
    user = build_messages("i", "q", True, "d", True)[1]["content"]
    assert [c["type"] for c in user] == ["text", "text", "image", "text", "text", "image", "text"]
    assert [c.get("text") for c in user] == [
        "<Instruct>: i",
        "<Query>:",
        None,
        "q",
        "\n<Document>:",
        None,
        "d",
    ]
    user = build_messages("i", None, True, None, True)[1]["content"]
    assert [c.get("text") for c in user] == ["<Instruct>: i", "<Query>:", None, "\n<Document>:", None]
    user = build_messages("i", "", False, "", False)[1]["content"]  # empty text is still an item
    assert [c.get("text") for c in user] == ["<Instruct>: i", "<Query>:", "", "\n<Document>:", ""]


def test_image_token_count() -> None:
    assert image_token_count((1, 60, 82), 2) == 1230
    assert image_token_count((2, 4, 6), 2) == 12
    assert image_token_count((1, 6, 6), 3) == 4


def test_positions_text_only_start_anywhere() -> None:
    ids, pos, nxt = expand_and_position(np.array([5, 6, 7]), [], PAD, 2, 10)
    assert ids.tolist() == [5, 6, 7]
    assert pos.tolist() == [[10, 11, 12]] * 3
    assert nxt == 13 and pos.dtype == np.int64


def test_positions_of_an_image_between_text() -> None:
    # text(2) image(grid 1 x 4 x 6 -> 2 x 3 merged) text(2), start 0:
    # text 0, 1; image t = 2, h = 2 + row, w = 2 + col; next = 2 + max(2, 3) = 5; text 5, 6.
    ids, pos, nxt = expand_and_position(np.array([1, 2, PAD, 3, 4]), [(1, 4, 6)], PAD, 2, 0)
    assert ids.tolist() == [1, 2] + [PAD] * 6 + [3, 4]
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]
    assert pos[1].tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert nxt == 7


def test_positions_two_images_back_to_back_and_tall_image() -> None:
    # image 3 x 1 merged (grid 1 x 6 x 2) at start 4, then image 1 x 1 at 4 + 3 = 7, then next 8.
    ids, pos, nxt = expand_and_position(np.array([PAD, PAD]), [(1, 6, 2), (1, 2, 2)], PAD, 2, 4)
    assert ids.tolist() == [PAD] * 4
    assert pos.tolist() == [[4, 4, 4, 7], [4, 5, 6, 7], [4, 4, 4, 7]]
    assert nxt == 8


def test_positions_temporal_axis() -> None:
    # t = 2 frames of 1 x 2 merged: t axis 0, 0, 1, 1; next advances by max(1, 2, 2) = 2.
    ids, pos, nxt = expand_and_position(np.array([PAD]), [(2, 2, 4)], PAD, 2, 0)
    assert ids.tolist() == [PAD] * 4
    assert pos.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]]
    assert nxt == 2


def test_positions_reject_a_count_mismatch_and_handle_empty() -> None:
    with pytest.raises(ValueError, match="1 image placeholders for 2 images"):
        expand_and_position(np.array([PAD]), [(1, 2, 2), (1, 2, 2)], PAD, 2, 0)
    ids, pos, nxt = expand_and_position(np.array([], dtype=np.int64), [], PAD, 2, 3)
    assert ids.tolist() == [] and pos.shape == (3, 0) and nxt == 3


def test_document_segment() -> None:
    END = 2
    full = np.array([1, 5, 6, 7, 8, END, 1, 4])  # ... doc tokens 6, 7, 8 ... <|im_end|> assistant
    empty = np.array([1, 5, END, 1, 4])
    assert document_segment(full, empty, END) == (2, 5)
    # No difference at all (empty document): the span is empty at <|im_end|>.
    assert document_segment(empty, empty, END) == (2, 2)
    # A document whose first token merged with the marker: the span starts at the merged token.
    assert document_segment(np.array([1, 55, 7, END, 1]), np.array([1, 5, END, 1]), END) == (1, 3)
    # The last <|im_end|> counts (the system turn has one too).
    assert document_segment(np.array([END, 5, 6, END, 1]), np.array([END, 5, END, 1]), END) == (2, 3)


MARKS = {"query": "\ue000Q\ue001", "document": "\ue000D\ue001"}
CONTROL = {"<s>": 1, "<e>": 2, "<ss>": 3}


def test_prompt_compile_segments_ids_and_render() -> None:
    rendered = "<s>sys<e>\n<s>user\nQ:" + MARKS["query"] + "\nD:" + MARKS["document"] + "<e><ss>"
    prompt = Prompt.compile(rendered, CONTROL, MARKS, _enc)
    assert prompt.segments == (
        1,
        ("sys",),
        2,
        ("\n",),
        1,
        ("user\nQ:", Slot("query"), "\nD:", Slot("document")),
        2,
        3,  # longest match first: <ss>, not <s> + "s>"
    )
    assert prompt.slot_names == frozenset({"query", "document"})
    values = {"query": "ab", "document": "<e>"}
    assert prompt.ids(values).tolist() == [1, *_enc("sys"), 2, 10, 1, *_enc("user\nQ:ab\nD:<e>"), 2, 3]
    names = {1: "<s>", 2: "<e>", 3: "<ss>"}
    assert prompt.render(values, names) == "<s>sys<e>\n<s>user\nQ:ab\nD:<e><e><ss>"


def test_prompt_encodes_constant_segments_once() -> None:
    calls: list[str] = []

    def enc(s: str) -> np.ndarray:
        calls.append(s)
        return _enc(s)

    prompt = Prompt.compile("<s>sys<e>x" + MARKS["query"], CONTROL, {"query": MARKS["query"]}, enc)
    assert calls == ["sys"]
    prompt.ids({"query": "1"})
    prompt.ids({"query": "2"})
    assert calls == ["sys", "x1", "x2"]
    assert Prompt([], enc).ids({}).tolist() == []


def test_prompt_compile_errors() -> None:
    rendered = "<s>Q:" + MARKS["query"] + "<e>"
    with pytest.raises(ValueError, match="occurs 2 times"):
        Prompt.compile(rendered + MARKS["query"], CONTROL, {"query": MARKS["query"]}, _enc)
    with pytest.raises(ValueError, match="occurs 0 times"):
        Prompt.compile("<s>Q:<e>", CONTROL, {"query": MARKS["query"]}, _enc)
    with pytest.raises(ValueError, match="cut by a control token"):
        Prompt.compile("x\ue000<e>Q\ue001", {"<e>": 2}, {"query": "\ue000<e>Q\ue001"}, _enc)
    # No control tokens at all: one text segment.
    assert Prompt.compile("ab" + MARKS["query"], {}, {"query": MARKS["query"]}, _enc).segments == (
        ("ab", Slot("query")),
    )


def test_prompt_split_through_the_marker() -> None:
    rendered = "<s>u\nQ:" + MARKS["query"] + DOCUMENT_MARKER + MARKS["document"] + "<e><s>a\n"
    prompt = Prompt.compile(rendered, CONTROL, MARKS, _enc)
    head, tail = prompt.split(DOCUMENT_MARKER, 1)
    assert head.segments == (1, ("u\nQ:", Slot("query"), "\n"))
    assert tail.segments == (("<Document>:", Slot("document")), 2, 1, ("a\n",))
    values = {"query": "q", "document": "d"}
    assert np.concatenate([head.ids(values), tail.ids(values)]).tolist() == prompt.ids(values).tolist()
    # Cut at the start of the marker and at its end: empty pieces are dropped.
    head0, tail0 = prompt.split(DOCUMENT_MARKER, 0)
    assert head0.segments[-1] == ("u\nQ:", Slot("query")) and tail0.segments[0][0] == DOCUMENT_MARKER
    head_end, tail_end = prompt.split(DOCUMENT_MARKER, len(DOCUMENT_MARKER))
    assert head_end.segments[-1][-1] == DOCUMENT_MARKER and tail_end.segments[0] == (Slot("document"),)
    only = Prompt.compile("<s>" + DOCUMENT_MARKER + "<e>", CONTROL, {}, _enc)
    h, t = only.split(DOCUMENT_MARKER, len(DOCUMENT_MARKER))
    assert h.segments == (1, (DOCUMENT_MARKER,)) and t.segments == (2,)
    h, t = only.split(DOCUMENT_MARKER, 0)
    assert h.segments == (1,) and t.segments == ((DOCUMENT_MARKER,), 2)
    with pytest.raises(ValueError, match="occurs in 0 literals"):
        prompt.split("<Nope>", 0)
    twice = Prompt.compile("a\nX<e>b\nX", CONTROL, {}, _enc)
    with pytest.raises(ValueError, match="occurs in 2 literals"):
        twice.split("\nX", 1)


def test_counts_are_ints_and_text_between_images_advances() -> None:
    n = image_token_count((1, 60, 82), 2)
    assert n == 1230 and isinstance(n, int)
    # image (1 merged), two text tokens, image: text at 1, 2 (idx 3 - prev 1 = 2 tokens), image at 3.
    ids, pos, nxt = expand_and_position(np.array([PAD, 5, 6, PAD]), [(1, 2, 2), (1, 2, 2)], PAD, 2, 0)
    assert ids.tolist() == [PAD, 5, 6, PAD]
    assert pos.tolist() == [[0, 1, 2, 3]] * 3 and nxt == 4


def test_slot_is_a_frozen_hashable_value() -> None:
    import dataclasses

    slot = Slot("query")
    assert slot == Slot("query") and hash(slot) == hash(Slot("query")) and slot != Slot("document")
    with pytest.raises(dataclasses.FrozenInstanceError):
        slot.name = "document"  # type: ignore[misc]


def test_prompt_split_at_an_odd_offset_into_a_literal() -> None:
    prompt = Prompt.compile("<s>a" + DOCUMENT_MARKER + "<e>", CONTROL, {}, _enc)  # marker at index 1
    head, tail = prompt.split(DOCUMENT_MARKER, 1)
    assert head.segments == (1, ("a\n",)) and tail.segments == (("<Document>:",), 2)


def _naive_positions(
    ids: list[int], grids: list[tuple[int, int, int]], start: int
) -> tuple[list[int], list[list[int]], int]:
    """get_rope_index for still images, one token at a time (written independently of the engine)."""
    out_ids: list[int] = []
    axes: list[list[int]] = [[], [], []]
    cur, g = start, iter(grids)
    for tok in ids:
        if tok != PAD:
            out_ids.append(tok)
            for a in axes:
                a.append(cur)
            cur += 1
            continue
        t, h, w = next(g)
        gh, gw = h // 2, w // 2
        for ti in range(t):
            for r in range(gh):
                for c in range(gw):
                    out_ids.append(PAD)
                    axes[0].append(cur + ti)
                    axes[1].append(cur + r)
                    axes[2].append(cur + c)
        cur += max(gh, gw, t)
    return out_ids, axes, cur


@pytest.mark.parametrize("seed", range(12))
def test_positions_equal_a_per_token_reference_on_random_layouts(seed: int) -> None:
    """Random text runs (ids above the placeholder's too), 0-3 images of random grids, odd starts."""
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    grids: list[tuple[int, int, int]] = []
    for _ in range(int(rng.integers(0, 4))):
        ids += [int(x) for x in rng.choice([3, 5, PAD + 1, PAD + 7, 40], size=int(rng.integers(0, 6)))]
        ids.append(PAD)
        grids.append((int(rng.integers(1, 3)), 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))))
    ids += [int(x) for x in rng.choice([3, PAD + 2, 11], size=int(rng.integers(0, 5)))]
    start = int(rng.integers(0, 40)) * 2 + 1
    got_ids, got_pos, nxt = expand_and_position(np.array(ids, dtype=np.int64), grids, PAD, 2, start)
    want_ids, want_pos, want_next = _naive_positions(ids, grids, start)
    assert got_ids.tolist() == want_ids
    assert got_pos.tolist() == (want_pos if want_ids else [[], [], []])
    assert nxt == want_next


def test_positions_reject_more_placeholders_than_images() -> None:
    with pytest.raises(ValueError, match="2 image placeholders for 1 images"):
        expand_and_position(np.array([PAD, 5, PAD]), [(1, 2, 2)], PAD, 2, 0)


def test_document_segment_where_the_document_token_is_smaller() -> None:
    END = 2
    # The first differing token of the full pair is *smaller* than the empty pair's.
    assert document_segment(np.array([1, 5, 3, 7, END, 1]), np.array([1, 5, 8, END, 1]), END) == (2, 4)


def test_compile_matches_the_longest_control_token_first() -> None:
    control = {"<a>": 1, "<a>b": 2}
    assert Prompt.compile("<a>bc<a>", control, {}, _enc).segments == (2, ("c",), 1)


def test_compile_names_the_slot_a_control_token_swallowed() -> None:
    mark = MARKS["query"]
    with pytest.raises(ValueError, match=r"slots \['query'\] were cut"):
        Prompt.compile("a<x" + mark + ">b", {"<x" + mark + ">": 5}, {"query": mark}, _enc)


def test_split_in_a_literal_at_an_odd_index_after_later_segments() -> None:
    """The marker in part 1 of segment 3 (both odd, past the first): the parts and segments after it."""
    rendered = "<s>x<e>" + MARKS["query"] + "y" + DOCUMENT_MARKER + "z" + MARKS["document"] + "<e><s>w"
    prompt = Prompt.compile(rendered, CONTROL, MARKS, _enc)
    assert prompt.segments[3] == (Slot("query"), "y" + DOCUMENT_MARKER + "z", Slot("document"))
    head, tail = prompt.split(DOCUMENT_MARKER, 1)
    assert head.segments == (1, ("x",), 2, (Slot("query"), "y\n"))
    assert tail.segments == (("<Document>:z", Slot("document")), 2, 1, ("w",))
    values = {"query": "Q", "document": "D"}
    assert np.concatenate([head.ids(values), tail.ids(values)]).tolist() == prompt.ids(values).tolist()


def test_slot_has_no_instance_dict() -> None:
    assert not hasattr(Slot("query"), "__dict__")


def test_compile_names_only_the_slots_that_were_cut() -> None:
    q, d = MARKS["query"], MARKS["document"]
    with pytest.raises(ValueError, match=r"slots \['query'\] were cut"):
        Prompt.compile("a<x" + q + ">b" + d, {"<x" + q + ">": 5}, MARKS, _enc)


def test_split_at_the_end_of_a_later_segment_keeps_every_segment_after_it() -> None:
    prompt = Prompt.compile("<s>x<e>abc" + DOCUMENT_MARKER + "<e><s>w", CONTROL, {}, _enc)
    assert prompt.segments[3] == ("abc" + DOCUMENT_MARKER,)
    head, tail = prompt.split(DOCUMENT_MARKER, len(DOCUMENT_MARKER))  # nothing left of the literal
    assert head.segments == (1, ("x",), 2, ("abc" + DOCUMENT_MARKER,))
    assert tail.segments == (2, 1, ("w",))
