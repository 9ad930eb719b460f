"""A deliberately naive Lychee reference: one pair at a time, processor + chat template + full HF
forward over the whole vocabulary + softmax over (no, yes). Written independently of the engine's
recipe module so the golden tests compare two implementations, not one with itself."""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image

from lychee_server.domain import SYSTEM_PROMPT, Content
from lychee_server.engine.images import ImageLimits, decode_image


def _messages(
    instruction: str, query: Content, doc_text: str | None, doc_image: bool
) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [
        {"type": "text", "text": "<Instruct>: " + instruction},
        {"type": "text", "text": "<Query>:"},
    ]
    if query.image is not None:
        content.append({"type": "image"})
    if query.text is not None:
        content.append({"type": "text", "text": query.text})
    content.append({"type": "text", "text": "\n<Document>:"})
    if doc_image:
        content.append({"type": "image"})
    if doc_text is not None:
        content.append({"type": "text", "text": doc_text})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


def _inputs(processor: Any, msgs: list[dict[str, Any]], images: list[Image.Image]) -> dict[str, torch.Tensor]:
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=images or None, return_tensors="pt"))


@torch.inference_mode()
def reference_logit(
    model: Any, processor: Any, instruction: str, query: Content, doc: Content, max_length: int
) -> tuple[float, bool]:
    """(logit(yes) - logit(no) via log p(yes) - log p(no), truncated?) for one pair."""
    limits = ImageLimits()
    images = [decode_image(c.image, limits) for c in (query, doc) if c.image is not None]
    inputs = _inputs(processor, _messages(instruction, query, doc.text, doc.image is not None), images)
    ids = inputs["input_ids"][0]
    truncated = False
    if len(ids) > max_length:
        # Same rule as the model card's token-id truncation: cut the tail of the document text span
        # (the tokens that differ from the pair rendered with an empty document text).
        empty = _inputs(processor, _messages(instruction, query, "", doc.image is not None), images)[
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
            if k in inputs:
                inputs[k] = inputs[k][:, keep]
        truncated = True
    out = model(**inputs)
    last = out.logits[0, -1].float()  # full-vocabulary logits (naive on purpose)
    tok = processor.tokenizer
    two = torch.stack([last[tok.convert_tokens_to_ids("no")], last[tok.convert_tokens_to_ids("yes")]])
    p_no, p_yes = torch.softmax(two.double(), dim=0).tolist()
    return math.log(p_yes) - math.log(p_no), truncated
