"""ImageFetcher: image URLs fetched safely (SSRF-hardened) for the HTTP door.

Real sockets on 127.0.0.1 only: a small HTTP/1.1 origin (``asyncio.start_server``) serves PNG bytes,
redirects, stalls and oversized bodies; a TLS variant checks that https verifies the real host name.
Every outgoing ``connect`` in this module goes through a guard that records it and refuses any
address outside 127.0.0.0/8, so a refusal test proves no connection was even attempted; names other
than ``localhost`` are answered by a resolver the test controls (no DNS traffic).
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lychee_server.edge.http.fetch import ImageFetcher, is_public_address, parse_host_pattern
from lychee_server.errors import InvalidInput
from lychee_server.settings import Settings

PATH = "documents[3].image"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


# --- the connect guard and the controlled resolver -----------------------------------------------


class ConnectLog:
    def __init__(self) -> None:
        self.attempts: list[str] = []


@pytest.fixture(autouse=True)
def connects(monkeypatch: pytest.MonkeyPatch) -> ConnectLog:
    """Record every socket connect; refuse (never send to) anything outside 127.0.0.0/8."""
    log = ConnectLog()
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def allowed(address: Any) -> bool:
        log.attempts.append(str(address[0]) if isinstance(address, tuple) else str(address))
        try:
            ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
        except (ValueError, TypeError, IndexError):
            return False
        return isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.IPv4Network("127.0.0.0/8")

    def guarded_connect(self: socket.socket, address: Any) -> None:
        if not allowed(address):
            raise ConnectionRefusedError("test guard: only 127.0.0.0/8 may be contacted")
        real_connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        if not allowed(address):
            return 111  # ECONNREFUSED
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    return log


class Resolver:
    """Answers getaddrinfo for the names in ``table`` (name -> list of IPs), NXDOMAIN for others."""

    def __init__(self, table: dict[str, list[str] | Callable[[], list[str]]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        self.calls.append(name)
        entry = self.table.get(name)
        if entry is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        ips = entry() if callable(entry) else entry
        out: list[Any] = []
        for ip in ips:
            if ":" in ip:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, int(port), 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port))))
        return out


def use_resolver(monkeypatch: pytest.MonkeyPatch, table: dict[str, Any]) -> Resolver:
    resolver = Resolver(table)
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", resolver)
    return resolver


# --- a tiny HTTP/1.1 origin ------------------------------------------------------------------------


class Origin:
    """Routes by path. ``links`` names the other origins (for cross-origin redirects)."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.sent_body_bytes = 0
        self.port = 0
        self.links: dict[str, str] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, ssl_ctx: ssl.SSLContext | None = None) -> Origin:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *lines = head.decode("latin-1").split("\r\n")
            target = line.split(" ")[1]
            headers = {}
            for h in lines:
                if ":" in h:
                    k, v = h.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            self.requests.append((target, headers))
            await self._route(target, writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    @staticmethod
    def _head(writer: asyncio.StreamWriter, status: str, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def _route(self, target: str, w: asyncio.StreamWriter) -> None:
        if target == "/img.png":
            self._head(w, "200 OK", {"Content-Type": "image/png", "Content-Length": str(len(PNG))})
            w.write(PNG)
        elif target == "/chunked.png":
            self._head(w, "200 OK", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"})
            half = len(PNG) // 2
            for part in (PNG[:half], PNG[half:]):
                w.write(b"%x\r\n%s\r\n" % (len(part), part))
                await w.drain()
            w.write(b"0\r\n\r\n")
        elif m := re.fullmatch(r"/hops/(\d+)", target):
            n = int(m.group(1))
            if n == 0:
                await self._route("/img.png", w)
            else:
                self._head(w, "302 Found", {"Location": f"/hops/{n - 1}", "Content-Length": "0"})
        elif target.startswith("/to/"):  # /to/<name of a link>: 302 to that absolute URL
            self._head(w, "302 Found", {"Location": self.links[target[4:]], "Content-Length": "0"})
        elif target == "/no-location":
            self._head(w, "302 Found", {"Content-Length": "0"})
        elif target == "/missing":
            self._head(w, "404 Not Found", {"Content-Length": "9"})
            w.write(b"not found")
        elif target == "/empty":
            self._head(w, "200 OK", {"Content-Length": "0"})
        elif target == "/gzip":
            self._head(w, "200 OK", {"Content-Encoding": "gzip", "Content-Length": "4"})
            w.write(b"\x1f\x8b\x08\x00")
        elif target == "/big-length":  # declares 10 MB, sends a little, then waits
            self._head(w, "200 OK", {"Content-Type": "image/png", "Content-Length": str(10_000_000)})
            w.write(PNG)
            await w.drain()
            await asyncio.sleep(30)
        elif target == "/big-stream":  # chunked, no length, up to 64 MiB
            self._head(w, "200 OK", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"})
            chunk = b"\0" * 4096
            for _ in range(16384):
                w.write(b"1000\r\n" + chunk + b"\r\n")
                await w.drain()
                self.sent_body_bytes += len(chunk)
            w.write(b"0\r\n\r\n")
        elif target == "/stall":  # reads the request, never answers
            await asyncio.sleep(30)
        elif target == "/trickle":  # a valid length, one byte every 50 ms
            self._head(w, "200 OK", {"Content-Length": str(len(PNG))})
            for b in PNG:
                w.write(bytes([b]))
                await w.drain()
                await asyncio.sleep(0.05)
        else:
            self._head(w, "404 Not Found", {"Content-Length": "0"})


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    srv = await Origin().start()
    yield srv
    await srv.stop()


Make = Callable[..., ImageFetcher]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """``make(**settings)``: an enabled fetcher (2 s limit), closed after the test."""
    made: list[ImageFetcher] = []

    def factory(*, ssl_context: ssl.SSLContext | None = None, **fields: Any) -> ImageFetcher:
        values: dict[str, Any] = {"image_url_fetch": True, "image_url_timeout_s": 2.0}
        values.update(fields)
        fetcher = ImageFetcher(Settings(**values), ssl_context=ssl_context)
        made.append(fetcher)
        return fetcher

    yield factory
    for f in made:
        await f.aclose()


async def refused(coro: Awaitable[bytes], reason: str) -> InvalidInput:
    """Await a fetch that must fail with ``reason``; check the error's shape and message hygiene."""
    with pytest.raises(InvalidInput) as info:
        await coro
    err = info.value
    assert err.reason == reason, err.message
    assert len(err.violations) == 1
    v = err.violations[0]
    assert (v.field, v.reason, v.description) == (PATH, reason, err.message)
    assert not re.search(r"0x[0-9a-f]{6,}|Error\(|Exception|Traceback|<", err.message), err.message
    return err


# --- policy: disabled, schemes, userinfo, allow-list ---------------------------------------------


async def test_disabled_says_how_to_turn_it_on(connects: ConnectLog) -> None:
    fetcher = ImageFetcher(Settings(image_url_fetch=False))
    try:
        err = await refused(
            fetcher.fetch("http://127.0.0.1/img.png", path=PATH, deadline=None), "IMAGE_URL_DISABLED"
        )
    finally:
        await fetcher.aclose()
    for hint in ("--image-url-fetch", "LYCHEE_IMAGE_URL_FETCH=1", "--image-url-allow-host"):
        assert hint in err.message
    assert connects.attempts == []


async def test_allowed_host_returns_exact_bytes(make: Make, origin: Origin) -> None:
    fetcher = make(image_url_allow_hosts=("127.0.0.1",))
    url = f"http://127.0.0.1:{origin.port}/img.png"
    assert await fetcher.fetch(url, path=PATH, deadline=time.monotonic() + 5) == PNG
    assert await fetcher.fetch(url.replace("img.png", "chunked.png"), path=PATH, deadline=None) == PNG
    target, headers = origin.requests[0]
    assert target == "/img.png"
    assert headers["host"] == f"127.0.0.1:{origin.port}"
    assert headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/img.png",
        "gopher://127.0.0.1:70/",
        "data:image/png;base64,AAAA",
        "http:///img.png",
        "not a url",
        "http://user:secret@127.0.0.1/img.png",
        "http://user@127.0.0.1/img.png",
    ],
)
async def test_bad_urls_forbidden(make: Make, connects: ConnectLog, url: str) -> None:
    fetcher = make(image_url_allow_hosts=("127.0.0.1",))
    err = await refused(fetcher.fetch(url, path=PATH, deadline=None), "IMAGE_URL_FORBIDDEN")
    assert "secret" not in err.message
    assert connects.attempts == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/img.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/img.png",
        "http://[::1]:{port}/img.png",
        "http://0.0.0.0:{port}/img.png",
        "http://[::ffff:127.0.0.1]:{port}/img.png",
        "http://[::ffff:169.254.169.254]/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",
        "http://[fe80::1]/",
        "http://[64:ff9b::a00:1]/",
        "https://172.16.0.1/img.png",
    ],
)
async def test_non_public_addresses_refused_without_connecting(
    make: Make, origin: Origin, connects: ConnectLog, url: str
) -> None:
    fetcher = make()  # empty allow-list: any *public* host
    await refused(
        fetcher.fetch(url.format(port=origin.port), path=PATH, deadline=None), "IMAGE_URL_FORBIDDEN"
    )
    assert connects.attempts == [] and origin.connections == 0


