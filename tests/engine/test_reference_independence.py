"""The naive reference stands on its own: it imports nothing from ``lychee_server`` (checked on its
source and in a fresh interpreter), and what it renders is pinned to the recipe typed out literally
here, so a drift in the reference itself is caught as well as one in the engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import reference

from helpers import image_input
from lychee_server.domain import Content
from lychee_server.engine.qwen import QwenRerankEngine

HERE = Path(__file__).resolve().parent
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
# The Lychee recipe rendered by Qwen2.5-VL's chat template (system turn, one user turn, generation
# prompt), for a text query and a text document, and with an image before each text.
TEXT_PAIR = (
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: " + INSTRUCTION + "<Query>:What is the capital of France?"
    "\n<Document>:Paris is the capital.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
IMAGE_PAIR = (
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: " + INSTRUCTION + "<Query>:"
    "<|vision_start|><|image_pad|><|vision_end|>a photo like this"
    "\n<Document>:<|vision_start|><|image_pad|><|vision_end|>a red sofa<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
            "__import__",
            "import_module",
        ):
            names.add("<dynamic import>")
    return names


def test_reference_imports_nothing_from_lychee_server() -> None:
    for name in ("reference.py", "conftest.py"):  # the reference and the fixtures that load its inputs
        found = _imports(HERE / name)
        assert not {
            n for n in found if n.split(".")[0] in ("lychee_server", "helpers", "<dynamic import>")
        }, (
            name,
            found,
        )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import reference; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lychee_server', 'helpers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(HERE)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_reference_renders_the_literal_recipe(ref_processor: Any) -> None:
    text = reference.render(
        ref_processor,
        INSTRUCTION,
        Content(text="What is the capital of France?"),
        Content(text="Paris is the capital."),
    )
    assert text == TEXT_PAIR
    img = image_input(40, 40, seed=1)
    both = reference.render(
        ref_processor,
        INSTRUCTION,
        Content(text="a photo like this", image=img),
        Content(text="a red sofa", image=img),
    )
    assert both == IMAGE_PAIR
    assert reference.SYSTEM_PROMPT == SYSTEM


def test_engine_compiled_prompt_renders_the_literal_recipe(tiny_engine: QwenRerankEngine) -> None:
    names = {i: t for t, i in tiny_engine._control.items()}
    values = {
        "instruction": INSTRUCTION,
        "query": "What is the capital of France?",
        "document": "Paris is the capital.",
    }
    assert tiny_engine._prompts[(True, False, True, False)].render(values, names) == TEXT_PAIR
    values = {"instruction": INSTRUCTION, "query": "a photo like this", "document": "a red sofa"}
    assert tiny_engine._prompts[(True, True, True, True)].render(values, names) == IMAGE_PAIR


def test_engine_score_rows_are_the_tokenizers_no_and_yes(
    tiny_engine: QwenRerankEngine, ref_processor: Any
) -> None:
    no, yes = reference.yes_no_ids(ref_processor.tokenizer)
    assert no != yes
    assert (tiny_engine.no_id, tiny_engine.yes_id) == (no, yes)
    head = tiny_engine.model.get_output_embeddings().weight
    assert tiny_engine.w_no_yes.equal(head[[no, yes]])  # row 0 = "no", row 1 = "yes"


def test_reference_decodes_like_the_contract() -> None:
    """EXIF orientation applied, alpha onto white, under 28 px scaled up (short side 28, aspect kept)."""
    import io

    from PIL import Image

    rgba = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert reference.decode(buf.getvalue()).getpixel((5, 5)) == (255, 255, 255)
    tiny = Image.new("RGB", (10, 3), (9, 9, 9))
    buf = io.BytesIO()
    tiny.save(buf, format="PNG")
    assert reference.decode(buf.getvalue()).size == (94, 28)  # ceil(10 * 28/3) = 94
    tall = Image.new("RGB", (40, 30), (9, 9, 9))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    tall.save(buf, format="JPEG", exif=exif)
    assert reference.decode(buf.getvalue()).size == (30, 40)
