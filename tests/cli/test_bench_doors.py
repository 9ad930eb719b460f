"""``lychee-rerank bench-doors``: a quick smoke run against the real server process it spawns.

Only the report's shape and the doors' agreement are checked (same order, bit-equal scores every
call); timings are the benchmark's business (docs/benchmarks.md), never a test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def test_bench_doors_smoke_run_reports_both_doors_agreeing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "doors.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lychee_server.cli",
            "bench-doors",
            "--model",
            str(tiny_checkpoint),
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--images",
            "3",
            "--image-size",
            "56",
            "--passages",
            "4",
            "--passage-tokens",
            "24",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())

    assert report["server"]["spawned"] is True
    assert report["server"]["max_batch_wait_ms"] == 1000
    assert {"cpu", "cpu_count", "python", "server_torch_threads"} <= set(report["machine"])
    assert report["commit"] and report["date"]
    assert [r["workload"] for r in report["rows"]] == ["images", "passages"]
    for row in report["rows"]:
        assert row["repeats"] == 2
        assert row["identical_rankings"] == 2, report["problems"]
        for door in ("grpc", "http"):
            stats = row[door]
            assert 0 < stats["min_s"] <= stats["p50_s"] <= stats["p90_s"]
            assert stats["mean_s"] > 0 and stats["encode_s"] >= 0 and stats["body_bytes"] > 0
        assert row["grpc"]["streamed"] is False  # these bodies are far below the streaming threshold
        assert row["http_over_grpc_p50"] == pytest.approx(row["http"]["p50_s"] / row["grpc"]["p50_s"])
    images, passages = report["rows"]
    assert images["documents"] == 3 and passages["documents"] == 4
    # base64 makes the HTTP body of the images ~4/3 of the protobuf one
    assert images["http"]["body_bytes"] > images["grpc"]["body_bytes"]

    table = proc.stdout
    assert "| workload | door |" in table
    assert table.count("| gRPC (LycheeClient, unary) |") == 2
    assert table.count("| HTTP (httpx, /v1/rerank) |") == 2


def test_bench_doors_needs_both_targets_of_a_running_server() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lychee_server.cli", "bench-doors", "--grpc-target", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--grpc-target and --http-url go together" in proc.stderr
