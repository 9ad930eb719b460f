"""``lychee-rerank rank`` on a folder a person might really have: one corrupt photo, GIF/BMP/TIFF,
a file that is not what its name says, a file of another type; and a server that is down or
wants a token. Bad files are named by their path (never ``documents[i]``), the run stops with
exit 1 unless ``--skip-bad``, and connection failures are one line without a traceback.

Everything runs the real CLI in a subprocess, in-process (``--model``) and against a real server
subprocess (``--target``) on the tiny checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

harness = pytest.importorskip("harness")

TOKEN = "rank-test-token-5d1"
CONVERTED = {"blue.gif", "green.bmp", "teal.tiff"}
GOOD = {"red.png", "photo.jpg", "notes.txt"} | CONVERTED


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _photos(root: Path, *, extra_bad: bool = False) -> Path:
    """Good images and text, GIF/BMP/TIFF, a truncated JPEG (a valid signature: only decoding
    finds it), a file of another type and a hidden file (ignored)."""
    folder = root / "photos"
    (folder / "2024").mkdir(parents=True)
    (folder / ".thumbs").mkdir()
    Image.new("RGB", (40, 30), (220, 20, 20)).save(folder / "red.png")
    (folder / "2024" / "photo.jpg").write_bytes(_jpeg((20, 200, 20)))
    frames = [Image.new("RGB", (36, 28), c) for c in ((20, 20, 220), (220, 220, 20))]
    frames[0].save(folder / "blue.gif", save_all=True, append_images=frames[1:], duration=40)
    Image.new("RGB", (30, 30), (20, 200, 20)).save(folder / "green.bmp")
    Image.new("RGB", (30, 26), (20, 200, 200)).save(folder / "2024" / "teal.tiff")
    (folder / "notes.txt").write_text("A red bicycle leaning on a wall.")
    whole = _jpeg((90, 90, 90), (96, 96))
    (folder / "2024" / "broken.jpg").write_bytes(whole[: len(whole) // 3])
    if extra_bad:
        Image.new("RGB", (60, 60), (5, 5, 5)).save(buf := io.BytesIO(), format="PNG")
        (folder / "cut.png").write_bytes(buf.getvalue()[:60])  # PNG signature, data cut short
        (folder / "fake.webp").write_text("not an image at all")  # found before any scoring
    (folder / "archive.zip").write_bytes(b"PK\x03\x04")
    (folder / ".thumbs" / "thumb0.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lychee_server.cli", "rank", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _names(rows: list[dict[str, Any]], folder: Path) -> set[str]:
    return {Path(str(r["path"])).name for r in rows}


def _check_stopped(proc: subprocess.CompletedProcess[str], folder: Path, bad: set[str]) -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""  # no partial ranking
    for name in bad:
        assert any(name in line for line in proc.stderr.splitlines()), (name, proc.stderr)
    assert "documents[" not in proc.stderr
    assert "--skip-bad" in proc.stderr
    assert "Traceback" not in proc.stderr


def _check_skipped(
    proc: subprocess.CompletedProcess[str], folder: Path, bad: set[str]
) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    assert _names(rows, folder) == GOOD  # the converted GIF/BMP/TIFF are ranked, not dropped
    assert [r["rank"] for r in rows] == list(range(1, len(GOOD) + 1))
    lines = proc.stderr.splitlines()
    for name in bad:
        assert any(line.startswith("lychee-rerank rank: skipped ") and name in line for line in lines), name
    assert any("archive.zip" in line and "unsupported file type" in line for line in lines)
    summary = lines[-1]
    assert summary.startswith(f"lychee-rerank rank: ranked {len(GOOD)} files, skipped {len(bad) + 1}: ")
    assert "thumb0" not in proc.stderr  # hidden folders are ignored
    assert "documents[" not in proc.stderr and "Traceback" not in proc.stderr
    return rows


def test_in_process_folder_with_a_corrupt_photo(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _photos(tmp_path)
    common = [str(folder), "--query", "a red square", "--model", str(tiny_checkpoint), "--device", "cpu"]

    stopped = _cli(*common, "--json", "--batch-size", "3")
    _check_stopped(stopped, folder, {"broken.jpg"})
    line = next(x for x in stopped.stderr.splitlines() if "broken.jpg:" in x)
    assert str(folder / "2024" / "broken.jpg") in line and "decode" in line  # the file and why

    skipped = _check_skipped(
        _cli(*common, "--json", "--batch-size", "3", "--skip-bad"), folder, {"broken.jpg"}
    )
    # Slicing and the re-sent slice do not change scores: one slice of everything agrees.
    whole = _check_skipped(
        _cli(*common, "--json", "--batch-size", "64", "--skip-bad"), folder, {"broken.jpg"}
    )
    assert {r["path"]: r["score"] for r in skipped} == pytest.approx({r["path"]: r["score"] for r in whole})


@pytest.fixture(scope="module")
def token_server(tiny_checkpoint: Path) -> Iterator[Any]:
    with harness.subprocess_server(tiny_checkpoint, env={"LYCHEE_API_KEYS": json.dumps([TOKEN])}) as srv:
        yield srv


def test_through_a_server_bad_files_are_named(token_server: Any, tmp_path: Path) -> None:
    folder = _photos(tmp_path, extra_bad=True)
    common = [str(folder), "--query", "a red square", "--target", token_server.address, "--api-key", TOKEN]

    # fake.webp is found before any scoring: the run stops at once, listing it.
    early = _cli(*common, "--json")
    _check_stopped(early, folder, {"fake.webp"})
    assert "broken.jpg" not in early.stderr

    # With --skip-bad, both corrupt images of one slice are found by the server and named.
    bad = {"broken.jpg", "cut.png", "fake.webp"}
    rows = _check_skipped(_cli(*common, "--json", "--batch-size", "64", "--skip-bad"), folder, bad)
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)


def test_wrong_or_missing_token_is_one_line(token_server: Any, tmp_path: Path) -> None:
    folder = _photos(tmp_path)
    for extra in (["--api-key", "wrong"], []):
        proc = _cli(str(folder / "notes.txt"), "--query", "q", "--target", token_server.address, *extra)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("lychee-rerank rank: [UNAUTHENTICATED] ")
        assert lines[0].count("UNAUTHENTICATED") == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_server_down_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text")
    target = f"127.0.0.1:{_closed_port()}"
    proc = _cli(str(tmp_path / "a.txt"), "--query", "q", "--target", target, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"server at '{target}' is unreachable" in lines[0]
    assert "Traceback" not in proc.stderr


def test_bad_query_image_and_tls_ca_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "q.jpg").write_text("not a jpeg")
    target = f"127.0.0.1:{_closed_port()}"
    cases = {
        "--query-image": (["--query-image", str(tmp_path / "q.jpg")], "not a JPEG, PNG or WebP"),
        "--tls-ca": (["--query", "q", "--tls-ca", str(tmp_path / "missing.pem")], "cannot read --tls-ca"),
        "--api-key": (["--query", "q", "--api-key", "clé"], "api_key must be ASCII"),
    }
    for flag, (args, expected) in cases.items():
        proc = _cli(str(tmp_path / "a.txt"), "--target", target, *args, timeout=60)
        assert proc.returncode == 1, (flag, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (flag, proc.stderr)


def test_help_documents_skip_bad() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lychee_server.cli", "rank", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = " ".join(proc.stdout.split())
    assert "--skip-bad" in text
    assert "exit status is 0" in text and "exit status 1" in text
    assert ".gif .bmp .tif .tiff" in text


def test_model_that_cannot_load_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "lychee_server.cli", "rank", str(tmp_path / "a.txt"), "--query", "q"),
            *("--model", str(tmp_path / "no-such-model"), "--device", "cpu"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lychee-rerank rank: could not load"), proc.stderr
