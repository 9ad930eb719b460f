"""TLS, mutual TLS and admission on the HTTP door, as on gRPC (in process, real sockets, the real
tiny engine behind a device gate)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import GatedEngine, error_details, eventually, make_tls_files, running_server
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)
WAIT = 30.0
BODY = {"query": "q", "documents": ["a", "b"]}


async def test_https_with_the_grpc_tls_settings(gated: GatedEngine, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    async with running_server(engine=gated, tls_cert=tls.server_cert, tls_key=tls.server_key) as srv:
        url = srv.server.http_url
        assert url.startswith("https://")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(tls.ca_cert))) as client:
            r = await client.post(f"{url}/v1/rerank", json=BODY, timeout=WAIT)
            assert r.status_code == 200 and len(r.json()["results"]) == 2
        async with httpx.AsyncClient() as untrusting:  # the system CAs do not know our CA
            with pytest.raises(httpx.ConnectError):
                await untrusting.post(f"{url}/v1/rerank", json=BODY, timeout=WAIT)
        plain = url.replace("https://", "http://")
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.HTTPError):
                await client.post(f"{plain}/v1/rerank", json=BODY, timeout=WAIT)


async def test_mutual_tls_needs_a_client_certificate(gated: GatedEngine, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    async with running_server(
        engine=gated, tls_cert=tls.server_cert, tls_key=tls.server_key, tls_client_ca=tls.ca_cert
    ) as srv:
        url = srv.server.http_url
        with_cert = ssl.create_default_context(cafile=str(tls.ca_cert))
        with_cert.load_cert_chain(str(tls.client_cert), str(tls.client_key))
        async with httpx.AsyncClient(verify=with_cert) as client:
            assert (await client.post(f"{url}/v1/rerank", json=BODY, timeout=WAIT)).status_code == 200
        without = ssl.create_default_context(cafile=str(tls.ca_cert))
        async with httpx.AsyncClient(verify=without) as client:
            with pytest.raises(httpx.HTTPError):
                r = await client.post(f"{url}/v1/rerank", json=BODY, timeout=WAIT)
                r.raise_for_status()


async def test_overload_is_429_with_retry_after_on_both_doors(gated: GatedEngine) -> None:
    async with running_server(engine=gated, max_inflight_pairs=4, retry_after_s=1.5) as srv:
        url = srv.server.http_url
        gated.gate.close()
        try:
            async with httpx.AsyncClient(base_url=url, timeout=WAIT) as client:
                first = asyncio.create_task(
                    client.post("/v1/rerank", json={"query": "q", "documents": ["d"] * 4})
                )
                await asyncio.to_thread(gated.gate.entered.wait, WAIT)  # 4 pairs admitted: at capacity
                r = await client.post("/v1/rerank", json=BODY)
                assert r.status_code == 429 and r.json()["reason"] == "OVERLOADED"
                assert r.headers["retry-after"] == "2" and r.json()["retry_after_s"] == 1.5
                import grpc.aio

                async with grpc.aio.insecure_channel(srv.address) as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await pb_grpc.RerankServiceStub(channel).Rerank(
                            pb.RerankRequest(
                                query=pb.Content(text="q"),
                                documents=[pb.Document(content=pb.Content(text="d"))],
                            ),
                            timeout=WAIT,
                        )
                d = error_details(info.value)
                assert (d.code.name, d.reason, d.retry_delay) == ("RESOURCE_EXHAUSTED", "OVERLOADED", 1.5)
                gated.gate.open()
                assert (await first).status_code == 200
                await eventually(lambda: srv.server.gate.active_calls == 0, WAIT, "calls to end")
                assert (await client.post("/v1/rerank", json=BODY)).status_code == 200
        finally:
            gated.gate.open()


async def test_an_answer_too_large_is_refused_before_scoring(gated: GatedEngine) -> None:
    async with running_server(engine=gated, max_message_bytes=1024 * 1024) as srv:
        texts = ["x" * 150_000] * 8  # 1.2 MB of texts to echo back: over max_message_bytes (1 MiB)
        async with httpx.AsyncClient(base_url=srv.server.http_url, timeout=WAIT) as client:
            calls_before = gated.gate.calls
            r = await client.post(
                "/v1/rerank", json={"query": "q", "documents": texts, "return_documents": True}
            )
            assert r.status_code == 400 and r.json()["reason"] == "RESPONSE_TOO_LARGE"
            assert r.json()["field_violations"][0]["field"] == "return_documents"
            tei = await client.post("/rerank", json={"query": "q", "texts": texts, "return_text": True})
            assert tei.json()["reason"] == "RESPONSE_TOO_LARGE"
            assert gated.gate.calls == calls_before  # nothing was scored
            ok = await client.post("/v1/rerank", json={"query": "q", "documents": texts, "top_n": 2})
            assert ok.status_code == 200  # without the texts the answer is small


async def test_bodies_share_the_server_wide_payload_budget(gated: GatedEngine) -> None:
    async with (
        running_server(engine=gated, max_buffered_bytes=1536 * 1024) as srv,
        httpx.AsyncClient(base_url=srv.server.http_url, timeout=WAIT) as client,
    ):
        gated.gate.close()
        try:
            big = {"query": "q", "documents": ["y" * 250_000] * 4}
            first = asyncio.create_task(client.post("/v1/rerank", json=big))
            await asyncio.to_thread(gated.gate.entered.wait, WAIT)  # its 1 MB are held
            r = await client.post("/v1/rerank", json=big)
            assert r.status_code == 429 and r.json()["reason"] == "OVERLOADED"
            assert "max_buffered_bytes" in r.json()["message"] and "retry-after" in r.headers
            gated.gate.open()
            assert (await first).status_code == 200
            assert srv.server.gate.buffered.used == 0  # released with the call
            assert (await client.post("/v1/rerank", json=big)).status_code == 200
        finally:
            gated.gate.open()


async def test_the_listener_is_tcp_so_responses_are_not_held_by_nagle(gated: GatedEngine) -> None:
    import socket

    async with running_server(engine=gated) as srv:
        http = srv.server.http
        assert http is not None and http._sock is not None
        assert http._sock.proto == socket.IPPROTO_TCP  # asyncio then sets TCP_NODELAY per connection
        async with httpx.AsyncClient(base_url=srv.server.http_url) as client:
            assert (await client.get("/healthz")).status_code == 200  # keep-alive: still open
            assert http._server is not None
            live: Any = http._server.server_state.connections  # uvicorn's open connections
            conns = [c.transport.get_extra_info("socket") for c in live]
        assert conns and all(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in conns)


async def test_oversize_refusals_are_answered_after_a_pause_on_both_doors(gated: GatedEngine) -> None:
    import time

    import grpc.aio

    delay = 0.4
    async with running_server(engine=gated, max_documents=4, oversize_refusal_delay_s=delay) as srv:
        async with httpx.AsyncClient(base_url=srv.server.http_url, timeout=WAIT) as client:
            t0 = time.monotonic()
            r = await client.post("/v1/rerank", json={"query": "q", "documents": ["d"] * 5})
            assert r.json()["reason"] == "TOO_MANY_DOCUMENTS" and time.monotonic() - t0 >= delay
            t0 = time.monotonic()
            fine = await client.post("/v1/rerank", json={"query": "q", "documents": [""]})
            assert fine.json()["reason"] == "EMPTY_TEXT"  # other refusals are not held
        async with grpc.aio.insecure_channel(srv.address) as channel:
            req = pb.RerankRequest(
                query=pb.Content(text="q"), documents=[pb.Document(content=pb.Content(text="d"))] * 5
            )
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.RerankServiceStub(channel).Rerank(req, timeout=WAIT)
            assert error_details(info.value).reason == "TOO_MANY_DOCUMENTS"
            assert time.monotonic() - t0 >= delay
        rejected = srv.server.metrics.rejected.labels("TOO_MANY_DOCUMENTS")._value.get()
        assert rejected == 2
