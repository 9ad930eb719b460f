"""Fixtures of the engine tests: the naive reference's own processor and model, loaded from the tiny
checkpoint directory by transformers alone (not through ``lychee_server.engine.loading``), with the
published recipe's pixel bounds set here, so a loader that drops the configured bounds, or changes
the model, cannot move engine and reference together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import reference

# The recipe (vec-ai/lychee-rerank-mm): min_pixels 4*28*28, max_pixels 1280*28*28.
RECIPE_MIN_PIXELS = 4 * 28 * 28
RECIPE_MAX_PIXELS = 1280 * 28 * 28


@pytest.fixture(scope="session")
def ref_processor(tiny_checkpoint: Path) -> Any:
    return reference.load_processor(tiny_checkpoint, RECIPE_MIN_PIXELS, RECIPE_MAX_PIXELS)


@pytest.fixture(scope="session")
def ref_model(tiny_checkpoint: Path) -> Any:
    return reference.load_model(tiny_checkpoint)


# The real Qwen2 vocabulary (issue 16): the reference's own processor and model on the checkpoint
# that tests/conftest.py builds from Qwen's ranks (``real_vocab_checkpoint``).
@pytest.fixture(scope="session")
def real_ref_processor(real_vocab_checkpoint: Path) -> Any:
    return reference.load_processor(real_vocab_checkpoint, RECIPE_MIN_PIXELS, RECIPE_MAX_PIXELS)


@pytest.fixture(scope="session")
def real_ref_model(real_vocab_checkpoint: Path) -> Any:
    return reference.load_model(real_vocab_checkpoint)