async def test_unspecified_refused_even_when_listed(make: Make, origin: Origin, connects: ConnectLog) -> None:
    fetcher = make(image_url_allow_hosts=("0.0.0.0", "::"))
    for url in (f"http://0.0.0.0:{origin.port}/img.png", f"http://[::]:{origin.port}/img.png"):
        await refused(fetcher.fetch(url, path=PATH, deadline=None), "IMAGE_URL_FORBIDDEN")
    assert connects.attempts == [] and origin.connections == 0


async def test_localhost_refused_unless_listed(make: Make, origin: Origin, connects: ConnectLog) -> None:
    url = f"http://localhost:{origin.port}/img.png"
    err = await refused(make().fetch(url, path=PATH, deadline=None), "IMAGE_URL_FORBIDDEN")
    assert "localhost" in err.message and "127.0.0.1" not in err.message  # resolved address not told
    assert connects.attempts == [] and origin.connections == 0
    # on a list without it: refused by the list
    await refused(
        make(image_url_allow_hosts=("127.0.0.1",)).fetch(url, path=PATH, deadline=None), "IMAGE_URL_FORBIDDEN"
    )
    assert origin.connections == 0
    # listed exactly: fetched, from the checked address, with the real Host header
    fetcher = make(image_url_allow_hosts=("LOCALHOST",))
    assert await fetcher.fetch(url, path=PATH, deadline=None) == PNG
    assert origin.requests[0][1]["host"] == f"localhost:{origin.port}"


