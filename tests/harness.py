"""Test helpers: an in-memory engine double, real servers in-process and as a subprocess.

* :class:`FakeEngine` implements the ``Engine`` protocol without a model. Scores, token costs,
  failures, OOMs and a device "gate" are controllable, so scheduler tests can create exact
  interleavings (a batch held on the device while others queue) without sleeping.
* :class:`GatedEngine` wraps any engine (the real one on the tiny checkpoint included) with the
  same gate and batch log, so end-to-end tests can hold the device deterministically too.
* :func:`running_server` starts a real :class:`lychee_server.app.LycheeServer` on 127.0.0.1
  with port 0 in this process; :func:`subprocess_server` starts ``python -m lychee_server.app``
  configured by ``LYCHEE_*`` variables and parses its ``{"event": "serving", ...}`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lychee_server import errors
from lychee_server.domain import Content, EngineInfo, Modality
from lychee_server.engine.interface import Engine, PreparedPair, PreparedQuery
from lychee_server.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT = 10.0


# --------------------------------------------------------------------------- waiting helpers
async def eventually(predicate: Callable[[], bool], limit_s: float = DEFAULT_TIMEOUT, what: str = "") -> None:
    """Poll ``predicate`` on the event loop until it holds; fail after ``limit_s`` seconds.

    This is for observing state that has no event to await (a gauge, a worker thread's
    progress) — bounded in time, never a fixed sleep standing in for synchronisation.
    """
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s}s waiting for {what or predicate}")
        await asyncio.sleep(0.002)


async def wait_thread_event(event: threading.Event, limit_s: float = DEFAULT_TIMEOUT) -> None:
    """Await a ``threading.Event`` set by a worker thread without blocking the loop."""
    if not await asyncio.to_thread(event.wait, limit_s):
        raise AssertionError(f"timed out after {limit_s}s waiting for a worker thread")


# --------------------------------------------------------------------------- engine doubles
@dataclass(frozen=True, eq=False)
class FakeQuery:
    text: str
    max_length: int
    cost_tokens: int
    num_images: int


@dataclass(frozen=True, eq=False)
class FakePair:
    query: FakeQuery
    text: str
    logit: float
    cost_tokens: int
    total_tokens: int
    truncated: bool
    num_images: int


class Gate:
    """Holds device calls while closed; records how many calls entered."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()
        self.calls = 0

    def close(self) -> None:
        self.entered.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def pass_through(self, timeout: float = 30.0) -> None:
        with self._lock:
            self.calls += 1
        self.entered.set()
        if not self._open.wait(timeout):
            raise RuntimeError("test gate never opened")


