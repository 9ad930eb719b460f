"""Server reflection as both ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

Why both: newer tools (grpcurl >= 1.9, grpcui, Postman, buf curl) ask for ``v1`` first, older ones
only know ``v1alpha``. grpcio-reflection (1.85) ships only the ``v1alpha`` servicer. The two
protocols are the same file under two package names: ``grpc/reflection/v1/reflection.proto`` is a
copy of the ``v1alpha`` one with every message and field number unchanged, so the bytes on the
wire are identical. The ``v1`` method is therefore served by the library's own ``v1alpha``
servicer through a generic handler registered under the ``v1`` name (no second implementation).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
import grpc.aio
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

__all__ = ["V1ALPHA_SERVICE_NAME", "V1_SERVICE_NAME", "enable_reflection"]

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection for ``service_names`` (plus both reflection services) on ``server``."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = ReflectionServicer(names)
    # v1alpha: the library's own registration.
    reflection.enable_server_reflection(names, server)
    # v1: the same servicer, reached under the v1 name (identical wire format).
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