async def test_host_not_on_allow_list(
    make: Make, monkeypatch: pytest.MonkeyPatch, connects: ConnectLog
) -> None:
    resolver = use_resolver(monkeypatch, {"img.other.test": ["127.0.0.1"]})
    fetcher = make(image_url_allow_hosts=("img.example.test", "*.cdn.example.test"))
    err = await refused(
        fetcher.fetch("http://img.other.test/a.png", path=PATH, deadline=None), "IMAGE_URL_FORBIDDEN"
    )
    assert "img.other.test" in err.message and "--image-url-allow-host" in err.message
    assert resolver.calls == [] and connects.attempts == []


async def test_every_resolved_address_is_checked(
    make: Make, monkeypatch: pytest.MonkeyPatch, connects: ConnectLog
) -> None:
    use_resolver(
        monkeypatch,
        {
            "meta.test": ["169.254.169.254"],
            "mixed.test": ["93.184.216.34", "127.0.0.1"],  # one public answer does not hide the other
            "mapped.test": ["2606:4700::1111", "::ffff:10.0.0.1"],
            "v6local.test": ["fd00::1"],
            "cdn.example": ["10.0.0.1"],
        },
    )
    fetcher = make()
    for host in ("meta.test", "mixed.test", "mapped.test", "v6local.test"):
        err = await refused(
            fetcher.fetch(f"http://{host}/a.png", path=PATH, deadline=None), "IMAGE_URL_FORBIDDEN"
        )
        assert host in err.message
    # a '*.' pattern lets the name through the list but does not grant non-public addresses
    wild = make(image_url_allow_hosts=("*.example",))
    await refused(wild.fetch("http://cdn.example/a.png", path=PATH, deadline=None), "IMAGE_URL_FORBIDDEN")
    assert connects.attempts == []


async def test_dns_failure(make: Make, monkeypatch: pytest.MonkeyPatch, connects: ConnectLog) -> None:
    use_resolver(monkeypatch, {})
    err = await refused(
        make().fetch("https://nowhere.test/a.png", path=PATH, deadline=None), "IMAGE_FETCH_FAILED"
    )
    assert "nowhere.test" in err.message
    assert connects.attempts == []


