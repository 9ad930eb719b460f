"""Session fixtures shared by every test directory.

``tiny_checkpoint``: a tiny random Qwen2.5-VL checkpoint directory built once per session (a few MB,
loads through the same ``from_pretrained`` path as the real model). ``tiny_engine``: the optimized
engine loaded from it on CPU in FP32.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(__file__).resolve().parent.parent
for _p in (_ROOT / "server", _ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lychee_server.engine.checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-lychee") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_settings(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    from lychee_server.settings import Settings

    return Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32", warmup=False)


@pytest.fixture(scope="session")
def tiny_engine(tiny_settings):  # type: ignore[no-untyped-def]
    import torch

    from lychee_server.engine.qwen import QwenRerankEngine

    torch.set_num_threads(2)
    engine = QwenRerankEngine.from_settings(tiny_settings)
    yield engine
    engine.close()


@pytest.fixture
def fresh_vision_cache(tiny_engine) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Empty the engine's vision cache before and after a test that counts hits."""
    tiny_engine.vision_cache.clear()
    yield
    tiny_engine.vision_cache.clear()


# ------------------------------------------------------------- the real Qwen2 vocabulary (issue 16)
# Qwen's BPE ranks come from the dashscope wheel, which scripts/install.sh downloads (pinned, no
# dependencies, never imported) to build/wheels; LYCHEE_QWEN_TIKTOKEN may name another copy of the
# wheel or of qwen.tiktoken itself. The file's sha256 is checked, so the ids below cannot drift.
DASHSCOPE_VERSION = "2.0.2"
_WHEELS = Path(__file__).resolve().parents[1] / "build" / "wheels"
DASHSCOPE_WHEEL = _WHEELS / f"dashscope-{DASHSCOPE_VERSION}-py3-none-any.whl"
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


def _in_ci() -> bool:
    import os

    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def qwen_tiktoken() -> Path:
    """The dashscope wheel (or a qwen.tiktoken file) holding Qwen's ranks, its content verified.
    Missing: fails under CI=true, skips with the way to get it elsewhere."""
    import hashlib
    import os
    import zipfile

    from lychee_server.engine.checkpoint import QWEN_TIKTOKEN_MEMBER

    named = os.environ.get("LYCHEE_QWEN_TIKTOKEN")
    path = Path(named) if named else DASHSCOPE_WHEEL
    if not path.is_file():
        why = (
            f"Qwen's BPE ranks not found at {path}: run scripts/install.sh (it runs `pip download "
            f"dashscope=={DASHSCOPE_VERSION} --no-deps -d build/wheels`) or set LYCHEE_QWEN_TIKTOKEN"
        )
        if _in_ci():
            pytest.fail(why + " (CI=true: the real-vocabulary tests may not be skipped)", pytrace=False)
        pytest.skip(why)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            data = zf.read(QWEN_TIKTOKEN_MEMBER)
    else:
        data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == QWEN_TIKTOKEN_SHA256, f"{path}: qwen.tiktoken has sha256 {digest}, not the pinned one"
    return path


@pytest.fixture(scope="session")
def real_vocab_checkpoint(tmp_path_factory: pytest.TempPathFactory, qwen_tiktoken: Path) -> Path:
    """The tiny random model with Qwen2's real tokenizer and 151936 embedding rows (about 90 MB)."""
    from lychee_server.engine.checkpoint import build_tiny_checkpoint

    out = tmp_path_factory.mktemp("real-vocab-lychee") / "ckpt"
    return build_tiny_checkpoint(out, seed=0, vocab="real", tiktoken=qwen_tiktoken)


@pytest.fixture(scope="session")
def real_vocab_engine(real_vocab_checkpoint: Path) -> Any:
    """The optimized engine on the real-vocabulary checkpoint (CPU, FP32)."""
    import torch

    from lychee_server.engine.qwen import QwenRerankEngine
    from lychee_server.settings import Settings

    torch.set_num_threads(2)
    settings = Settings(model=str(real_vocab_checkpoint), device="cpu", dtype="float32", warmup=False)
    engine = QwenRerankEngine.from_settings(settings)
    yield engine
    engine.close()
