"""``lychee-rerank check``: engine vs the naive reference on a loaded model, and random weights at a
built-in shape numbering special tokens as the tokenizer in use does (else images go unrecognised).
The naive loop is independent of the engine's recipe, ids and pixel bounds: a bug planted in each
makes check fail."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from lychee_server.cli import main
from lychee_server.engine import loading, qwen
from lychee_server.engine.qwen import QwenRerankEngine
from lychee_server.engine.recipe import build_messages

PAIRS = 3 * 6 + 1  # 3 queries x 6 documents, and the image above max_pixels for the text query


def _run_check(model: Path, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "check.json"
    code = main(["check", "--model", str(model), *extra, "--json", str(out)])
    return code, json.loads(out.read_text())


def test_check_agrees_on_the_tiny_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    assert main(["check", "--model", str(tiny_checkpoint), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["pairs"] == PAIRS
    assert {(r["query"], r["document"]) for r in report["rows"]} >= {
        (q, d)
        for q in ("text", "image", "text+image")
        for d in ("text", "image", "text+image", "small image")
    } | {("text", "large image")}
    assert report["max_abs_diff_p"] <= 1e-5


def test_check_fails_when_the_engine_departs_from_the_recipe(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rotary positions dropped in the engine only: the naive loop (transformers' forward) keeps them.
    from lychee_server.engine.fused import FusedOps

    monkeypatch.setattr(FusedOps, "rotary", lambda self, x, cos, sin: x)
    out = tmp_path / "check.json"
    assert main(["check", "--model", str(tiny_checkpoint), "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["max_abs_diff_p"] > 1e-5


def test_check_catches_a_template_bug_in_the_engine(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def typo(*args: Any) -> Any:
        msgs = build_messages(*args)
        msgs[0]["content"][0]["text"] = msgs[0]["content"][0]["text"].replace("Judge", "Judges")
        return msgs

    monkeypatch.setattr(qwen, "build_messages", typo)
    code, report = _run_check(tiny_checkpoint, tmp_path)
    assert code == 1 and report["ok"] is False and report["max_abs_diff_p"] > 1e-5


def test_check_catches_swapped_yes_no_ids(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init = QwenRerankEngine.__init__

    def swapped(self: QwenRerankEngine, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.yes_id, self.no_id = self.no_id, self.yes_id
        self.w_no_yes = self.w_no_yes.flip(0)

    monkeypatch.setattr(QwenRerankEngine, "__init__", swapped)
    code, report = _run_check(tiny_checkpoint, tmp_path)
    assert code == 1 and report["ok"] is False
    # Swapping the rows negates every gap: p_engine = 1 - p_naive on each pair.
    assert all(math.isclose(r["engine_p"], 1 - r["naive_p"], abs_tol=1e-5) for r in report["rows"])


def test_check_catches_pixel_bounds_that_never_reach_the_processor(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose preprocessor config has other bounds than the recipe (max_pixels 12845056 as
    in Qwen2.5-VL's own; min_pixels 16*28*28, where Qwen's 56*56 equals the recipe's): the loader must
    apply the configured (recipe) bounds over them."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    cfg_path = ckpt / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    lo, hi = 16 * 28 * 28, 16384 * 28 * 28
    cfg.update(min_pixels=lo, max_pixels=hi, size={"shortest_edge": lo, "longest_edge": hi})
    cfg_path.write_text(json.dumps(cfg))
    code, report = _run_check(ckpt, tmp_path)
    assert code == 0 and report["ok"] is True  # the loader applies the settings' (recipe) bounds
    monkeypatch.setattr(loading, "_set_pixel_bounds", lambda processor, lo, hi: None)
    code, report = _run_check(ckpt, tmp_path)
    assert code == 1 and report["ok"] is False
    bad = {(r["query"], r["document"]) for r in report["rows"] if r["abs_diff_p"] > 1e-5}
    assert ("text", "large image") in bad and ("text", "small image") in bad


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
    # A threshold above any tau: the exit code must follow it (the engine itself is exact: ok on the
    # FP32 rows). The reported taus must be those of the reported logits (recomputed by hand here).
    assert main([*argv, "--ranking-docs", "8", "--min-tau", "1.01", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    ranking = report["bf16_ranking"]
    assert report["dtype"] == "float32" and ranking["documents_per_query"] == 8
    assert ranking["ok"] is False and report["max_abs_diff_p"] <= 1e-5
    assert set(ranking["kendall_tau_per_query"]) == {"text", "image", "text+image"}
    for q, tau in ranking["kendall_tau_per_query"].items():
        a, b = ranking["fp32_logits"][q], ranking["bf16_logits"][q]
        assert len(a) == len(b) == 8
        signs = [(a[i] - a[j]) * (b[i] - b[j]) for i in range(8) for j in range(i + 1, 8)]
        conc, disc = sum(s > 0 for s in signs), sum(s < 0 for s in signs)
        assert tau == pytest.approx((conc - disc) / (conc + disc))
    flat = [
        abs(x - y)
        for q in ranking["fp32_logits"]
        for x, y in zip(ranking["fp32_logits"][q], ranking["bf16_logits"][q], strict=True)
    ]
    assert ranking["max_abs_diff_logit"] == pytest.approx(max(flat)) and 0.0 < max(flat) < 1.0
    # Below the lowest tau the same run passes.
    lowest = min(ranking["kendall_tau_per_query"].values())
    assert main([*argv, "--ranking-docs", "8", "--min-tau", str(lowest - 1e-9), "--json", str(out)]) == 0