async def test_connect_error(make: Make) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fetcher = make(image_url_allow_hosts=("127.0.0.1",))
    err = await refused(
        fetcher.fetch(f"http://127.0.0.1:{port}/a.png", path=PATH, deadline=None), "IMAGE_FETCH_FAILED"
    )
    assert "connect" in err.message


async def test_next_address_tried_when_one_refuses(
    make: Make, origin: Origin, monkeypatch: pytest.MonkeyPatch, connects: ConnectLog
) -> None:
    use_resolver(monkeypatch, {"two.test": ["127.0.0.2", "127.0.0.1"]})
    # the origin listens on 127.0.0.1 only: 127.0.0.2 refuses the connection
    fetcher = make(image_url_allow_hosts=("two.test",))
    assert await fetcher.fetch(f"http://two.test:{origin.port}/img.png", path=PATH, deadline=None) == PNG
    assert connects.attempts == ["127.0.0.2", "127.0.0.1"]


# --- redirects -------------------------------------------------------------------------------------


async def test_redirects_followed_up_to_three(make: Make, origin: Origin) -> None:
    fetcher = make(image_url_allow_hosts=("127.0.0.1",))
    base = f"http://127.0.0.1:{origin.port}"
    assert await fetcher.fetch(f"{base}/hops/3", path=PATH, deadline=None) == PNG
    assert [t for t, _ in origin.requests] == ["/hops/3", "/hops/2", "/hops/1", "/hops/0"]
    before = len(origin.requests)
    err = await refused(fetcher.fetch(f"{base}/hops/4", path=PATH, deadline=None), "IMAGE_FETCH_FAILED")
    assert "redirect" in err.message
    assert len(origin.requests) - before == 4  # the 4th redirect is not followed


async def test_redirect_to_another_host_refused(make: Make, origin: Origin, connects: ConnectLog) -> None:
    origin.links = {
        "other": f"http://localhost:{origin.port}/img.png",
        "meta": "http://169.254.169.254/latest/meta-data/",
        "ftp": f"ftp://127.0.0.1:{origin.port}/img.png",
        "creds": f"http://u:p@127.0.0.1:{origin.port}/img.png",
    }
    fetcher = make(image_url_allow_hosts=("127.0.0.1", "localhost"))
    base = f"http://127.0.0.1:{origin.port}"
    for link in ("other", "meta", "ftp", "creds"):
        await refused(fetcher.fetch(f"{base}/to/{link}", path=PATH, deadline=None), "IMAGE_FETCH_FAILED")
    await refused(fetcher.fetch(f"{base}/no-location", path=PATH, deadline=None), "IMAGE_FETCH_FAILED")
    assert origin.connections == 5  # each first hop only
    assert set(connects.attempts) == {"127.0.0.1"}


