"""Model code: the Lychee recipe on Qwen2.5-VL (never imports grpc).

``load_engine(settings)`` is the one way the server builds an engine; ``engine.qwen`` holds the
optimized engine, ``engine.recipe`` the prompt recipe, ``engine.images`` image decoding,
``engine.loading`` model loading and ``engine.checkpoint`` the tiny test checkpoint builder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from lychee_server.engine.interface import Engine
    from lychee_server.settings import Settings


def load_engine(settings: Settings) -> Engine:
    """Load the model named by ``settings.model`` and return the optimized engine.

    Raises ``lychee_server.engine.loading.ModelLoadError`` (UNAVAILABLE, reason
    MODEL_LOAD_FAILED) with an actionable message when the weights cannot be found.
    """
    from lychee_server.engine.qwen import QwenRerankEngine

    # The engine accepts only the prepared values it made itself (a narrower parameter type than
    # the protocol's); the scheduler only ever hands an engine its own values back.
    return cast("Engine", QwenRerankEngine.from_settings(settings))
