"""Shared tools of the reliability suite (load, faults, security).

Why a separate kit: the reliability tests judge the server from the outside — over real gRPC
channels on loopback, through ``/metrics`` and ``/proc`` — so they need a few black-box probes
that the functional tests do not: decoding ``google.rpc.Status`` details from any failed call,
scraping and waiting on Prometheus series, reading a process's resident memory, a deterministic
mixed workload (text / image, unary / stream), a throw-away PKI for the TLS cases, and a place to
write the figures that ``scripts/reliability.sh`` renders into ``docs/reliability.md``.

Everything is exposed through fixtures (``kit``, ``pki``, ``workload``) rather than imported:
``tests/`` is on ``sys.path`` and holds its own ``conftest.py``, so ``import conftest`` would be
ambiguous.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import random
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families

from harness import make_tls_files
from helpers import encode, pattern
from lychee.rerank.v1 import rerank_pb2 as pb
from lychee.rerank.v1 import rerank_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
ERROR_DOMAIN = "lychee.rerank.v1"
_DETAILS_KEY = "grpc-status-details-bin"


def report_dir() -> Path:
    """Where figures go: ``$LYCHEE_RELIABILITY_OUT`` or ``build/reliability`` in the repo."""
    return Path(os.environ.get("LYCHEE_RELIABILITY_OUT", REPO_ROOT / "build" / "reliability"))


# --------------------------------------------------------------------------------------------
# Error details


@dataclass(frozen=True)
class RpcFailure:
    """What a failed call told its caller: the code plus the decoded AIP-193 details."""

    code: grpc.StatusCode
    details: str
    reason: str | None  # ErrorInfo.reason, when an ErrorInfo of our domain was attached
    domain: str | None
    retry_delay_s: float | None  # RetryInfo.retry_delay, when attached
    violations: tuple[str, ...]  # BadRequest field paths

    @property
    def label(self) -> str:
        """``CODE/REASON`` — the key the reports count failures under."""
        return f"{self.code.name}/{self.reason or '-'}"


def decode_failure(err: grpc.RpcError) -> RpcFailure:
    """Decode a failed call (sync or aio) into its code and rich-status details.

    Tolerant on purpose: a transport-level failure (connection refused, TLS handshake) carries
    no details at all, and the tests need to tell that apart from a server-made status.
    """
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    details: str = err.details() or ""  # type: ignore[attr-defined]
    trailers = err.trailing_metadata() or ()  # type: ignore[attr-defined]
    reason = domain = None
    retry = None
    violations: list[str] = []
    for key, value in trailers:
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for any_msg in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            retry_info = error_details_pb2.RetryInfo()
            if any_msg.Unpack(info):
                reason, domain = info.reason, info.domain
            elif any_msg.Unpack(bad):
                violations.extend(v.field for v in bad.field_violations)
            elif any_msg.Unpack(retry_info):
                retry = retry_info.retry_delay.seconds + retry_info.retry_delay.nanos / 1e9
    return RpcFailure(code, details, reason, domain, retry, tuple(violations))


# --------------------------------------------------------------------------------------------
# Metrics, memory, waiting


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """One ``/metrics`` scrape as ``{'name{label="v",...}': value}`` (labels sorted)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback only
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


async def wait_for(
    probe: Callable[[], Any], check: Callable[[Any], bool], *, within: float, what: str, every: float = 0.05
) -> Any:
    """Poll ``probe`` (run in a thread) until ``check`` holds; fail with the last value at the deadline.

    This waits on an observable state (a gauge, a health status, a process) with a hard deadline;
    it never sleeps a fixed time to paper over a race.
    """
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        last = await asyncio.to_thread(probe)
        if check(last):
            return last
        if time.monotonic() > deadline:
            shown = repr(last)
            if isinstance(last, dict):  # a scrape: show the scheduler's gauges, not every histogram bucket
                shown = repr({k: v for k, v in last.items() if "_bucket" not in k and "_created" not in k})
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}; last value: {shown}")
        await asyncio.sleep(every)


