"""TLS, mutual TLS and bearer-token auth against a real server (certificates made per test)."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import GatedEngine, error_details, make_tls_files, running_server
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc
from lychee_server.edge.auth import BearerAuthInterceptor

pytest.importorskip("cryptography", reason="TLS tests need the 'cryptography' package ([dev] extra)")
pytestmark = pytest.mark.timeout(120)
WAIT = 30.0
REQ = pb.RerankRequest(
    query=pb.Content(text="q"), documents=[pb.Document(content=pb.Content(text="some text"))]
)


def test_token_comparison() -> None:
    auth = BearerAuthInterceptor(["alpha", "beta"])
    assert auth.is_valid(b"beta") and auth.is_valid(b"alpha")
    assert not auth.is_valid(b"gamma") and not auth.is_valid(b"alph") and not auth.is_valid(None)
    with pytest.raises(ValueError):
        BearerAuthInterceptor([])


async def test_mtls_and_bearer_tokens(gated: GatedEngine, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# comment\nfile-key\n")
    async with running_server(
        engine=gated,
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
        tls_client_ca=tls.ca_cert,
        api_keys=["env-key"],
        api_keys_file=keys_file,
    ) as srv:
        creds = grpc.ssl_channel_credentials(
            root_certificates=tls.ca_cert.read_bytes(),
            private_key=tls.client_key.read_bytes(),
            certificate_chain=tls.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(srv.address, creds) as ch:
            stub = pb_grpc.RerankServiceStub(ch)
            for metadata, why in (((), "missing"), ((("authorization", "Bearer nope"),), "wrong"),
                                  ((("authorization", "Basic env-key"),), "wrong scheme")):  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Rerank(REQ, metadata=metadata, timeout=WAIT)
                d = error_details(info.value)
                assert (d.code, d.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"), why
            for key in ("env-key", "file-key"):
                resp = await stub.Rerank(REQ, metadata=(("authorization", f"Bearer {key}"),), timeout=WAIT)
                assert len(resp.results) == 1
            # Health stays open for orchestrator probes.
            status = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
            assert status.status == health_pb2.HealthCheckResponse.SERVING

        # Without a client certificate the handshake is refused (mutual TLS is required).
        no_cert = grpc.ssl_channel_credentials(root_certificates=tls.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(srv.address, no_cert) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.RerankServiceStub(ch).Rerank(
                    REQ, metadata=(("authorization", "Bearer env-key"),), timeout=WAIT
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        # A plaintext client cannot talk to the TLS port at all.
        async with grpc.aio.insecure_channel(srv.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.RerankServiceStub(ch).Rerank(REQ, timeout=5)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_server_side_tls_without_client_certificates(gated: GatedEngine, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    async with running_server(engine=gated, tls_cert=tls.server_cert, tls_key=tls.server_key) as srv:
        creds = grpc.ssl_channel_credentials(root_certificates=tls.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(srv.address, creds) as ch:
            resp = await pb_grpc.RerankServiceStub(ch).Rerank(REQ, timeout=WAIT)  # no auth configured
            assert len(resp.results) == 1
