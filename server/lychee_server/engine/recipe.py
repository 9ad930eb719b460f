"""The Lychee prompt recipe and the token-level helpers around it (pure CPU, no model).

Why separate: the recipe (message layout, truncation rule, Qwen2.5-VL M-RoPE positions) is the
contract the golden tests pin down; keeping it free of torch modules makes it easy to read and test.

Special-token policy (``docs/contract.md``): the chat template's own structure keeps its control
tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ...), while caller text (instruction,
query text, document text) is always tokenized as plain text, so text that spells a control token
becomes ordinary pieces and can never close a turn or forge an assistant answer. :class:`Prompt`
implements it: the template is rendered once per pair shape with *slots* where caller text goes,
cut at its control tokens, and each text segment between two control tokens is tokenized with
special tokens split. For text without such spellings the ids equal those of tokenizing the whole
rendered string (HF tokenizers cut added tokens out before pre-tokenization, so a segment between
two control tokens is tokenized on its own either way).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lychee_server.domain import SYSTEM_PROMPT

__all__ = [
    "DOCUMENT_MARKER",
    "SLOTS",
    "Prompt",
    "Slot",
    "build_messages",
    "document_segment",
    "expand_and_position",
    "image_token_count",
]

DOCUMENT_MARKER = "\n<Document>:"


def build_messages(
    instruction: str,
    query_text: str | None,
    query_has_image: bool,
    doc_text: str | None,
    doc_has_image: bool,
) -> list[dict[str, Any]]:
    """The chat messages of one (query, document) pair, exactly as the Lychee model card lays them out."""
    content: list[dict[str, Any]] = [
        {"type": "text", "text": f"<Instruct>: {instruction}"},
        {"type": "text", "text": "<Query>:"},
    ]
    if query_has_image:
        content.append({"type": "image"})
    if query_text is not None:
        content.append({"type": "text", "text": query_text})
    content.append({"type": "text", "text": DOCUMENT_MARKER})
    if doc_has_image:
        content.append({"type": "image"})
    if doc_text is not None:
        content.append({"type": "text", "text": doc_text})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


def image_token_count(grid: tuple[int, int, int], merge: int) -> int:
    t, h, w = grid
    return t * h * w // (merge * merge)


def expand_and_position(
    ids: np.ndarray,
    grids: Sequence[tuple[int, int, int]],
    image_token_id: int,
    merge: int,
    start: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Expand each single ``<|image_pad|>`` into one per merged patch and compute 3-D M-RoPE positions.

    Mirrors Qwen2.5-VL's ``get_rope_index`` for still images: text advances all three axes by one
    per token; an image of ``gh x gw`` merged patches gets (start, start+row, start+col) and then
    advances the position by ``max(gh, gw)``. ``start`` lets a suffix continue after a cached prefix.
    Returns (expanded ids, positions of shape (3, L), next position).
    """
    pads = np.flatnonzero(ids == image_token_id)
    if len(pads) != len(grids):
        raise ValueError(f"{len(pads)} image placeholders for {len(grids)} images")
    id_parts: list[np.ndarray] = []
    pos_parts: list[np.ndarray] = []
    cur = start
    prev = 0
    for idx, (t, h, w) in zip(pads.tolist(), grids, strict=True):
        n_text = idx - prev
        if n_text:
            id_parts.append(ids[prev:idx])
            pos_parts.append(np.broadcast_to(np.arange(cur, cur + n_text), (3, n_text)))
            cur += n_text
        gh, gw = h // merge, w // merge
        n = t * gh * gw
        tpos = np.repeat(np.arange(t), gh * gw) + cur
        hpos = np.tile(np.repeat(np.arange(gh), gw), t) + cur
        wpos = np.tile(np.arange(gw), t * gh) + cur
        id_parts.append(np.full(n, image_token_id, dtype=ids.dtype))
        pos_parts.append(np.stack([tpos, hpos, wpos]))
        cur += max(gh, gw, t)
        prev = idx + 1
    n_text = len(ids) - prev
    if n_text:
        id_parts.append(ids[prev:])
        pos_parts.append(np.broadcast_to(np.arange(cur, cur + n_text), (3, n_text)))
        cur += n_text
    if not id_parts:
        return ids[:0].copy(), np.zeros((3, 0), dtype=np.int64), cur
    return np.concatenate(id_parts), np.concatenate(pos_parts, axis=1).astype(np.int64), cur


def document_segment(full_ids: np.ndarray, no_text_ids: np.ndarray, im_end_id: int) -> tuple[int, int]:
    """Token span ``[start, end)`` of the document text inside a rendered pair.

    ``no_text_ids`` is the same pair rendered with an empty document text. ``start`` is where the
    two first differ; ``end`` is the last ``<|im_end|>`` (the template tail is never cut). The
    truncation rule is: keep ``full_ids[:start] + full_ids[start:start+keep] + full_ids[end:]``.
    """
    n = min(len(full_ids), len(no_text_ids))
    diff = np.flatnonzero(full_ids[:n] != no_text_ids[:n])
    start = int(diff[0]) if len(diff) else n
    ends = np.flatnonzero(full_ids == im_end_id)
    end = int(ends[-1])
    return min(start, end), end


