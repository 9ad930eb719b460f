"""Dynamic batching between the gRPC edge and the engine (no torch, no grpc in this package).

See :mod:`lychee_server.scheduler.core` for the design.
"""

from lychee_server.scheduler.core import Scheduler

__all__ = ["Scheduler"]
