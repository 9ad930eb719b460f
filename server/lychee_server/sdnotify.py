"""systemd readiness (``Type=notify``) without libsystemd: the ``sd_notify`` datagram protocol.

When systemd starts the server with ``Type=notify`` it sets ``NOTIFY_SOCKET`` to a Unix datagram
socket (a path, or ``@name`` for the abstract namespace). ``READY=1`` is sent once health is
SERVING, ``STOPPING=1`` when the drain begins. Without ``NOTIFY_SOCKET`` (any other supervisor,
a container, a terminal) :func:`notify` does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify"]

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when there is no socket or it fails."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:  # readiness is best effort: never fail the server over it
        log.warning("sd_notify %s failed: %s", state.split("=", 1)[0], exc)
        return False
    return True