# Marks that stand for caller text while the template is rendered once per pair shape. They only
# have to differ from the template's own output (checked in compile); caller text is never searched
# for them: it is put into the compiled prompt by position, so a mark inside caller text is just text.
SLOTS: dict[str, str] = {
    "instruction": "\ue000lychee-slot-instruction\ue001",
    "query": "\ue000lychee-slot-query\ue001",
    "document": "\ue000lychee-slot-document\ue001",
}


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one caller text (``instruction``, ``query`` or ``document``) goes in a text segment."""

    name: str


Segment = int | tuple[str | Slot, ...]  # a control token id, or text made of literals and slots
Values = Mapping[str, str]
Encode = Callable[[str], np.ndarray]


class Prompt:
    """One pair shape's chat template, compiled: control tokens as ids, text segments with slots.

    ``encode`` tokenizes text with special tokens split (never yields a control token); segments
    without a slot are tokenized once here. Thread-safe (immutable after construction).
    """

    def __init__(self, segments: Sequence[Segment], encode: Encode) -> None:
        self.segments: tuple[Segment, ...] = tuple(segments)
        self._encode = encode
        self._const: dict[int, np.ndarray] = {}
        for i, seg in enumerate(self.segments):
            if not isinstance(seg, int) and not any(isinstance(p, Slot) for p in seg):
                self._const[i] = encode("".join(p for p in seg if isinstance(p, str)))

    @classmethod
    def compile(
        cls, rendered: str, control: Mapping[str, int], slots: Mapping[str, str], encode: Encode
    ) -> Prompt:
        """Compile ``rendered`` (the template rendered with ``slots`` marks for caller text).

        ``control``: every special token of the tokenizer (string -> id); each occurrence in
        ``rendered`` is the template's own (no caller text is in it). Raises ``ValueError`` when a
        mark does not occur exactly once or sits inside a control token.
        """
        for name, mark in slots.items():
            if rendered.count(mark) != 1:
                raise ValueError(
                    f"slot {name!r}: its mark occurs {rendered.count(mark)} times in the template"
                )
        by_mark = {mark: name for name, mark in slots.items()}
        tokens = sorted(control, key=len, reverse=True)  # leftmost-longest, as the tokenizer matches
        token_re = re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None
        mark_re = re.compile("(" + "|".join(re.escape(m) for m in by_mark) + ")") if by_mark else None
        segments: list[Segment] = []

        def text(chunk: str) -> None:
            if not chunk:
                return
            pieces = mark_re.split(chunk) if mark_re is not None else [chunk]
            parts = tuple(Slot(by_mark[p]) if p in by_mark else p for p in pieces if p)
            segments.append(parts)

        pos = 0
        for m in token_re.finditer(rendered) if token_re is not None else ():
            text(rendered[pos : m.start()])
            segments.append(int(control[m.group()]))
            pos = m.end()
        text(rendered[pos:])
        found = {p.name for seg in segments if not isinstance(seg, int) for p in seg if isinstance(p, Slot)}
        if found != set(slots):
            raise ValueError(f"slots {sorted(set(slots) - found)} were cut by a control token")
        return cls(segments, encode)

    @property
    def slot_names(self) -> frozenset[str]:
        return frozenset(
            p.name for seg in self.segments if not isinstance(seg, int) for p in seg if isinstance(p, Slot)
        )

    def ids(self, values: Values) -> np.ndarray:
        """Token ids of the prompt with ``values`` in its slots (caller text stays text)."""
        out: list[np.ndarray] = []
        for i, seg in enumerate(self.segments):
            if isinstance(seg, int):
                out.append(np.array([seg], dtype=np.int64))
            elif i in self._const:
                out.append(self._const[i])
            else:
                out.append(self._encode("".join(values[p.name] if isinstance(p, Slot) else p for p in seg)))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def render(self, values: Values, names: Mapping[int, str]) -> str:
        """The prompt as a string (control ids as their ``names``), to compare with the template."""
        return "".join(
            names[seg]
            if isinstance(seg, int)
            else "".join(values[p.name] if isinstance(p, Slot) else p for p in seg)
            for seg in self.segments
        )

    def split(self, marker: str, offset: int) -> tuple[Prompt, Prompt]:
        """Cut the prompt ``offset`` characters into the one literal that contains ``marker``."""
        hits = [
            (i, j)
            for i, seg in enumerate(self.segments)
            if not isinstance(seg, int)
            for j, p in enumerate(seg)
            if isinstance(p, str) and marker in p
        ]
        if len(hits) != 1:
            raise ValueError(f"{marker!r} occurs in {len(hits)} literals of the template")
        i, j = hits[0]
        seg = self.segments[i]
        assert not isinstance(seg, int)
        lit = seg[j]
        assert isinstance(lit, str)
        at = lit.index(marker) + offset
        head = tuple(p for p in (*seg[:j], lit[:at]) if p != "")
        tail = tuple(p for p in (lit[at:], *seg[j + 1 :]) if p != "")
        before: list[Segment] = [*self.segments[:i], head] if head else list(self.segments[:i])
        after: list[Segment] = [tail, *self.segments[i + 1 :]] if tail else list(self.segments[i + 1 :])
        return Prompt(before, self._encode), Prompt(after, self._encode)
