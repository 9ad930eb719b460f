"""``--max-connection-age-s``: the server ends long-lived connections, so a round-robin client
over DNS re-resolves and reaches replicas that started after it connected (issue 13).

This is what a headless Kubernetes Service gives: one name, one A record per ready pod, one
port. Here the pods are three ``lychee-rerank serve`` processes on 127.0.0.1, 127.0.0.2 and
127.0.0.3 (all loopback on Linux) on the same port, and the DNS server is a tiny one in this
test that answers A queries for ``replicas.test`` from a list the test changes; the client names
it in its target (``dns://127.0.0.1:PORT/replicas.test:PORT``, gRPC's c-ares resolver).
Without a maximum connection age the client would keep its two connections forever and the
third replica would get nothing (gRPC re-resolves only when a connection goes away).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest

from lychee.rerank.client import LycheeClient

harness = pytest.importorskip("harness")

AGE_S = 1.0
GRACE_S = 2.0
NAME = "replicas.test"


class TinyDns:
    """A UDP DNS server on 127.0.0.1 answering A queries from ``records`` (name -> addresses)."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.lock = threading.Lock()
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def set(self, name: str, addresses: list[str]) -> None:
        with self.lock:
            self.records[name] = list(addresses)

    def _loop(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(512)
            except OSError:
                return  # closed
            try:
                self.sock.sendto(self._answer(data), peer)
            except (OSError, IndexError, struct.error):
                continue

    def _answer(self, data: bytes) -> bytes:
        (tid,) = struct.unpack("!H", data[:2])
        i, labels = 12, []
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode("ascii"))
            i += 1 + data[i]
        qtype, _ = struct.unpack("!HH", data[i + 1 : i + 5])
        question = data[12 : i + 5]
        name = ".".join(labels).lower()
        with self.lock:
            self.queries += 1
            known = name in self.records
            addresses = self.records.get(name, []) if qtype == 1 else []  # A only; AAAA: none
        flags = 0x8180 | (0 if known else 3)  # response, recursion available; NXDOMAIN if unknown
        header = struct.pack("!HHHHHH", tid, flags, 1, len(addresses), 0, 0)
        answers = b"".join(
            b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(a) for a in addresses
        )
        return header + question + answers

    def close(self) -> None:
        self.sock.close()


def _pairs_scored(server: harness.SubprocessServer) -> float:
    assert server.metrics_port is not None
    text = harness.fetch_metrics(f"http://127.0.0.1:{server.metrics_port}/metrics")
    return harness.metric_value(text, "lychee_pairs_scored_total") or 0.0


def _replica_env(host: str, port: int) -> dict[str, str]:
    return {
        "LYCHEE_HOST": host,
        "LYCHEE_PORT": str(port),
        "LYCHEE_METRICS_HOST": "127.0.0.1",
        "LYCHEE_MAX_CONNECTION_AGE_S": str(AGE_S),
        "LYCHEE_MAX_CONNECTION_AGE_GRACE_S": str(GRACE_S),
        "LYCHEE_WARMUP": "false",
    }


def _connection_closed_after_age(address: str) -> float:
    """Seconds from READY until the server ended an idle connection (READY -> IDLE)."""
    states: list[tuple[float, grpc.ChannelConnectivity]] = []
    changed = threading.Condition()

    def record(state: grpc.ChannelConnectivity) -> None:
        with changed:
            states.append((time.monotonic(), state))
            changed.notify_all()

    channel = grpc.insecure_channel(address)
    try:
        channel.subscribe(record, try_to_connect=True)
        grpc.channel_ready_future(channel).result(timeout=30)
        with changed:
            assert changed.wait_for(
                lambda: any(s is grpc.ChannelConnectivity.READY for _, s in states), timeout=10
            )
            ready_at = next(t for t, s in states if s is grpc.ChannelConnectivity.READY)
            limit = AGE_S * 1.1 + GRACE_S + 10  # grpc jitters the age by +-10%
            assert changed.wait_for(
                lambda: any(t > ready_at and s is not grpc.ChannelConnectivity.READY for t, s in states),
                timeout=limit,
            ), f"the connection was not closed within {limit} s: {states}"
            closed_at = next(t for t, s in states if t > ready_at and s is not grpc.ChannelConnectivity.READY)
        channel.unsubscribe(record)
        return closed_at - ready_at
    finally:
        channel.close()


def test_round_robin_client_reaches_a_replica_started_after_it(tiny_checkpoint: Path) -> None:
    docs = ["alpha passage", "beta passage", "gamma passage"]
    dns = TinyDns({})
    try:
        with harness.subprocess_server(tiny_checkpoint, env=_replica_env("127.0.0.1", 0)) as one:
            port = one.port
            with harness.subprocess_server(tiny_checkpoint, env=_replica_env("127.0.0.2", port)) as two:
                # The server ends a connection after max_connection_age (an idle one within the age).
                closed_after = _connection_closed_after_age(f"127.0.0.1:{port}")
                assert closed_after < AGE_S * 1.1 + 5, closed_after

                dns.set(NAME, ["127.0.0.1", "127.0.0.2"])
                target = f"dns://127.0.0.1:{dns.port}/{NAME}:{port}"
                with LycheeClient(
                    target,
                    load_balancing="round_robin",
                    timeout=60,
                    # re-resolve as soon as a connection goes (gRPC waits 30 s by default)
                    channel_options=[("grpc.dns_min_time_between_resolutions_ms", 200)],
                ) as client:
                    for _ in range(12):
                        assert len(client.rerank("which passage?", docs).results) == len(docs)
                    assert _pairs_scored(one) > 0 and _pairs_scored(two) > 0

                    # A third replica joins after the client connected; DNS now lists it.
                    with harness.subprocess_server(
                        tiny_checkpoint, env=_replica_env("127.0.0.3", port)
                    ) as three:
                        dns.set(NAME, ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
                        deadline = time.monotonic() + 60
                        calls = 0
                        while _pairs_scored(three) == 0:
                            assert time.monotonic() < deadline, (
                                f"the new replica got no call in 60 s ({calls} calls, {dns.queries} DNS)"
                            )
                            assert len(client.rerank("which passage?", docs).results) == len(docs)
                            calls += 1
                            time.sleep(0.05)
                        # every replica keeps answering through the reconnects
                        before = [_pairs_scored(s) for s in (one, two, three)]
                        for _ in range(30):
                            assert len(client.rerank("which passage?", docs).results) == len(docs)
                        after = [_pairs_scored(s) for s in (one, two, three)]
                        assert sum(after) - sum(before) == 30 * len(docs)
                        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    finally:
        dns.close()
