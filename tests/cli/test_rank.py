"""``lychee-rerank rank`` over a folder of images and text files, in-process and via a server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

harness = pytest.importorskip("harness")


def _corpus(root: Path) -> Path:
    folder = root / "corpus"
    (folder / "nested").mkdir(parents=True)
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (64 + 16 * i, 48), colour).save(folder / f"img{i}.png")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(folder / "nested" / "dark.jpg")
    (folder / "a.txt").write_text("Refunds are processed within five business days.")
    (folder / "nested" / "b.md").write_text("# Holidays\nThe office closes on public holidays.")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    return folder


def _rank(*args: str) -> list[dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-m", "lychee_server.cli", "rank", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "scores carry no meaning" in proc.stderr  # the tiny checkpoint declares random weights
    rows = json.loads(proc.stdout)
    assert isinstance(rows, list)
    return rows


def _check(rows: list[dict[str, object]], folder: Path) -> None:
    names = {Path(str(r["path"])).relative_to(folder).as_posix() for r in rows}
    assert names == {"img0.png", "img1.png", "img2.png", "nested/dark.jpg", "a.txt", "nested/b.md"}
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    scores = [float(str(r["score"])) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_rank_in_process_and_through_a_server_agree(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _corpus(tmp_path)
    query = ["--query", "a red square", "--batch-size", "4"]
    local = _rank(str(folder), *query, "--model", str(tiny_checkpoint), "--device", "cpu")
    _check(local, folder)

    with harness.subprocess_server(tiny_checkpoint) as srv:
        remote = _rank(
            str(folder / "*.png"),
            str(folder / "nested"),
            str(folder / "a.txt"),
            *query,
            "--target",
            srv.address,
        )
    _check(remote, folder)
    assert [r["path"] for r in remote] == [r["path"] for r in local]
    for mine, theirs in zip(local, remote, strict=True):
        assert float(str(theirs["score"])) == pytest.approx(float(str(mine["score"])), abs=1e-6)


def test_rank_reports_missing_inputs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lychee_server.cli",
            "rank",
            str(tmp_path / "nope"),
            "--query",
            "q",
            "--target",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "no such file" in proc.stderr


def test_rank_files_reads_each_slice_only_when_it_is_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lychee_server import rank

    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.txt"
        path.write_text(f"document {i}")
        paths.append(path)
    events: list[str] = []
    real_load = rank.load

    def load(path: Path) -> rank.FileDoc:
        events.append(f"load {path.stem}")
        return real_load(path)

    def score(docs: list[rank.FileDoc]) -> list[float]:
        events.append("score")
        return [float(d.path.stem) for d in docs]

    monkeypatch.setattr(rank, "load", load)
    ranked = rank.rank_files(paths, score, batch_size=2, progress=False).ranked
    assert events == ["load 0", "load 1", "score", "load 2", "load 3", "score", "load 4", "score"]
    assert [r.path.stem for r in ranked] == ["4", "3", "2", "1", "0"]
    assert [r.rank for r in ranked] == [1, 2, 3, 4, 5]
