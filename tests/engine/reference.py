"""A deliberately naive Lychee reference, independent of the engine: one pair at a time, chat template
+ tokenizer + image processor + full HF forward over the whole vocabulary + softmax over (no, yes).

Nothing here comes from ``lychee_server`` (``test_reference_independence.py`` asserts it): the system
prompt and the message layout are transcribed from the published recipe (vec-ai/lychee-rerank-mm);
images are decoded with PIL here; the processor and the model are loaded from the checkpoint
directory by the tests (``conftest.py``), with the recipe's pixel bounds set there; the yes/no ids
come from encoding the words with the checkpoint's tokenizer; truncation is written from the
contract's rule ("the document text is truncated to fit", tail first) with character offsets.

Special-token policy (docs/contract.md "Special tokens"), done the naive way: the caller's texts are
wrapped in marker characters before the template is rendered, so every special token outside the
markers is one the template wrote (a control token) and everything inside them is caller text. The
runs of text between control tokens are tokenized with ``split_special_tokens=True``; the engine
instead compiles the template once with slots (``engine.recipe.Prompt``).

Inputs are duck-typed: a query / document is anything with ``.text`` (str or None) and ``.image``
(None or an object with ``.data``, the encoded bytes).
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import torch
from PIL import Image, ImageOps

# The published recipe (model card of vec-ai/lychee-rerank-mm), typed here from it, not imported.
SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
RECIPE_MIN_PIXELS = 4 * 28 * 28
RECIPE_MAX_PIXELS = 1280 * 28 * 28
MIN_SIDE = 28  # the contract: images under 28 px on a side are scaled up (one 2x2 merge of 14 px)

_OPEN, _CLOSE = "\x02", "\x03"  # around caller text while rendering (never in the test inputs)
_DOC_OPEN, _DOC_CLOSE = "\x04", "\x05"  # around the document text (where truncation cuts)


def load_processor(path: Any, min_pixels: int, max_pixels: int) -> Any:
    """The checkpoint's own processor with the given pixel bounds on its image processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    processor.image_processor.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    return processor


