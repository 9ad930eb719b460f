"""Scale-out is the client's job: gRPC ``round_robin`` over two real server processes.

Both replicas must receive traffic, and the client must keep answering after one replica is
stopped (its subchannel goes away; UNAVAILABLE on the way is retried by the client).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from lychee.rerank.client import LycheeClient

harness = pytest.importorskip("harness")


def _pairs_scored(port: int | None) -> float:
    assert port is not None
    text = harness.fetch_metrics(f"http://127.0.0.1:{port}/metrics")
    return harness.metric_value(text, "lychee_pairs_scored_total") or 0.0


def test_round_robin_over_two_replicas(tiny_checkpoint: Path) -> None:
    docs = ["alpha passage", "beta passage", "gamma passage"]
    with (
        harness.subprocess_server(tiny_checkpoint) as one,
        harness.subprocess_server(tiny_checkpoint) as two,
    ):
        target = f"ipv4:127.0.0.1:{one.port},127.0.0.1:{two.port}"
        with LycheeClient(target, load_balancing="round_robin", timeout=60) as client:
            first = client.rerank("which passage?", docs)
            for _ in range(11):
                again = client.rerank("which passage?", docs)
                # Same model, same inputs: every replica gives the same ranking.
                assert [r.index for r in again.results] == [r.index for r in first.results]

            served_one, served_two = _pairs_scored(one.metrics_port), _pairs_scored(two.metrics_port)
            assert served_one > 0 and served_two > 0, (served_one, served_two)
            assert served_one + served_two == 12 * len(docs)

            # Stop replica one (graceful SIGTERM) and keep calling: everything lands on two.
            one.proc.send_signal(signal.SIGTERM)
            assert one.proc.wait(timeout=60) == 0
            before = _pairs_scored(two.metrics_port)
            for _ in range(6):
                result = client.rerank("which passage?", docs)
                assert len(result.results) == len(docs)
            assert _pairs_scored(two.metrics_port) == before + 6 * len(docs)