async def test_each_hop_resolved_and_checked_again(
    make: Make, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter([["127.0.0.1"], ["0.0.0.0"]])  # the second lookup "rebinds"
    resolver = use_resolver(monkeypatch, {"flip.test": lambda: next(answers)})
    fetcher = make(image_url_allow_hosts=("flip.test",))
    await refused(
        fetcher.fetch(f"http://flip.test:{origin.port}/hops/1", path=PATH, deadline=None),
        "IMAGE_URL_FORBIDDEN",
    )
    assert resolver.calls == ["flip.test", "flip.test"]
    assert [t for t, _ in origin.requests] == ["/hops/1"]


# --- status, size, encoding -----------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/missing", "/empty", "/gzip"])
async def test_unusable_answers(make: Make, origin: Origin, route: str) -> None:
    fetcher = make(image_url_allow_hosts=("127.0.0.1",))
    err = await refused(
        fetcher.fetch(f"http://127.0.0.1:{origin.port}{route}", path=PATH, deadline=None),
        "IMAGE_FETCH_FAILED",
    )
    if route == "/missing":
        assert "404" in err.message


async def test_too_large_by_content_length(make: Make, origin: Origin) -> None:
    fetcher = make(image_url_allow_hosts=("127.0.0.1",), max_image_bytes=100_000)
    t0 = time.monotonic()
    err = await refused(
        fetcher.fetch(f"http://127.0.0.1:{origin.port}/big-length", path=PATH, deadline=None),
        "IMAGE_FETCH_FAILED",
    )
    assert "larger than" in err.message
    assert time.monotonic() - t0 < 1.5  # refused on the header, not after waiting for the body


async def test_too_large_by_streamed_bytes(make: Make, origin: Origin) -> None:
    limit = 64 * 1024
    fetcher = make(image_url_allow_hosts=("127.0.0.1",), max_image_bytes=limit)
    err = await refused(
        fetcher.fetch(f"http://127.0.0.1:{origin.port}/big-stream", path=PATH, deadline=None),
        "IMAGE_FETCH_FAILED",
    )
    assert "larger than" in err.message
    await asyncio.sleep(0.1)
    assert origin.sent_body_bytes < 32 * 1024 * 1024  # reading stopped; the origin could not send it all
    # exactly at the limit is fine
    exact = make(image_url_allow_hosts=("127.0.0.1",), max_image_bytes=len(PNG))
    assert await exact.fetch(f"http://127.0.0.1:{origin.port}/chunked.png", path=PATH, deadline=None) == PNG
    small = make(image_url_allow_hosts=("127.0.0.1",), max_image_bytes=len(PNG) - 1)
    await refused(
        small.fetch(f"http://127.0.0.1:{origin.port}/chunked.png", path=PATH, deadline=None),
        "IMAGE_FETCH_FAILED",
    )


# --- time -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/stall", "/trickle"])
async def test_timeout_bounds_the_whole_fetch(make: Make, origin: Origin, route: str) -> None:
    fetcher = make(image_url_allow_hosts=("127.0.0.1",), image_url_timeout_s=0.4)
    t0 = time.monotonic()
    err = await refused(
        fetcher.fetch(f"http://127.0.0.1:{origin.port}{route}", path=PATH, deadline=None),
        "IMAGE_FETCH_FAILED",
    )
    elapsed = time.monotonic() - t0
    assert 0.3 < elapsed < 1.5, elapsed
    assert "longer than" in err.message


async def test_deadline_shorter_than_timeout(make: Make, origin: Origin) -> None:
    fetcher = make(image_url_allow_hosts=("127.0.0.1",), image_url_timeout_s=10.0)
    t0 = time.monotonic()
    await refused(
        fetcher.fetch(f"http://127.0.0.1:{origin.port}/stall", path=PATH, deadline=t0 + 0.3),
        "IMAGE_FETCH_FAILED",
    )
    assert time.monotonic() - t0 < 1.5


async def test_deadline_in_the_past(make: Make, origin: Origin, connects: ConnectLog) -> None:
    fetcher = make(image_url_allow_hosts=("127.0.0.1",))
    url = f"http://127.0.0.1:{origin.port}/img.png"
    await refused(fetcher.fetch(url, path=PATH, deadline=time.monotonic() - 1), "IMAGE_FETCH_FAILED")
    assert connects.attempts == [] and origin.connections == 0


async def test_caller_cancellation_propagates(make: Make, origin: Origin) -> None:
    fetcher = make(image_url_allow_hosts=("127.0.0.1",))
    task = asyncio.ensure_future(
        fetcher.fetch(f"http://127.0.0.1:{origin.port}/stall", path=PATH, deadline=None)
    )
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- https: the checked address, the real name verified ---------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """A CA and a leaf certificate for ``img.test`` (EC keys: fast)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fetch test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("img.test")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("fetch-tls")
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "cert.pem").write_bytes(leaf.public_bytes(pem))
    (d / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    yield d / "ca.pem", d / "cert.pem", d / "key.pem"


@pytest.fixture
async def tls_origin(tls_files: tuple[Path, Path, Path]) -> AsyncIterator[tuple[Origin, list[str | None]]]:
    _, cert, key = tls_files
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    names: list[str | None] = []

    def remember(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    ctx.sni_callback = remember
    srv = await Origin().start(ctx)
    yield srv, names
    await srv.stop()


async def test_https_verifies_the_real_name(
    make: Make,
    tls_files: tuple[Path, Path, Path],
    tls_origin: tuple[Origin, list[str | None]],
    monkeypatch: pytest.MonkeyPatch,
    connects: ConnectLog,
) -> None:
    srv, sni_names = tls_origin
    use_resolver(monkeypatch, {"img.test": ["127.0.0.1"], "wrong.test": ["127.0.0.1"]})
    trust = ssl.create_default_context(cafile=str(tls_files[0]))
    fetcher = make(image_url_allow_hosts=("img.test", "wrong.test", "127.0.0.1"), ssl_context=trust)
    assert await fetcher.fetch(f"https://img.test:{srv.port}/img.png", path=PATH, deadline=None) == PNG
    assert sni_names == ["img.test"]
    assert srv.requests[0][1]["host"] == f"img.test:{srv.port}"
    assert connects.attempts == ["127.0.0.1"]
    # same address, a name the certificate does not cover: refused by verification
    await refused(
        fetcher.fetch(f"https://wrong.test:{srv.port}/img.png", path=PATH, deadline=None),
        "IMAGE_FETCH_FAILED",
    )
    # the bare IP is not what the certificate names either
    await refused(
        fetcher.fetch(f"https://127.0.0.1:{srv.port}/img.png", path=PATH, deadline=None), "IMAGE_FETCH_FAILED"
    )
    # an untrusting client (the default CA bundle) refuses the test CA
    await refused(
        make(image_url_allow_hosts=("img.test",)).fetch(
            f"https://img.test:{srv.port}/img.png", path=PATH, deadline=None
        ),
        "IMAGE_FETCH_FAILED",
    )


async def test_scheme_change_on_same_host(
    make: Make,
    tls_files: tuple[Path, Path, Path],
    tls_origin: tuple[Origin, list[str | None]],
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv, _ = tls_origin
    use_resolver(monkeypatch, {"img.test": ["127.0.0.1"]})
    origin.links = {"https": f"https://img.test:{srv.port}/img.png"}
    srv.links = {"http": f"http://img.test:{origin.port}/img.png"}
    trust = ssl.create_default_context(cafile=str(tls_files[0]))
    fetcher = make(image_url_allow_hosts=("img.test",), ssl_context=trust)
    # http -> https on the same host: followed
    assert await fetcher.fetch(f"http://img.test:{origin.port}/to/https", path=PATH, deadline=None) == PNG
    # https -> http: a downgrade, refused before the second hop
    before = origin.connections
    err = await refused(
        fetcher.fetch(f"https://img.test:{srv.port}/to/http", path=PATH, deadline=None), "IMAGE_FETCH_FAILED"
    )
    assert "https to http" in err.message
    assert origin.connections == before


# --- pure rules: patterns and addresses (no network) -------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("*.example", "cdn.example", True),
        ("*.example", "a.b.example", True),
        ("*.example", "example", False),
        ("*.example", "badexample", False),
        ("*.example", "cdn.example.evil", False),
        ("*.Example.COM", "img.example.com", True),
        ("*.example.com", "example.com", False),
        ("img.example.com", "img.example.com", True),
        ("IMG.example.com.", "img.example.com", True),
        ("img.example.com", "a.img.example.com", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", False),
        ("[::1]", "::1", True),
        ("0:0::1", "::1", True),
        ("bücher.example", "xn--bcher-kva.example", True),
        ("*.bücher.example", "img.xn--bcher-kva.example", True),
    ],
)
def test_host_patterns(pattern: str, host: str, expected: bool) -> None:
    assert parse_host_pattern(pattern).matches(host) is expected


def test_wildcards_never_match_ip_literals() -> None:
    assert not parse_host_pattern("*.0.1").matches("127.0.0.1")


@pytest.mark.parametrize(
    "entry", ["*", "*.", "a/b", "img.example.com:8080", "u@img.example.com", "*.127.0.0.1", "a.*.b"]
)
def test_bad_patterns_rejected(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_host_pattern(entry)


def test_bad_allow_list_fails_at_construction() -> None:
    with pytest.raises(ValueError):
        ImageFetcher(Settings(image_url_fetch=True, image_url_allow_hosts=("host:80",)))


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("127.255.255.254", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("0.1.2.3", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("240.0.0.1", False),
        ("192.0.0.8", False),
        ("198.18.0.1", False),
        ("192.0.2.1", False),
        ("::", False),
        ("::1", False),
        ("::127.0.0.1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a00:1", False),
        ("64:ff9b::808:808", True),
        ("2002:7f00:1::", False),
        ("2002:a9fe:a9fe::", False),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("fd00::1", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("ff0e::1", False),
        ("2001:db8::1", False),
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public
