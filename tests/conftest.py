"""Session fixtures shared by every test directory.

``tiny_checkpoint``: a tiny random Qwen2.5-VL checkpoint directory built once per session (a few MB,
loads through the same ``from_pretrained`` path as the real model). ``tiny_engine``: the optimized
engine loaded from it on CPU in FP32.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

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