class FakeEngine:
    """An ``Engine`` without a model: a document's logit is ``float(text)`` when its text is a
    number (else a stable hash), its ``cost_tokens`` is its character count (or ``doc_tokens``).

    Knobs: ``oom_above`` (score() raises DeviceOutOfMemory for batches larger than that),
    ``fail_when`` (score() raises RuntimeError when any pair's text is in it), texts starting with
    ``"bad"`` fail preparation with an InvalidInput about ``image``; ``gate`` holds score().
    """

    def __init__(
        self,
        *,
        prefix_tokens: int = 0,
        doc_tokens: int | None = None,
        oom_above: int | None = None,
        fail_when: Sequence[str] = (),
        model_id: str = "fake-lychee",
    ) -> None:
        self.prefix_tokens = prefix_tokens
        self.doc_tokens = doc_tokens
        self.oom_above = oom_above
        self.fail_when = frozenset(fail_when)
        self.gate = Gate()
        self.batches: list[list[str]] = []  # texts of every batch that completed or raised
        self.released: list[FakeQuery] = []
        self.prepared: list[str] = []
        self.warmed = False
        self._lock = threading.Lock()
        self._info = EngineInfo(
            model_id=model_id,
            model_revision="",
            dtype="float32",
            device="cpu",
            query_modalities=frozenset({Modality.TEXT, Modality.IMAGE}),
            document_modalities=frozenset({Modality.TEXT, Modality.IMAGE}),
            min_pixels=4 * 28 * 28,
            max_pixels=1280 * 28 * 28,
            random_weights=True,
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    def prepare_query(self, instruction: str, query: Content, max_length: int, tenant: str = "") -> FakeQuery:
        return FakeQuery(
            text=query.text or "",
            max_length=max_length,
            cost_tokens=self.prefix_tokens,
            num_images=1 if query.image is not None else 0,
        )

    def prepare_pair(self, query: PreparedQuery, document: Content) -> FakePair:
        assert isinstance(query, FakeQuery)
        text = document.text or ""
        with self._lock:
            self.prepared.append(text)
        if text.startswith("bad"):
            raise errors.InvalidInput(
                "cannot decode the image",
                reason="IMAGE_DECODE_FAILED",
                violations=[errors.FieldViolation("image", "cannot decode", "IMAGE_DECODE_FAILED")],
            )
        try:
            logit = float(text)
        except ValueError:
            logit = (sum(text.encode()) % 1000) / 100.0 - 5.0
        cost = self.doc_tokens if self.doc_tokens is not None else max(1, len(text))
        truncated = cost > query.max_length
        cost = min(cost, query.max_length)
        return FakePair(
            query=query,
            text=text,
            logit=logit,
            cost_tokens=cost,
            total_tokens=cost + self.prefix_tokens,
            truncated=truncated,
            num_images=1 if document.image is not None else 0,
        )

    def score(self, pairs: Sequence[PreparedPair]) -> list[float]:
        self.gate.pass_through()
        texts = [p.text for p in pairs if isinstance(p, FakePair)]
        with self._lock:
            self.batches.append(texts)
        if self.oom_above is not None and len(pairs) > self.oom_above:
            raise errors.DeviceOutOfMemory(f"fake OOM on {len(pairs)} pairs")
        if self.fail_when.intersection(texts):
            raise RuntimeError("fake device failure")
        return [p.logit for p in pairs if isinstance(p, FakePair)]

    def release(self, query: PreparedQuery) -> None:
        assert isinstance(query, FakeQuery)
        with self._lock:
            self.released.append(query)

    def warmup(self) -> None:
        self.warmed = True

    @property
    def scored_texts(self) -> list[str]:
        with self._lock:
            return [t for batch in self.batches for t in batch]


class GatedEngine:
    """Wraps a real engine: same answers, plus a device gate and a log of batch sizes."""

    def __init__(self, inner: Engine, *, hold_warmup: bool = False) -> None:
        self.inner = inner
        self.gate = Gate()
        self.warmup_gate = Gate()
        if hold_warmup:
            self.warmup_gate.close()
        self.batch_sizes: list[int] = []

    @property
    def info(self) -> EngineInfo:
        return self.inner.info

    def prepare_query(
        self, instruction: str, query: Content, max_length: int, tenant: str = ""
    ) -> PreparedQuery:
        return self.inner.prepare_query(instruction, query, max_length, tenant)

    def prepare_pair(self, query: PreparedQuery, document: Content) -> PreparedPair:
        return self.inner.prepare_pair(query, document)

    def score(self, pairs: Sequence[PreparedPair]) -> list[float]:
        self.gate.pass_through()
        self.batch_sizes.append(len(pairs))
        return self.inner.score(pairs)

    def release(self, query: PreparedQuery) -> None:
        self.inner.release(query)

    def warmup(self) -> None:
        self.warmup_gate.pass_through()
        self.inner.warmup()


# --------------------------------------------------------------------------- status details
@dataclass(frozen=True)
class ErrorDetails:
    """The AIP-193 details of a failed call, decoded from ``grpc-status-details-bin``."""

    code: Any  # grpc.StatusCode
    reason: str
    metadata: dict[str, str]
    fields: list[str]
    retry_delay: float | None


def error_details(err: Any) -> ErrorDetails:
    """Decode an ``AioRpcError``'s rich status (ErrorInfo, BadRequest, RetryInfo)."""
    from google.rpc import error_details_pb2, status_pb2

    raw = next((v for k, v in (err.trailing_metadata() or ()) if k == "grpc-status-details-bin"), None)
    if raw is None:
        return ErrorDetails(err.code(), "", {}, [], None)
    status = status_pb2.Status.FromString(raw)
    reason, meta, fields, delay = "", {}, [], None
    for any_msg in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if any_msg.Unpack(info):
            reason, meta = info.reason, dict(info.metadata)
        elif any_msg.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
        elif any_msg.Unpack(retry):
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    return ErrorDetails(err.code(), reason, meta, fields, delay)


# --------------------------------------------------------------------------- servers
def make_settings(model: str | Path = "fake", **overrides: Any) -> Settings:
    """Settings for a loopback test server: port 0, metrics on port 0, CPU, human logs."""
    values: dict[str, Any] = {
        "model": str(model),
        "device": "cpu",
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "http_port": 0,
        "metrics_host": "127.0.0.1",
        "decode_threads": 2,
        "grace_period_s": 5.0,
        "log_json": True,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class RunningServer:
    server: Any  # lychee_server.app.LycheeServer
    settings: Settings
    engine: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str | None:
        url: str | None = self.server.metrics_url
        return url


@contextlib.asynccontextmanager
async def running_server(
    model: str | Path | None = None, *, engine: Engine | None = None, **overrides: Any
) -> AsyncIterator[RunningServer]:
    """Start a real server in this process (``model`` = checkpoint dir, or pass ``engine``)."""
    from lychee_server.app import build_server

    settings = make_settings(model if model is not None else "fake", **overrides)
    server = build_server(settings, engine=engine)
    try:
        await server.start()
        yield RunningServer(server=server, settings=settings, engine=server.engine)
    finally:
        await server.stop(grace=0)


def text_stream_messages(
    texts: list[str], *, chunk: int, id_prefix: str = "d", instruction: str | None = None
) -> list[Any]:
    """A RerankStream of text documents (query "red bicycle" inline), each text cut into ``chunk``-byte
    chunks, document ids ``{id_prefix}{i}``."""
    from lychee.rerank.v1 import rerank_pb2 as pb

    header = pb.StreamHeader(query=pb.Content(text="red bicycle"), document_count=len(texts))
    if instruction is not None:
        header.instruction = instruction
    msgs = [pb.RerankStreamRequest(header=header)]
    for i, text in enumerate(texts):
        data = text.encode()
        msgs.append(pb.RerankStreamRequest(item=pb.ItemStart(id=f"{id_prefix}{i}", text_bytes=len(data))))
        for start in range(0, len(data), chunk):
            msgs.append(pb.RerankStreamRequest(chunk=pb.ItemChunk(text=data[start : start + chunk])))
    return msgs


async def aiter_list(items: Sequence[Any]) -> AsyncIterator[Any]:
    """An async iterator over ``items`` (a request stream for grpc.aio)."""
    for item in items:
        yield item


def fetch_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body.decode()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample in Prometheus text exposition (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (
                labels is None or all(sample.labels.get(k) == v for k, v in labels.items())
            ):
                return float(sample.value)
    return None


@dataclass
class SubprocessServer:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int | None
    lines: list[str] = field(default_factory=list)
    http_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def spawn_cli_server(model: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``lychee-rerank serve`` (the real CLI) for tests: loopback, port 0, CPU, LYCHEE_* config.

    stdout and stderr are merged into one text pipe, which the caller must read.
    """
    full_env = dict(os.environ)
    full_env.update(
        {
            "LYCHEE_MODEL": str(model),
            "LYCHEE_DEVICE": "cpu",
            "LYCHEE_HOST": "127.0.0.1",
            "LYCHEE_PORT": "0",
            "LYCHEE_METRICS_PORT": "0",
            "LYCHEE_HTTP_PORT": "0",
            "LYCHEE_DECODE_THREADS": "1",
            "LYCHEE_LOG_LEVEL": "INFO",
        }
    )
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "lychee_server.cli", "serve"],
        cwd=REPO_ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@contextlib.contextmanager
def subprocess_server(
    model: str | Path, *, env: dict[str, str] | None = None, startup_timeout: float = 120.0
) -> Iterator[SubprocessServer]:
    """Run ``python -m lychee_server.app`` (config from LYCHEE_* variables) until it is SERVING.

    The server prints one JSON line ``{"event": "serving", "port": N, "metrics_port": M}`` on
    stdout once healthy; that is how a port-0 server tells us where it listens. The process is
    killed on exit if the test did not stop it itself.
    """
    proc = spawn_cli_server(model, env)
    lines: list[str] = []
    ready: dict[str, Any] = {}
    found = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not found.is_set():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("event") == "serving":
                        ready.update(record)
                        found.set()
        found.set()  # EOF: the process died

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        if not found.wait(startup_timeout) or not ready:
            raise AssertionError("server subprocess did not report serving:\n" + "\n".join(lines[-50:]))
        metrics_port = ready.get("metrics_port")
        http_port = ready.get("http_port")
        yield SubprocessServer(
            proc=proc,
            port=int(ready["port"]),
            metrics_port=int(metrics_port) if metrics_port is not None else None,
            lines=lines,
            http_port=int(http_port) if http_port is not None else None,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        thread.join(timeout=5)


# --------------------------------------------------------------------------- TLS material
@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A throwaway CA plus a server cert (SAN ``host`` and localhost) and a client cert, as PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("lychee test CA"))
        .issuer_name(name("lychee test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf(
        "lychee test server",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")],
    )
    client_key, client_cert = leaf("lychee test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    directory.mkdir(parents=True, exist_ok=True)
    return TlsFiles(
        ca_cert=write_cert(ca_cert, directory / "ca.pem"),
        server_cert=write_cert(server_cert, directory / "server.pem"),
        server_key=write_key(server_key, directory / "server.key"),
        client_cert=write_cert(client_cert, directory / "client.pem"),
        client_key=write_key(client_key, directory / "client.key"),
    )
