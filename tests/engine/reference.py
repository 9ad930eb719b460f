"""A deliberately naive Lychee reference: one pair at a time, chat template + tokenizer + image
processor + full HF forward over the whole vocabulary + softmax over (no, yes). Written independently
of the engine's recipe module so the golden tests compare two implementations, not one with itself.

Special-token policy (docs/contract.md), done the naive way: the caller's texts are wrapped in two
marker characters before the template is rendered, so every special token outside the markers is
one the template wrote (a control token) and everything inside them is caller text. The runs of text
between control tokens are tokenized with ``split_special_tokens=True``; the engine instead compiles
the template once with slots (``engine.recipe.Prompt``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from PIL import Image

from lychee_server.domain import SYSTEM_PROMPT, Content
from lychee_server.engine.images import ImageLimits, decode_image

_OPEN, _CLOSE = "\x02", "\x03"  # around caller text while rendering (never in the test inputs)


def _messages(
    instruction: str, query: Content, doc_text: str | None, doc_image: bool
) -> list[dict[str, Any]]:
    def caller(text: str) -> str:
        assert _OPEN not in text and _CLOSE not in text, "reference: marker character in a test input"
        return _OPEN + text + _CLOSE

    content: list[dict[str, Any]] = [
        {"type": "text", "text": "<Instruct>: " + caller(instruction)},
        {"type": "text", "text": "<Query>:"},
    ]
    if query.image is not None:
        content.append({"type": "image"})
    if query.text is not None:
        content.append({"type": "text", "text": caller(query.text)})
    content.append({"type": "text", "text": "\n<Document>:"})
    if doc_image:
        content.append({"type": "image"})
    if doc_text is not None:
        content.append({"type": "text", "text": caller(doc_text)})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


def prompt_ids(processor: Any, msgs: list[dict[str, Any]]) -> list[int]:
    """Token ids of the rendered pair (image placeholders not expanded): control tokens only where
    the template wrote them, caller text always as plain text."""
    tok = processor.tokenizer
    rendered = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    special = {t.content: i for i, t in tok.added_tokens_decoder.items() if t.special}
    control = re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)))
    ids: list[int] = []
    text = ""  # the text run since the last control token
    for k, part in enumerate(re.split(f"{_OPEN}(.*?){_CLOSE}", rendered, flags=re.DOTALL)):
        if k % 2:  # caller text
            text += part
            continue
        pos = 0
        for m in control.finditer(part):
            text += part[pos : m.start()]
            ids += tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []
            ids.append(special[m.group()])
            text, pos = "", m.end()
        text += part[pos:]
    ids += tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []
    return ids


def _inputs(processor: Any, ids: list[int], images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """Model inputs with each image placeholder expanded to one token per merged patch."""
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    out: dict[str, torch.Tensor] = {}
    grids: list[list[int]] = []
    if images:
        pix = processor.image_processor(images=images, return_tensors="pt")
        out["pixel_values"] = pix["pixel_values"]
        out["image_grid_thw"] = pix["image_grid_thw"]
        grids = pix["image_grid_thw"].tolist()
    merge = processor.image_processor.merge_size
    expanded: list[int] = []
    for t in ids:
        if t == image_id:
            th, gh, gw = grids.pop(0)
            expanded += [image_id] * (th * gh * gw // merge**2)
        else:
            expanded.append(t)
    assert not grids, "reference: more images than placeholders"
    input_ids = torch.tensor([expanded])
    out["input_ids"] = input_ids
    out["attention_mask"] = torch.ones_like(input_ids)
    out["mm_token_type_ids"] = (input_ids == image_id).long()
    return out


def reference_prompt_ids(processor: Any, instruction: str, query: Content, doc: Content) -> list[int]:
    """The un-expanded ids the reference scores for one pair (for tests of the token policy)."""
    return prompt_ids(processor, _messages(instruction, query, doc.text, doc.image is not None))


@torch.inference_mode()
def reference_logit(
    model: Any, processor: Any, instruction: str, query: Content, doc: Content, max_length: int
) -> tuple[float, bool]:
    """(logit(yes) - logit(no) via log p(yes) - log p(no), truncated?) for one pair."""
    limits = ImageLimits()
    images = [decode_image(c.image, limits) for c in (query, doc) if c.image is not None]
    inputs = _inputs(processor, reference_prompt_ids(processor, instruction, query, doc), images)
    ids = inputs["input_ids"][0]
    truncated = False
    if len(ids) > max_length:
        # Same rule as the model card's token-id truncation: cut the tail of the document text span
        # (the tokens that differ from the pair rendered with an empty document text).
        empty_doc = Content(text="", image=doc.image) if doc.image is not None else Content(text="")
        empty = _inputs(processor, reference_prompt_ids(processor, instruction, query, empty_doc), images)[
            "input_ids"
        ][0]
        n = min(len(ids), len(empty))
        diff = (ids[:n] != empty[:n]).nonzero()
        im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        end = int((ids == im_end).nonzero()[-1])
        start = int(diff[0]) if len(diff) else n
        excess = len(ids) - max_length
        assert excess <= end - start, "reference: too long"
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[end - excess : end] = False
        for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            inputs[k] = inputs[k][:, keep]
        truncated = True
    out = model(**inputs)
    last = out.logits[0, -1].float()  # full-vocabulary logits (naive on purpose)
    tok = processor.tokenizer
    two = torch.stack([last[tok.convert_tokens_to_ids("no")], last[tok.convert_tokens_to_ids("yes")]])
    p_no, p_yes = torch.softmax(two.double(), dim=0).tolist()
    return math.log(p_yes) - math.log(p_no), truncated
