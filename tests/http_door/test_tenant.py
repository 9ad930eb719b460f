"""Per-tenant state: with API keys, each key is its own tenant on both doors (a hash of the key,
never the key), so the vision cache cannot tell one caller what another sent."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
import pytest

from harness import GatedEngine, running_server
from lychee.rerank.client import LycheeClient

pytestmark = pytest.mark.timeout(120)


class RecordingEngine(GatedEngine):
    """The real engine; records the tenant of every prepared query."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.tenants: list[str] = []

    def prepare_query(self, instruction: str, query: Any, max_length: int, tenant: str = "") -> Any:
        self.tenants.append(tenant)
        return super().prepare_query(instruction, query, max_length, tenant)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


async def test_each_api_key_is_one_tenant_on_both_doors(tiny_engine: Any) -> None:
    engine = RecordingEngine(tiny_engine)
    keys = ("alpha-key", "beta-key")
    async with running_server(engine=engine, api_keys=keys) as srv:
        async with httpx.AsyncClient(base_url=srv.server.http_url, timeout=30) as client:
            for key in keys:
                r = await client.post(
                    "/v1/rerank",
                    json={"query": "q", "documents": ["d"]},
                    headers={"authorization": f"Bearer {key}"},
                )
                assert r.status_code == 200

        def via_grpc(key: str) -> None:
            with LycheeClient(srv.address, api_key=key) as c:
                c.rerank("q", ["d"])

        for key in keys:
            await asyncio.to_thread(via_grpc, key)
    assert engine.tenants == [_hash(keys[0]), _hash(keys[1]), _hash(keys[0]), _hash(keys[1])]
    assert all(k not in t for k in keys for t in engine.tenants)


async def test_without_keys_everyone_shares_one_tenant(tiny_engine: Any) -> None:
    engine = RecordingEngine(tiny_engine)
    async with running_server(engine=engine) as srv:
        url = srv.server.http_url
        headers = {"authorization": "Bearer x"}
        r = await asyncio.to_thread(
            httpx.post, f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}, headers=headers
        )
        assert r.status_code == 200
    assert engine.tenants == [""]
