"""Prometheus metrics for one server instance (prometheus-client only: no grpc, no torch).

Every :class:`Metrics` owns its own ``CollectorRegistry`` instead of the process-global default
one, so several servers (or schedulers) can live in one process — the test suite starts many —
without "Duplicated timeseries" errors and without one server's numbers leaking into another's.

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` units). The useful
derived views are:

* pairs/s:             ``rate(lychee_pairs_scored_total[1m])``
* error ratio:         ``sum(rate(lychee_requests_total{code!="OK"}[5m]))``
                       ``/ sum(rate(lychee_requests_total[5m]))``
* batch fill:          ``lychee_batch_pairs`` / ``lychee_batch_tokens`` histograms against the configured
                       ``max_batch_pairs`` / ``batch_token_budget``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics", "MetricsHttpServer"]

# Request latencies span sub-millisecond rejections to multi-second 1000-document rankings.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Per-item CPU preparation (tokenize, decode an image) and per-batch device time.
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class Metrics:
    """All series of one server; the scheduler and the edge each update their own part."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # --- edge ---------------------------------------------------------------------
        self.requests = Counter(
            "lychee_requests",
            "Calls finished, by method, gRPC status code name and transport (grpc / http).",
            ["method", "code", "transport"],
            registry=r,
        )
        self.request_latency = Histogram(
            "lychee_request_duration_seconds",
            "Wall time of a call from receipt to status, by method, status code name and transport.",
            ["method", "code", "transport"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # --- scheduler ----------------------------------------------------------------
        self.queue_depth = Gauge("lychee_queue_depth", "Prepared pairs waiting for the device.", registry=r)
        self.gc_frozen_objects = Gauge(
            "lychee_gc_frozen_objects",
            "Objects alive after start-up (model, tokenizer, libraries) that the garbage collector "
            "no longer walks (gc.freeze).",
            registry=r,
        )
        self.preparing_pairs = Gauge(
            "lychee_preparing_pairs", "Admitted pairs not yet prepared (tokenize / image decode).", registry=r
        )
        self.inflight_pairs = Gauge(
            "lychee_inflight_pairs",
            "Admitted pairs not yet retired (the admission-control quantity).",
            registry=r,
        )
        self.inflight_requests = Gauge(
            "lychee_inflight_requests", "Admitted requests not yet retired.", registry=r
        )
        self.rejected = Counter(
            "lychee_rejected_requests",
            "Requests refused by the scheduler, by reason.",
            ["reason"],
            registry=r,
        )
        self.batch_pairs = Histogram(
            "lychee_batch_pairs", "Pairs per device batch.", buckets=_PAIR_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "lychee_batch_tokens",
            "Padded token estimate per device batch (what batch_token_budget limits).",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.pairs_scored = Counter(
            "lychee_pairs_scored", "Pairs scored on the device (rate() gives pairs/s).", registry=r
        )
        self.pairs_dropped = Counter(
            "lychee_pairs_dropped",
            "Prepared pairs dropped before the device because their request was gone (cancelled, "
            "past its deadline, failed).",
            registry=r,
        )
        self.oom_splits = Counter(
            "lychee_oom_splits", "Batches split in halves after a device out-of-memory error.", registry=r
        )
        self.preemptions = Counter(
            "lychee_preemptions",
            "Light batches run at a pause of a heavy (image, long-passage) batch on the device.",
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "lychee_preprocess_seconds",
            "CPU preparation time per item (stage=query: prefix + query image; stage=pair: one document).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "lychee_inference_seconds", "Device time per batch.", buckets=_STAGE_BUCKETS, registry=r
        )
        self.device_memory = Gauge(
            "lychee_device_memory_bytes",
            "Device memory allocated by the engine (0 on CPU or when unknown).",
            registry=r,
        )

    def set_device_memory_source(self, source: Callable[[], float]) -> None:
        """Read device memory at scrape time from ``source`` (provided by the engine side).

        The callable is owned by whoever knows the device (app.py asks the engine); keeping it a
        plain callable keeps torch out of this module and out of the scheduler.
        """

        def _read() -> float:
            try:
                return float(source())
            except Exception:  # a scrape must never fail because the device query did
                return 0.0

        self.device_memory.set_function(_read)


class MetricsHttpServer:
    """The ``/metrics`` HTTP endpoint of one registry, on a daemon thread (port 0 = pick one)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.host = host
        self.port: int = int(self._httpd.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
