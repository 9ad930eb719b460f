"""Fetch an image named by URL in an HTTP request, hardened against SSRF.

Off unless the server runs with ``--image-url-fetch``. When on, one fetch goes:

1. **Policy on the URL**: http or https only, no ``user:password@``, a host; with an allow-list
   (``--image-url-allow-host``), the host must match it (``img.example.com`` exactly, or
   ``*.example.com`` = any name *below* example.com, not example.com itself).
2. **Resolve once, check every address**: the host is resolved with the event loop's
   ``getaddrinfo`` (a worker thread, the loop never blocks) and *every* answer must be a public
   address -- no loopback, private, shared (CGNAT), link-local (``169.254.169.254``),
   multicast, reserved, documentation or unspecified address, and none hidden inside an IPv6
   form (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo). A host listed *exactly* on the
   allow-list may resolve to non-public addresses (an internal image store); a ``*.`` pattern
   does not grant that. Unspecified (``0.0.0.0``, ``::``), multicast and broadcast addresses are
   never connected to.
3. **Connect to the checked address**, never to the name again (no DNS rebinding): the request
   goes to the IP with the real ``Host`` header, and for https the real name as SNI and for
   certificate verification (httpcore's ``sni_hostname`` extension). Connections are not kept
   alive, so a connection verified for one name is never reused for another name on the same IP.
4. **Redirects** (at most :data:`MAX_REDIRECTS`) only to the same host; http -> https is fine,
   https -> http is not. Each hop is resolved and checked again.
5. **Limits**: a ``Content-Length`` over ``max_image_bytes`` is refused before the body is read;
   the body is counted as it streams (chunked too) and reading stops past the limit. Compressed
   transfer is not requested (``Accept-Encoding: identity``) and a compressed answer is refused,
   so nothing is inflated. All hops together finish within
   ``min(image_url_timeout_s, deadline - now)``.

Every failure is an :class:`~lychee_server.errors.InvalidInput` with one field violation at the
request's JSON path and reason ``IMAGE_URL_DISABLED``, ``IMAGE_URL_FORBIDDEN`` or
``IMAGE_FETCH_FAILED``. Messages may name the URL's host; they never carry the rest of the URL
(it may hold tokens), the resolved addresses or exception text.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from lychee_server.errors import FieldViolation, InvalidInput
from lychee_server.settings import Settings

__all__ = [
    "MAX_REDIRECTS",
    "HostPattern",
    "ImageFetcher",
    "is_public_address",
    "parse_host_pattern",
]

MAX_REDIRECTS = 3
MAX_URL_CHARS = 8192
MAX_CONNECTIONS = 64
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "lychee-rerank-image-fetch/1"

DISABLED = "IMAGE_URL_DISABLED"
FORBIDDEN = "IMAGE_URL_FORBIDDEN"
FAILED = "IMAGE_FETCH_FAILED"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Blocks Python 3.11's ``is_global`` lets through or that hide another address.
_V4_NOT_PUBLIC = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # shared address space (CGNAT)
        "192.0.0.0/24",  # IETF protocol assignments
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "198.18.0.0/15",  # benchmarking
    )
)
_V6_NOT_PUBLIC = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/96",  # IPv4-compatible (deprecated), includes :: and ::1
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, Teredo
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "fec0::/10",  # site-local (deprecated)
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4), else the address itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def is_public_address(ip: IPAddress) -> bool:
    """True only for a globally routable unicast address (IPv4 inside IPv6 judged as IPv4)."""
    ip = _unwrap(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        if any(ip in net for net in _V4_NOT_PUBLIC):
            return False
    elif ip.teredo is not None or any(ip in net for net in _V6_NOT_PUBLIC):
        return False
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_unspecified
    )


def _never_connect(ip: IPAddress) -> bool:
    """Addresses refused even for an allow-listed host: nothing legitimate serves there."""
    ip = _unwrap(ip)
    return ip.is_unspecified or ip.is_multicast or ip == _BROADCAST


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _normal_host(raw_host: bytes) -> str:
    """A URL's host as compared with the allow-list: ASCII (IDNA), lower case, no trailing dot."""
    host = raw_host.decode("ascii").lower().rstrip(".")
    ip = _ip_literal(host)
    return host if ip is None else str(ip)


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One allow-list entry: an exact host (a name or an IP) or ``*.suffix``."""

    host: str
    wildcard: bool

    def matches(self, host: str) -> bool:
        """``host`` normalized as by :func:`_normal_host`."""
        if self.wildcard:
            return _ip_literal(host) is None and host.endswith("." + self.host)
        return host == self.host


def parse_host_pattern(entry: str) -> HostPattern:
    """Parse one ``--image-url-allow-host`` entry; ValueError when it is not a host or ``*.host``."""
    text = entry.strip()
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not name or "*" in name or "/" in name or "@" in name:
        raise ValueError(f"image URL allow-list entry {entry!r} is not a host name or '*.host'")
    ip = _ip_literal(name)
    if ip is not None:
        if wildcard:
            raise ValueError(f"image URL allow-list entry {entry!r}: '*.' needs a domain name")
        return HostPattern(str(ip), wildcard=False)
    if ":" in name:
        raise ValueError(f"image URL allow-list entry {entry!r} must be a bare host (no port)")
    try:
        url = httpx.URL(f"http://{name}/")
    except httpx.InvalidURL:
        raise ValueError(f"image URL allow-list entry {entry!r} is not a host name") from None
    if url.port is not None or not url.raw_host or url.userinfo:
        raise ValueError(f"image URL allow-list entry {entry!r} must be a bare host (no port)")
    host = _normal_host(url.raw_host)
    if not host:
        raise ValueError(f"image URL allow-list entry {entry!r} is not a host name")
    return HostPattern(host, wildcard=wildcard)


def _problem(path: str, reason: str, message: str) -> InvalidInput:
    return InvalidInput(message, reason=reason, violations=[FieldViolation(path, message, reason)])


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpx.URL
    host: str  # normalized (allow-list / same-host comparisons, messages)
    sni: str | None  # the name TLS verifies (https with a host name)
    private_ok: bool  # the host is listed exactly: non-public addresses allowed

    @property
    def port(self) -> int:
        return self.url.port or (443 if self.url.scheme == "https" else 80)


class ImageFetcher:
    """Fetches image bytes by URL for the HTTP door; one per server, shared by all requests."""

    def __init__(self, settings: Settings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context`` (an :class:`ssl.SSLContext`) replaces the default CA bundle (tests,
        private CAs); certificates are always verified."""
        self._enabled = settings.image_url_fetch
        self._patterns = tuple(parse_host_pattern(h) for h in settings.image_url_allow_hosts if h.strip())
        self._timeout_s = settings.image_url_timeout_s
        self._max_bytes = settings.max_image_bytes
        no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            verify=ssl_context if ssl_context is not None else True,
            cookies=no_cookies,
            http1=True,
            http2=False,
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=0),
            timeout=httpx.Timeout(self._timeout_s),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, *, path: str, deadline: float | None) -> bytes:
        """The body of ``url``; raises InvalidInput (one violation at ``path``) on any failure."""
        if not self._enabled:
            raise _problem(
                path,
                DISABLED,
                "image URLs are not fetched by this server; send the image as base64 or a data: URI, "
                "or start the server with --image-url-fetch (LYCHEE_IMAGE_URL_FETCH=1) and allow hosts "
                "with --image-url-allow-host HOST",
            )
        target = self._target(url, path)
        budget = self._timeout_s
        if deadline is not None:
            budget = min(budget, deadline - time.monotonic())
        if budget <= 0:
            raise _problem(path, FAILED, f"no time left to fetch the image from {target.host}")
        try:
            async with asyncio.timeout(budget):
                return await self._follow(target, path, time.monotonic() + budget)
        except TimeoutError:
            raise _problem(
                path, FAILED, f"fetching the image from {target.host} took longer than {budget:.3g} s"
            ) from None

    # --- policy ---------------------------------------------------------------------------

    def _target(self, url: str, path: str, *, base: _Target | None = None) -> _Target:
        """Parse ``url`` (relative to ``base`` for a redirect) and apply the URL policy."""
        bad = FAILED if base is not None else FORBIDDEN
        what = "the redirect target" if base is not None else "the image URL"
        if len(url) > MAX_URL_CHARS:
            raise _problem(path, bad, f"{what} is longer than {MAX_URL_CHARS} characters")
        try:
            parsed = base.url.join(url) if base is not None else httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise _problem(path, bad, f"{what} is not a valid URL") from None
        if parsed.scheme not in ("http", "https"):
            raise _problem(path, bad, f"{what} must be http:// or https://")
        if parsed.userinfo:
            raise _problem(path, bad, f"{what} must not carry a user name or password")
        if not parsed.raw_host:
            raise _problem(path, bad, f"{what} names no host")
        try:
            host = _normal_host(parsed.raw_host)
        except UnicodeDecodeError:
            raise _problem(path, bad, f"{what} is not a valid URL") from None
        if base is not None:
            if host != base.host:
                raise _problem(
                    path,
                    FAILED,
                    f"{base.host} redirected to another host ({host}); only same-host redirects are followed",
                )
            if base.url.scheme == "https" and parsed.scheme == "http":
                raise _problem(path, FAILED, f"{base.host} redirected from https to http")
            return _Target(parsed, host, self._sni(parsed, host), base.private_ok)
        if self._patterns and not any(p.matches(host) for p in self._patterns):
            raise _problem(
                path,
                FORBIDDEN,
                f"image URL host {host} is not on this server's allow-list (--image-url-allow-host)",
            )
        private_ok = any(not p.wildcard and p.matches(host) for p in self._patterns)
        return _Target(parsed, host, self._sni(parsed, host), private_ok)

    @staticmethod
    def _sni(url: httpx.URL, host: str) -> str | None:
        return host if url.scheme == "https" and _ip_literal(host) is None else None

    async def _addresses(self, target: _Target, path: str) -> list[IPAddress]:
        """Resolve the host once and check every address it has."""
        literal = _ip_literal(target.host)
        if literal is not None:
            found = [literal]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(
                    target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
            except (OSError, UnicodeError):
                raise _problem(path, FAILED, f"could not resolve image URL host {target.host}") from None
            found = []
            for family, _type, _proto, _name, sockaddr in infos:
                if family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                ip = _ip_literal(str(sockaddr[0]).split("%", 1)[0])
                if ip is not None and ip not in found:
                    found.append(ip)
            if not found:
                raise _problem(path, FAILED, f"could not resolve image URL host {target.host}")
        for ip in found:
            if _never_connect(ip) or not (target.private_ok or is_public_address(ip)):
                raise _problem(
                    path,
                    FORBIDDEN,
                    f"image URL host {target.host} is not a public address; private, loopback and "
                    "link-local addresses are fetched only from hosts listed exactly with "
                    "--image-url-allow-host",
                )
        return found

    # --- transfer -------------------------------------------------------------------------

    async def _follow(self, target: _Target, path: str, end: float) -> bytes:
        for hop in range(MAX_REDIRECTS + 1):
            addresses = await self._addresses(target, path)
            response = await self._open(target, addresses, path, end)
            try:
                status = response.status_code
                if status in REDIRECT_STATUSES:
                    if hop == MAX_REDIRECTS:
                        raise _problem(
                            path, FAILED, f"{target.host} redirected more than {MAX_REDIRECTS} times"
                        )
                    location = response.headers.get("location")
                    if not location:
                        raise _problem(path, FAILED, f"{target.host} sent a redirect without a Location")
                    target = self._target(location, path, base=target)
                    continue
                if not 200 <= status < 300:
                    raise _problem(path, FAILED, f"{target.host} answered HTTP {status} for the image URL")
                return await self._body(response, target, path)
            finally:
                await response.aclose()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open(
        self, target: _Target, addresses: list[IPAddress], path: str, end: float
    ) -> httpx.Response:
        """Send the GET to the first checked address that accepts a connection."""
        headers = {
            "Host": target.url.netloc.decode("ascii"),
            "User-Agent": USER_AGENT,
            "Accept": "image/*",
            "Accept-Encoding": "identity",
        }
        for ip in addresses:
            remaining = max(end - time.monotonic(), 0.001)
            extensions: dict[str, object] = {"timeout": httpx.Timeout(remaining).as_dict()}
            if target.sni is not None:
                extensions["sni_hostname"] = target.sni
            request = httpx.Request(
                "GET", target.url.copy_with(host=str(ip)), headers=headers, extensions=extensions
            )
            try:
                return await self._client.send(request, stream=True, follow_redirects=False)
            except httpx.ConnectError:
                continue  # refused, unreachable or failed TLS: try the host's next address
            except httpx.TimeoutException:
                raise TimeoutError from None
            except (httpx.HTTPError, OSError):
                raise _problem(path, FAILED, f"the image fetch from {target.host} failed") from None
        raise _problem(
            path, FAILED, f"could not connect to image URL host {target.host} (connection or TLS failed)"
        )

    async def _body(self, response: httpx.Response, target: _Target, path: str) -> bytes:
        limit = self._max_bytes
        too_large = f"the image at {target.host} is larger than max_image_bytes ({limit} bytes)"
        length = response.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise _problem(path, FAILED, f"{target.host} sent a bad Content-Length") from None
            if declared > limit:
                raise _problem(path, FAILED, too_large)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _problem(path, FAILED, f"{target.host} sent a compressed answer (Content-Encoding)")
        body = bytearray()
        try:
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > limit:
                    raise _problem(path, FAILED, too_large)
        except httpx.TimeoutException:
            raise TimeoutError from None
        except (httpx.HTTPError, OSError):
            raise _problem(path, FAILED, f"reading the image from {target.host} failed") from None
        if not body:
            raise _problem(path, FAILED, f"{target.host} sent an empty body for the image URL")
        return bytes(body)
