"""``lychee-rerank rank``: rank image and text files against a query from the command line.

Documents are files, folders (searched recursively) or globs; images (.jpg .jpeg .png .webp)
become image documents, text files (.txt .md .rst .csv .json .html) text documents. Scoring goes
through a running server (``--target``) with the Python client, or in-process (``--model``)
through the very scheduler and engine the server uses. Work is sent in slices of
``--batch-size`` documents so a progress bar can follow long jobs; every pair is scored
independently, so slicing does not change any score.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".csv", ".json", ".html", ".htm", ".xml", ".log"}


@dataclass(frozen=True)
class FileDoc:
    path: Path
    text: str | None
    image: bytes | None
    media_type: str | None = None  # "image/png" ..., from the file suffix


@dataclass(frozen=True)
class Ranked:
    rank: int
    score: float
    path: Path


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="files, folders or globs of images and text files")
    parser.add_argument("--query", "-q", help="query text")
    parser.add_argument("--query-image", type=Path, help="query image file")
    parser.add_argument("--instruction", help="task instruction (default: the model's web-search one)")
    parser.add_argument("--top-n", type=int, help="show only the best N")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch-size", type=int, default=16, help="documents per request")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="a running server, host:port")
    where.add_argument("--model", help="score in-process with this checkpoint (dir or hub id)")
    parser.add_argument("--api-key", help="bearer token for --target (or LYCHEE_API_KEY)")
    parser.add_argument("--tls-ca", type=Path, help="PEM root certificate: use TLS to --target")
    parser.add_argument("--device", default="auto", help="in-process device (auto, cpu, cuda)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


def discover(inputs: Iterable[str]) -> list[Path]:
    """Expand files, folders and globs into a sorted, de-duplicated list of usable files."""
    found: dict[Path, None] = {}
    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for m in matches:
            if m.is_dir():
                for f in sorted(m.rglob("*")):
                    if f.is_file() and _usable(f):
                        found[f] = None
            elif m.is_file() and _usable(m):
                found[m] = None
            elif not m.exists():
                raise FileNotFoundError(f"no such file, folder or glob match: {item}")
    return list(found)


def _usable(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or suffix in TEXT_SUFFIXES


def load(path: Path) -> FileDoc:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return FileDoc(path, None, path.read_bytes(), IMAGE_SUFFIXES[path.suffix.lower()])
    return FileDoc(path, path.read_text(encoding="utf-8", errors="replace"), None)


ScoreFn = Callable[[Sequence[FileDoc]], list[float]]


def _scores_in_input_order(results: Iterable[Any], n: int) -> list[float]:
    """Scores of ranked results (``.index``, ``.score``) back in the order the documents were sent."""
    out = [0.0] * n
    for r in results:
        out[r.index] = r.score
    return out


def _client_scorer(ns: argparse.Namespace) -> tuple[ScoreFn, Callable[[], None], bool]:
    import os

    from lychee.rerank.client import Doc, LycheeClient, Query

    client = LycheeClient(
        ns.target,
        api_key=ns.api_key or os.environ.get("LYCHEE_API_KEY"),
        root_certificates=ns.tls_ca.read_bytes() if ns.tls_ca else None,
        timeout=ns.timeout,
    )
    query = Query(text=ns.query, image=ns.query_image.read_bytes() if ns.query_image else None)

    def score(docs: Sequence[FileDoc]) -> list[float]:
        result = client.rerank(
            query,
            [Doc(text=d.text, image=d.image) for d in docs],
            instruction=ns.instruction,
        )
        return _scores_in_input_order(result.results, len(docs))

    return score, client.close, client.server_info().random_weights


def _inprocess_scorer(ns: argparse.Namespace) -> tuple[ScoreFn, Callable[[], None], bool]:
    from lychee_server.domain import DEFAULT_INSTRUCTION, Content, Document, ImageInput, MediaType, RerankJob
    from lychee_server.engine import load_engine
    from lychee_server.scheduler import Scheduler
    from lychee_server.settings import Settings

    settings = Settings(model=ns.model, device=ns.device, metrics_port=None)
    engine = load_engine(settings)
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(engine, settings)
    loop.run_until_complete(scheduler.start())

    def content(text: str | None, image: bytes | None, media_type: str | None) -> Content:
        img = ImageInput(image, MediaType(media_type)) if image is not None and media_type else None
        return Content(text=text, image=img)

    qi: Path | None = ns.query_image
    query = content(
        ns.query, qi.read_bytes() if qi else None, IMAGE_SUFFIXES.get(qi.suffix.lower()) if qi else None
    )

    def score(docs: Sequence[FileDoc]) -> list[float]:
        job = RerankJob(
            instruction=ns.instruction or DEFAULT_INSTRUCTION,
            query=query,
            documents=tuple(Document(content(d.text, d.image, d.media_type)) for d in docs),
        )
        result = loop.run_until_complete(scheduler.rerank(job))
        return _scores_in_input_order(result.results, len(docs))

    def close() -> None:
        loop.run_until_complete(scheduler.stop())
        loop.close()

    return score, close, engine.info.random_weights


def rank_files(paths: Sequence[Path], score: ScoreFn, batch_size: int, progress: bool) -> list[Ranked]:
    """Score ``paths`` in slices of ``batch_size``; each slice's files are read only for its call,
    so a folder of thousands of photos never sits in memory at once."""
    from rich.progress import Progress

    scores: list[float] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("ranking", total=len(paths))
        for start in range(0, len(paths), batch_size):
            chunk = [load(p) for p in paths[start : start + batch_size]]
            scores.extend(score(chunk))
            bar.advance(task, len(chunk))
    order = sorted(range(len(paths)), key=lambda i: (-scores[i], i))
    return [Ranked(rank + 1, scores[i], paths[i]) for rank, i in enumerate(order)]


RANDOM_NOTE = "the model has random weights (a test checkpoint): these scores carry no meaning"


def render(ranked: Sequence[Ranked], as_json: bool, random_weights: bool = False) -> None:
    if random_weights:
        print(f"lychee-rerank rank: note: {RANDOM_NOTE}", file=sys.stderr)
    if as_json:
        rows = [{"rank": r.rank, "score": r.score, "path": str(r.path)} for r in ranked]
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lychee-rerank")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("name")
    for r in ranked:
        style = "bold green" if r.rank == 1 else None
        table.add_row(str(r.rank), f"{r.score:.4f}", str(r.path), style=style)
    Console().print(table)


def run_rank(ns: argparse.Namespace) -> int:
    if ns.query is None and ns.query_image is None:
        print("lychee-rerank rank: give --query and/or --query-image", file=sys.stderr)
        return 2
    try:
        paths = discover(ns.inputs)
    except FileNotFoundError as err:
        print(f"lychee-rerank rank: {err}", file=sys.stderr)
        return 2
    if not paths:
        print("lychee-rerank rank: no image or text files found", file=sys.stderr)
        return 2
    score, close, random_weights = _client_scorer(ns) if ns.target else _inprocess_scorer(ns)
    try:
        ranked = rank_files(paths, score, max(1, ns.batch_size), progress=not ns.json and sys.stderr.isatty())
    finally:
        close()
    if ns.top_n is not None:
        ranked = ranked[: ns.top_n]
    render(ranked, ns.json, random_weights)
    return 0