def vm_rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from ``/proc/PID/status`` (psutil is not a dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine() -> dict[str, Any]:
    """The facts a reader needs to judge the figures: CPU count, model, GPU presence, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "gpu": Path("/dev/nvidia0").exists(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def read_figures(name: str) -> dict[str, Any]:
    """The figures a previous run left in ``build/reliability/<name>.json`` ({} if none)."""
    path = report_dir() / f"{name}.json"
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def write_figures(name: str, figures: dict[str, Any]) -> Path:
    """Write ``build/reliability/<name>.json`` (with the machine facts) and print it.

    Top-level keys replace those of an earlier run; callers merge finer-grained results themselves
    (see ``read_figures``) so that running one test alone does not erase the others' figures.
    """
    out = report_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    doc = read_figures(name)
    doc.update(figures)
    doc["machine"] = machine()
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"\n[reliability] {path}:\n{json.dumps(figures, indent=2, sort_keys=True)}")
    return path


# --------------------------------------------------------------------------------------------
# Workload


class Workload:
    """Deterministic mixed requests: text or images, a few documents each, unary or streamed.

    The images are small PNG/JPEG patterns encoded once; several of them repeat across requests
    the way real catalogues do (so the server's vision cache sees both hits and misses).
    """

    INSTRUCTION = "Given a product query, retrieve the matching catalogue entries"

    def __init__(self, n_images: int = 48) -> None:
        self.images: list[pb.Image] = []
        for i in range(n_images):
            side = 28 + 4 * (i % 8)
            if i % 2:
                data = encode(pattern(side, side + 8, seed=i), "JPEG", quality=85)
                self.images.append(pb.Image(data=data, media_type=pb.MEDIA_TYPE_JPEG))
            else:
                data = encode(pattern(side + 8, side, seed=i), "PNG")
                self.images.append(pb.Image(data=data, media_type=pb.MEDIA_TYPE_PNG))

    @staticmethod
    def text(rng: random.Random, words: int) -> str:
        vocab = ("red", "shoe", "lamp", "cotton", "desk", "blue", "wooden", "chair", "steel", "bottle")
        return " ".join(rng.choice(vocab) for _ in range(words))

    def content(self, rng: random.Random, with_image: bool) -> pb.Content:
        if not with_image:
            return pb.Content(text=self.text(rng, rng.randint(3, 24)))
        image = rng.choice(self.images)
        if rng.random() < 0.5:
            return pb.Content(image=image)
        return pb.Content(text_image=pb.TextImage(text=self.text(rng, 4), image=image))

    def request(self, rng: random.Random, n_docs: int, with_images: bool) -> pb.RerankRequest:
        return pb.RerankRequest(
            instruction=self.INSTRUCTION,
            query=pb.Content(text=self.text(rng, 5)),
            documents=[
                pb.Document(id=f"d{i}", content=self.content(rng, with_images and i % 2 == 0))
                for i in range(n_docs)
            ],
        )

    @staticmethod
    def stream(req: pb.RerankRequest, chunk: int = 4096) -> list[pb.RerankStreamRequest]:
        """The same request as a RerankStream: header with the inline query, then each document."""
        header = pb.StreamHeader(query=req.query, document_count=len(req.documents), options=req.options)
        if req.HasField("instruction"):  # optional: an explicit empty one would be EMPTY_TEXT
            header.instruction = req.instruction
        msgs = [pb.RerankStreamRequest(header=header)]
        for doc in req.documents:
            msgs.extend(Workload.stream_item(doc, chunk))
        return msgs

    @staticmethod
    def stream_item(doc: pb.Document, chunk: int = 4096) -> list[pb.RerankStreamRequest]:
        kind = doc.content.WhichOneof("kind")
        text = b""
        image: pb.Image | None = None
        if kind == "text":
            text = doc.content.text.encode()
        elif kind == "image":
            image = doc.content.image
        elif kind == "text_image":
            text = doc.content.text_image.text.encode()
            image = doc.content.text_image.image
        start = pb.ItemStart(
            id=doc.id,
            text_bytes=len(text),
            image_bytes=len(image.data) if image is not None else 0,
            image_media_type=image.media_type if image is not None else pb.MEDIA_TYPE_UNSPECIFIED,
        )
        msgs = [pb.RerankStreamRequest(item=start)]
        for off in range(0, len(text), chunk):
            msgs.append(pb.RerankStreamRequest(chunk=pb.ItemChunk(text=text[off : off + chunk])))
        if image is not None:
            for off in range(0, len(image.data), chunk):
                msgs.append(pb.RerankStreamRequest(chunk=pb.ItemChunk(image=image.data[off : off + chunk])))
        return msgs


def check_ranking(results: Sequence[pb.RankedDocument], n_docs: int) -> str | None:
    """Why a successful response is still wrong (None when it is a real answer)."""
    if len(results) != n_docs:
        return f"{len(results)} results for {n_docs} documents"
    if sorted(r.index for r in results) != list(range(n_docs)):
        return "indices are not a permutation of the documents"
    scores = [r.score for r in results]
    if any(not 0.0 <= s <= 1.0 for s in scores):
        return f"probability outside [0, 1]: {scores}"
    if scores != sorted(scores, reverse=True):
        return "results not sorted by descending score"
    return None


# --------------------------------------------------------------------------------------------
# PKI


@dataclass(frozen=True)
class Pki:
    """A throw-away CA, a server cert for 127.0.0.1/localhost, and client certs from two CAs."""

    dir: Path
    ca_cert: bytes
    server_cert: Path
    server_key: Path
    client_cert: bytes
    client_key: bytes
    rogue_ca_cert: bytes  # a second CA, trusted by nobody here
    rogue_client_cert: bytes  # issued by the second CA
    rogue_client_key: bytes

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.pem"


def make_pki(directory: Path) -> Pki:
    """Generate the PKI at test time: no key material lives in the repository, and every run gets
    fresh EC P-256 keys valid for one day. The "rogue" CA and its client certificate come from a
    second, independent :func:`harness.make_tls_files` run in a subdirectory."""
    trusted = make_tls_files(directory)
    rogue = make_tls_files(directory / "rogue")
    return Pki(
        dir=directory,
        ca_cert=trusted.ca_cert.read_bytes(),
        server_cert=trusted.server_cert,
        server_key=trusted.server_key,
        client_cert=trusted.client_cert.read_bytes(),
        client_key=trusted.client_key.read_bytes(),
        rogue_ca_cert=rogue.ca_cert.read_bytes(),
        rogue_client_cert=rogue.client_cert.read_bytes(),
        rogue_client_key=rogue.client_key.read_bytes(),
    )


# --------------------------------------------------------------------------------------------
# Channels


@asynccontextmanager
async def open_stub(
    address: str, credentials: grpc.ChannelCredentials | None = None
) -> AsyncIterator[pb_grpc.RerankServiceStub]:
    """A raw stub on its own channel (its own HTTP/2 connection), closed on exit."""
    if credentials is None:
        channel = grpc.aio.insecure_channel(address)
    else:
        channel = grpc.aio.secure_channel(address, credentials)
    try:
        yield pb_grpc.RerankServiceStub(channel)
    finally:
        await channel.close(grace=None)


# --------------------------------------------------------------------------------------------
# Fixtures


class Kit:
    """The probes above as one fixture object (see the module docstring for why not imports)."""

    decode_failure = staticmethod(decode_failure)
    scrape = staticmethod(scrape)
    metric_sum = staticmethod(metric_sum)
    wait_for = staticmethod(wait_for)
    vm_rss_bytes = staticmethod(vm_rss_bytes)
    write_figures = staticmethod(write_figures)
    read_figures = staticmethod(read_figures)
    check_ranking = staticmethod(check_ranking)
    open_stub = staticmethod(open_stub)


@pytest.fixture(scope="session")
def kit() -> Kit:
    return Kit()


@pytest.fixture(scope="session")
def workload() -> Workload:
    return Workload()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