def load_model(path: Any) -> Any:
    """The checkpoint's model through transformers alone (FP32, eval)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def decode(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB, as the contract states: EXIF orientation applied, alpha flattened onto
    white, images under 28 px on a side scaled up (short side to 28, aspect kept, rounded up, bicubic)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        white.alpha_composite(img.convert("RGBA"))
        img = white
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        s = MIN_SIDE / min(w, h)
        img = img.resize((max(MIN_SIDE, math.ceil(w * s)), max(MIN_SIDE, math.ceil(h * s))), Image.BICUBIC)
    return img


def messages(instruction: str, query: Any, doc: Any, wrap: bool = False) -> list[dict[str, Any]]:
    """The recipe's chat: a system turn, then one user turn ``<Instruct>: {instruction}``,
    ``<Query>:`` [image] [text], ``\\n<Document>:`` [image] [text]. ``wrap`` marks caller text."""

    def caller(text: str, open_: str = _OPEN, close: str = _CLOSE) -> str:
        if not wrap:
            return text
        assert not set(text) & {_OPEN, _CLOSE, _DOC_OPEN, _DOC_CLOSE}, "reference: marker in a test input"
        return open_ + text + close

    content: list[dict[str, Any]] = [
        {"type": "text", "text": "<Instruct>: " + caller(instruction)},
        {"type": "text", "text": "<Query>:"},
    ]
    if query.image is not None:
        content.append({"type": "image"})
    if query.text is not None:
        content.append({"type": "text", "text": caller(query.text)})
    content.append({"type": "text", "text": "\n<Document>:"})
    if doc.image is not None:
        content.append({"type": "image"})
    if doc.text is not None:
        content.append({"type": "text", "text": caller(doc.text, _DOC_OPEN, _DOC_CLOSE)})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


def render(processor: Any, instruction: str, query: Any, doc: Any) -> str:
    """The rendered prompt string of one pair (chat template with the generation prompt)."""
    text = processor.apply_chat_template(
        messages(instruction, query, doc), tokenize=False, add_generation_prompt=True
    )
    return text if isinstance(text, str) else text[0]


def _tokenize(processor: Any, instruction: str, query: Any, doc: Any) -> tuple[list[int], int]:
    """(un-expanded ids of the pair, how many tokens just before the user turn's ``<|im_end|>``
    consist of document text only). Control tokens only where the template wrote them."""
    tok = processor.tokenizer
    rendered = processor.apply_chat_template(
        messages(instruction, query, doc, wrap=True), tokenize=False, add_generation_prompt=True
    )
    rendered = rendered if isinstance(rendered, str) else rendered[0]
    special = {t.content: i for i, t in tok.added_tokens_decoder.items() if t.special}
    control = re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)))
    marks = re.compile(f"[{_OPEN}{_CLOSE}{_DOC_OPEN}{_DOC_CLOSE}]")
    ids: list[int] = []
    doc_tokens = 0

    def run(raw: str) -> None:  # one text run between two control tokens (caller text still marked)
        nonlocal doc_tokens
        text = marks.sub("", raw)
        if not text:
            return
        enc = tok(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        ids.extend(enc["input_ids"])
        if _DOC_OPEN in raw:
            head = raw.index(_DOC_OPEN)
            start = len(marks.sub("", raw[:head]))
            end = start + len(marks.sub("", raw[head : raw.index(_DOC_CLOSE)]))
            assert end == len(text), "reference: the document text must end its run"
            doc_tokens = sum(1 for a, b in enc["offset_mapping"] if a >= start and b <= end)

    # Cut the rendered string at control tokens that lie outside caller text.
    pos = 0
    pending = ""
    for part_no, part in enumerate(
        re.split(f"([{_OPEN}{_DOC_OPEN}].*?[{_CLOSE}{_DOC_CLOSE}])", rendered, flags=re.DOTALL)
    ):
        if part_no % 2:  # caller text (kept with its marks): never cut
            pending += part
            continue
        pos = 0
        for m in control.finditer(part):
            run(pending + part[pos : m.start()])
            ids.append(special[m.group()])
            pending, pos = "", m.end()
        pending += part[pos:]
    run(pending)
    return ids, doc_tokens


def reference_prompt_ids(processor: Any, instruction: str, query: Any, doc: Any) -> list[int]:
    """The un-expanded ids the reference scores for one pair (for tests of the token policy)."""
    return _tokenize(processor, instruction, query, doc)[0]


def yes_no_ids(tokenizer: Any) -> tuple[int, int]:
    """(id of "no", id of "yes"): each word must encode to exactly one token."""
    out = []
    for word in ("no", "yes"):
        ids = tokenizer.encode(word, add_special_tokens=False)
        assert len(ids) == 1, f"reference: {word!r} is not one token: {ids}"
        out.append(int(ids[0]))
    return out[0], out[1]


def reference_grids(processor: Any, query: Any, doc: Any) -> list[tuple[int, int, int]]:
    """The (t, h, w) patch grids the processor gives the pair's images."""
    images = [decode(c.image.data) for c in (query, doc) if c.image is not None]
    if not images:
        return []
    grid = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    return [tuple(int(x) for x in g) for g in grid.tolist()]


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


@torch.inference_mode()
def reference_logit(
    model: Any, processor: Any, instruction: str, query: Any, doc: Any, max_length: int
) -> tuple[float, bool]:
    """(log p(yes) - log p(no) over the (no, yes) softmax, truncated?) for one pair."""
    images = [decode(c.image.data) for c in (query, doc) if c.image is not None]
    ids, doc_tokens = _tokenize(processor, instruction, query, doc)
    inputs = _inputs(processor, ids, images)
    length = inputs["input_ids"].shape[1]
    truncated = length > max_length
    if truncated:
        # Drop the tail of the document text: the last ``excess`` tokens before <|im_end|> of the
        # user turn, all of which must be document text (else the pair cannot fit at all).
        excess = length - max_length
        assert excess <= doc_tokens, "reference: too long even without document text"
        im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        end = int((inputs["input_ids"][0] == im_end).nonzero()[-1])
        keep = torch.ones(length, dtype=torch.bool)
        keep[end - excess : end] = False
        for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            inputs[k] = inputs[k][:, keep]
    out = model(**inputs)
    last = out.logits[0, -1].double()  # full-vocabulary logits (naive on purpose)
    no, yes = yes_no_ids(processor.tokenizer)
    p_no, p_yes = torch.softmax(torch.stack([last[no], last[yes]]), dim=0).tolist()
    return math.log(p_yes) - math.log(p_no), truncated
