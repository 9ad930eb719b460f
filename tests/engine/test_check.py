"""``lychee-rerank check``: engine vs the naive reference on a loaded model, and random weights at a
built-in shape numbering special tokens as the tokenizer in use does (else images go unrecognised)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lychee_server.cli import main
from lychee_server.engine import loading
from lychee_server.engine.qwen import QwenRerankEngine


def test_check_agrees_on_the_tiny_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    assert main(["check", "--model", str(tiny_checkpoint), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["pairs"] == 15
    assert {(r["query"], r["document"]) for r in report["rows"]} >= {
        (q, d) for q in ("text", "image", "text+image") for d in ("text", "image", "text+image")
    }
    assert report["max_abs_diff_p"] <= 1e-5


def test_check_fails_when_the_engine_departs_from_the_recipe(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rotary positions dropped in the engine only: the naive loop (transformers' forward) keeps them.
    monkeypatch.setattr(QwenRerankEngine, "_rotate", staticmethod(lambda x, cos, sin: x))
    out = tmp_path / "check.json"
    assert main(["check", "--model", str(tiny_checkpoint), "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["max_abs_diff_p"] > 1e-5


def test_builtin_shape_takes_special_token_ids_from_the_tokenizer(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shape carries the real checkpoint's ids (<|image_pad|> = 151655); with the tiny tokenizer
    the model must look for that tokenizer's ids, or image documents fail to score."""
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    real_ids = {"image_token_id": 151655, "video_token_id": 151656}
    cfg.update(real_ids, vocab_size=151936)
    cfg["text_config"] = {**cfg.get("text_config", {}), "vocab_size": 151936}
    monkeypatch.setitem(loading.BUILTIN_SHAPES, "qwen2.5-vl-3b", cfg)
    out = tmp_path / "check.json"
    argv = ["check", "--model", str(tiny_checkpoint), "--random-weights", "--shape", "qwen2.5-vl-3b"]
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["model"] == "random:qwen2.5-vl-3b"


def test_check_bf16_ranking_reports_tau_per_query(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    argv = ["check", "--model", str(tiny_checkpoint), "--dtype", "float32", "--bf16-ranking"]
    # Threshold off: the tiny random model's near-ties make its tau a coin toss (test_bf16_ranking.py).
    assert main([*argv, "--ranking-docs", "8", "--min-tau", "-1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    ranking = report["bf16_ranking"]
    assert report["dtype"] == "float32" and ranking["documents_per_query"] == 8
    assert set(ranking["kendall_tau_per_query"]) == {"text", "image", "text+image"}
    assert all(-1.0 <= t <= 1.0 for t in ranking["kendall_tau_per_query"].values())
    assert 0.0 < ranking["max_abs_diff_logit"] < 1.0  # BF16 moved the scores, but not by much
