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

    _set_cpu_threads(settings)
    # The engine accepts only the prepared values it made itself (a narrower parameter type than
    # the protocol's); the scheduler only ever hands an engine its own values back.
    return cast("Engine", QwenRerankEngine.from_settings(settings))


def cpu_threads(settings: Settings, cores: int | None = None) -> int:
    """Intra-op threads for torch in a serving process: ``settings.cpu_threads``, else on the CPU
    device one core fewer than the machine has (at least one); 0 = leave torch's default (a GPU
    device, where the host only prepares inputs).

    Why not torch's default on the CPU (every core): the same cores run the event loop, tokenisation
    and the image decoder processes. When one of them takes a core, each parallel op's barrier waits
    for a descheduled thread; measured on a 2-core machine with one other busy process, a
    3-document text request took ~150 ms with 2 threads and ~3.5 ms with 1."""
    import os

    if settings.cpu_threads:
        return settings.cpu_threads
    from lychee_server.engine.loading import resolve_device

    if resolve_device(settings.device).type != "cpu":
        return 0
    n = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, n - 1)


def _set_cpu_threads(settings: Settings) -> None:
    import torch

    n = cpu_threads(settings)
    if n:
        torch.set_num_threads(n)
