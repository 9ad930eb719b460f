"""``rank --html`` (the self-contained report, without a browser: see tests/playground for it in
Chromium), how ``rank`` splits files into requests, and its progress bar following the progress
stream of the server (``RerankWithProgress``) and of the in-process scheduler."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

harness = pytest.importorskip("harness")


def _uris(text: str) -> list[str]:
    return re.findall(r'src="(data:image/[a-z]+;base64,[A-Za-z0-9+/=]+)"', text)


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    from lychee_server.report_html import THUMBNAIL_SIZE, ReportDocument, render_report

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (2000, 1000), (200, 20, 20)).save(photo)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (64, 64), (0, 0, 255, 100)).save(clear)
    broken = tmp_path / "gone.png"
    broken.write_bytes(b"not an image")
    note = tmp_path / "<b>note&.md"
    note.write_text("# Title\n\n<script>alert('x')</script>\n" + "line\n" * 50)
    docs = [
        ReportDocument(1, 0.9, photo, True),
        ReportDocument(2, 0.5, note, False),
        ReportDocument(3, 0.25, clear, True),
        ReportDocument(4, 0.1, broken, True),
    ]
    text = render_report(
        docs,
        query="a red <square>",
        instruction="Find it",
        source="server 127.0.0.1:1",
        failed=[(tmp_path / "bad.jpg", "image could not be decoded")],
        unsupported=[tmp_path / "x.pdf"],
        random_weights=True,
        total_ranked=10,
    )
    uris = _uris(text)
    assert len(uris) == 2  # the unreadable image gets no thumbnail, and says so
    assert "(no preview: the image cannot be read)" in text
    thumb = Image.open(io.BytesIO(base64.b64decode(uris[0].split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) == THUMBNAIL_SIZE and thumb.size[0] == 2 * thumb.size[1]
    assert Image.open(io.BytesIO(base64.b64decode(uris[1].split(",", 1)[1]))).format == "PNG"  # alpha kept
    # Names and text are escaped; the only script is the report's own, allowed by its hash.
    assert "<script>alert" not in text and "&lt;script&gt;alert" in text
    assert "&lt;b&gt;note&amp;.md" in text and "a red &lt;square&gt;" in text
    scripts = re.findall(r"<script>(.*?)</script>", text, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in text
    assert "default-src 'none'; img-src data:" in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    # Short names (relative to the common folder), counts, reasons, the random-weights warning.
    assert 'data-name="photo.jpg"' in text and 'data-name="&lt;b&gt;note&amp;.md"' in text
    assert "10 ranked (the best 4 shown), 2 not ranked" in text
    assert "bad.jpg</strong>: image could not be decoded" in text
    assert "x.pdf</strong>: unsupported file type .pdf" in text
    assert "these scores carry no meaning" in text
    assert ".card-open" in text  # the playground's stylesheet, inlined


def test_slices_by_count_and_bytes(tmp_path: Path) -> None:
    from lychee_server.rank import SliceLimits, slices

    sizes = [10, 10, 10, 50, 10, 200, 10]
    paths = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"{i}.txt"
        path.write_bytes(b"x" * n)
        paths.append(path)
    names = lambda cut: [[p.stem for p in s] for s in cut]  # noqa: E731
    assert names(slices(paths, None, None)) == [[str(i) for i in range(7)]]  # one request
    assert names(slices(paths, 3, None)) == [["0", "1", "2"], ["3", "4", "5"], ["6"]]
    limits = SliceLimits(max_documents=4, max_bytes=60)
    assert names(slices(paths, None, limits)) == [["0", "1", "2"], ["3", "4"], ["5"], ["6"]]
    assert names(slices(paths, 2, limits)) == [["0", "1"], ["2", "3"], ["4"], ["5"], ["6"]]


def test_rank_files_follows_progress_in_one_request(tmp_path: Path) -> None:
    from lychee_server import rank

    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.txt"
        path.write_text(f"document {i}")
        paths.append(path)
    calls: list[int] = []

    def score(docs: list[rank.FileDoc], on_progress: Any = None) -> list[float]:
        calls.append(len(docs))
        assert on_progress is not None
        for scored in (0, 2, 1, 4, 6):  # a stale report never moves the bar back
            on_progress("scoring", scored)
        on_progress("done", len(docs))
        return [float(d.path.stem) for d in docs]

    outcome = rank.rank_files(paths, score, None, progress=True, limits=rank.SliceLimits(100, 1 << 20))
    assert calls == [6]  # all files in one request, not slices
    assert [r.path.stem for r in outcome.ranked] == ["5", "4", "3", "2", "1", "0"]


def _ns(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {
        "query": "a red square",
        "query_image": None,
        "instruction": None,
        "api_key": None,
        "tls_ca": None,
        "timeout": 60.0,
        "device": "cpu",
    }
    base.update(kw)
    return argparse.Namespace(**base)


def _docs(root: Path, n: int) -> list[Any]:
    from lychee_server import rank

    out = []
    for i in range(n):
        path = root / f"img{i}.png"
        Image.new("RGB", (40 + i, 30), (20 * i, 100, 200 - 10 * i)).save(path)
        out.append(rank.load(path))
    return out


def _check_progress(seen: list[tuple[str, int]], n: int) -> None:
    counts = [c for _, c in seen]
    assert counts == sorted(counts), seen
    assert seen[-1] == ("done", n), seen
    assert any(0 < c < n for c in counts), seen  # the bar moved in steps, not just at the end
    phases = [p for p, _ in seen]
    order = ["queued", "preparing", "scoring", "done"]
    assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases), phases


@pytest.fixture(scope="module")
def stepped_server(tiny_checkpoint: Path) -> Iterator[Any]:
    env = {"LYCHEE_MAX_BATCH_PAIRS": "2", "LYCHEE_MAX_BATCH_WAIT_MS": "1000", "LYCHEE_WARMUP": "false"}
    with harness.subprocess_server(tiny_checkpoint, env=env) as srv:
        yield srv


def test_client_scorer_follows_rerank_with_progress(stepped_server: Any, tmp_path: Path) -> None:
    from lychee_server import rank

    score, close, random_weights, limits = rank._client_scorer(_ns(target=stepped_server.address))
    try:
        assert random_weights
        assert limits.max_documents == 1000 and limits.max_bytes > 1 << 20
        docs = _docs(tmp_path, 8)
        seen: list[tuple[str, int]] = []
        scores = score(docs, on_progress=lambda phase, n: seen.append((phase, n)))
        assert scores == pytest.approx(score(docs))  # the same scores as without progress
    finally:
        close()
    _check_progress(seen, 8)


def test_in_process_scorer_follows_the_scheduler(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    from lychee_server import rank

    monkeypatch.setenv("LYCHEE_MAX_BATCH_PAIRS", "2")
    monkeypatch.setenv("LYCHEE_WARMUP", "false")
    score, close, _, limits = rank._inprocess_scorer(_ns(model=str(tiny_checkpoint)))
    try:
        assert limits.max_documents >= 100
        seen: list[tuple[str, int]] = []
        score(_docs(tmp_path, 6), on_progress=lambda phase, n: seen.append((phase, n)))
    finally:
        close()
    _check_progress(seen, 6)
