"""The benchmark harness runs end to end, and random-weight loading (used by the GPU benchmark with
real 7B shapes) builds the model in the requested dtype without casting FP32 rotary buffers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lychee_server.engine.loading import load_model
from lychee_server.settings import Settings


def test_random_weights_keep_fp32_rotary_buffers(tiny_checkpoint: Path) -> None:
    settings = Settings(
        model=str(tiny_checkpoint), device="cpu", dtype="bfloat16", random_weights=True, warmup=False
    )
    loaded = load_model(settings)
    model = loaded.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.visual.rotary_pos_emb.inv_freq.dtype == torch.float32


def test_bench_runs_end_to_end(tmp_path: Path) -> None:
    from lychee_server.bench import main

    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    argv = ["--workloads", "b", "--repeats", "1", "--naive-limit", "1", "--json", str(out)]
    assert main([*argv, "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["workload"] == "b" and row["pairs"] == 100 and row["pairs_per_s"] > 0
    assert row["speedup"] > 0 and "| (b)" in md.read_text()
