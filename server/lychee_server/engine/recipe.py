"""The Lychee prompt recipe and the token-level helpers around it (pure CPU, no model).

Why separate: the recipe (message layout, truncation rule, Qwen2.5-VL M-RoPE positions) is the
contract the golden tests pin down; keeping it free of torch modules makes it easy to read and test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lychee_server.domain import SYSTEM_PROMPT

__all__ = [
    "DOCUMENT_MARKER",
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
