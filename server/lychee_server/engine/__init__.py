"""Model code: the Lychee recipe on Qwen2.5-VL (never imports grpc).

``load_engine(settings)`` is the one way the server builds an engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lychee_server.engine.interface import Engine
    from lychee_server.settings import Settings


def load_engine(settings: Settings) -> Engine:
    """Load the model named by ``settings.model`` and return the optimized engine."""
    raise NotImplementedError("engine loading lands with the scoring-engine work")
