"""Bearer tokens and image URLs on the HTTP door of a real server process.

One server with two API keys and image URL fetching on, allow-listed for 127.0.0.1 only; a small
image origin on 127.0.0.1 counts what it is asked for, so a refused URL provably fetched nothing
from it. (Addresses off this machine are only ever *named* in requests: the fetcher refuses them
before any connection, which tests/http_door/test_fetch.py proves with a connect guard.)
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from http_door.http_support import TINY_ENV, http_url
from PIL import Image

from harness import SubprocessServer, subprocess_server
from lychee.rerank.client import AuthenticationError, Doc, EncodedImage, LycheeClient

KEYS = ["k-one", "k-two"]


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


class Origin:
    """An image origin on 127.0.0.1: /img.png, /redir (to localhost, another host), counts paths."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                origin.hits.append(self.path)
                if self.path == "/img.png":
                    body = png()
                    self.send_response(200)
                    self.send_header("content-type", "image/png")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path == "/redir":
                    self.send_response(302)
                    self.send_header("location", f"http://localhost:{origin.port}/img.png")
                    self.send_header("content-length", "0")
                    self.end_headers()
                else:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


@pytest.fixture(scope="module")
def secured(tiny_checkpoint: Path) -> Iterator[SubprocessServer]:
    env = {
        **TINY_ENV,
        "LYCHEE_API_KEYS": json.dumps(KEYS),
        "LYCHEE_IMAGE_URL_FETCH": "true",
        "LYCHEE_IMAGE_URL_ALLOW_HOSTS": json.dumps(["127.0.0.1"]),
    }
    with subprocess_server(tiny_checkpoint, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def url(secured: SubprocessServer) -> str:
    return http_url(secured)


AUTH = {"authorization": "Bearer k-two"}


@pytest.mark.parametrize(
    "path", ["/", "/playground/index.html", "/healthz", "/readyz", "/openapi.json", "/docs"]
)
def test_probe_and_contract_routes_are_open(url: str, path: str) -> None:
    assert httpx.get(f"{url}{path}").status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/rerank"),
        ("POST", "/v2/rerank"),
        ("POST", "/rerank"),
        ("GET", "/v1/models"),
        ("GET", "/v1/info"),
        ("GET", "/metrics"),
        ("GET", "/no-such-route"),
    ],
)
@pytest.mark.parametrize("token", [None, "wrong", "k-one "])
def test_everything_else_needs_a_valid_token(url: str, method: str, path: str, token: str | None) -> None:
    headers = {} if token is None else {"authorization": f"Bearer {token}x"}
    r = httpx.request(method, f"{url}{path}", headers=headers, json={"query": "q", "documents": ["d"]})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    assert (body["reason"], body["code"]) == ("UNAUTHENTICATED", "UNAUTHENTICATED")


def test_valid_tokens_work_on_both_doors(url: str, secured: SubprocessServer) -> None:
    import cohere

    co = cohere.ClientV2(api_key="k-two", base_url=url)
    got = co.rerank(model="m", query="q", documents=["a", "b"])
    with LycheeClient(secured.address, api_key="k-one") as client:
        expected = client.rerank("q", ["a", "b"])
    assert [(r.index, r.relevance_score) for r in got.results] == [
        (r.index, r.score) for r in expected.results
    ]
    with LycheeClient(secured.address, api_key="nope") as client, pytest.raises(AuthenticationError):
        client.rerank("q", ["a"])


def test_an_allow_listed_image_url_is_fetched_and_scored_like_its_bytes(
    url: str, origin: Origin, secured: SubprocessServer
) -> None:
    image_url = f"http://127.0.0.1:{origin.port}/img.png"
    r = httpx.post(
        f"{url}/v1/rerank",
        json={
            "query": "q",
            "documents": [{"image_url": {"url": image_url}}, {"text": "t", "image": image_url}],
        },
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    by_bytes = httpx.post(
        f"{url}/v1/rerank",
        json={
            "query": "q",
            "documents": [
                {"image": base64.b64encode(png()).decode()},
                {"text": "t", "image": base64.b64encode(png()).decode()},
            ],
        },
        headers=AUTH,
        timeout=60,
    )
    assert r.json()["results"] == by_bytes.json()["results"]
    with LycheeClient(secured.address, api_key="k-one") as client:
        grpc = client.rerank(
            "q", [EncodedImage.from_bytes(png()), Doc(text="t", image=EncodedImage.from_bytes(png()))]
        )
    assert [(x["index"], x["relevance_score"]) for x in r.json()["results"]] == [
        (x.index, x.score) for x in grpc.results
    ]
    assert origin.hits.count("/img.png") >= 2


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://localhost:{port}/img.png", "IMAGE_URL_FORBIDDEN"),  # loopback by name, not listed
        ("http://169.254.169.254/latest/meta-data/", "IMAGE_URL_FORBIDDEN"),  # cloud metadata
        ("http://10.0.0.1/x.png", "IMAGE_URL_FORBIDDEN"),  # private range
        ("http://[::1]:{port}/img.png", "IMAGE_URL_FORBIDDEN"),
        ("http://127.0.0.1:{port}/redir", "IMAGE_FETCH_FAILED"),  # redirect to another host
        ("http://127.0.0.1:{port}/missing.png", "IMAGE_FETCH_FAILED"),
    ],
)
def test_ssrf_attempts_are_refused(url: str, origin: Origin, target: str, reason: str) -> None:
    before = list(origin.hits)
    image_url = target.format(port=origin.port)
    r = httpx.post(
        f"{url}/v1/rerank",
        json={"query": "q", "documents": ["fine", {"image_url": {"url": image_url}}]},
        headers=AUTH,
        timeout=60,
    )
    body = r.json()
    assert (r.status_code, body["reason"]) == (400, reason), body
    assert body["field_violations"][0]["field"] == "documents[1].image_url"
    new_hits = origin.hits[len(before) :]
    if reason == "IMAGE_URL_FORBIDDEN":
        assert new_hits == []  # refused before any request reached the origin
    if "redir" in target:
        assert new_hits == ["/redir"]  # the first hop only; the other host was never asked
    assert httpx.get(f"{url}/readyz").status_code == 200
