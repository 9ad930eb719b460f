"""``lychee-rerank rank``: rank image and text files against a query from the command line.

Documents are files, folders (searched recursively, hidden entries ignored) or globs; images
(.jpg .jpeg .png .webp, and .gif .bmp .tif .tiff converted to PNG, the first frame of an
animation) become image documents, text files (.txt .md .rst .csv .json .html ...) text
documents, and anything else is skipped and listed. Scoring goes through a running server
(``--target``) with the Python client, or in-process (``--model``) through the very scheduler
and engine the server uses. The progress bar follows the server's progress stream
(``RerankWithProgress``; in-process, the scheduler's progress reports) as pairs are scored, so
the files go in as few requests as the server takes: each request carries up to its
``max_documents`` files and about half its message limit in bytes (under the size at which the
client streams a request, which reports no progress), or ``--batch-size`` files when given. Files
are read per request, so a folder of thousands of photos never sits in memory at once; every
pair is scored independently, so how the files are split does not change any score.

A file that cannot be ranked (unreadable, empty, corrupt, not the image its name says) is
reported under its own name, never as ``documents[i]``: the server's field paths are mapped
back to the files of the slice that was sent. By default the first bad files stop the run
(listed, exit 1, nothing ranked: a partial ranking is not silently passed on); with
``--skip-bad`` they are left out, listed, and the rest is ranked (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".csv", ".json", ".html", ".htm", ".xml", ".log"})
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_LISTED = 10
"""At most this many file names in one summary line."""

PROG = "lychee-rerank rank"
SKIP_BAD_HELP = (
    "skip files that cannot be ranked (unreadable, empty, corrupt or not an image) instead of "
    "stopping: the rest is ranked, every skipped file is listed on stderr with its reason, and "
    "the exit status is 0. Without it, bad files are listed and the run stops with exit status 1 "
    "before printing a ranking. Files of other types are always skipped and listed."
)


class BadFile(Exception):
    """A file that cannot be ranked; ``reason`` says why, in words about the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DocumentErrors(Exception):
    """A slice was refused because of some of its documents: index in the slice -> reason."""

    def __init__(self, errors: Mapping[int, str]) -> None:
        super().__init__(f"{len(errors)} document(s) refused")
        self.errors = dict(errors)


class FatalError(Exception):
    """A failure that is about no single file (server down, bad token, bad query ...)."""


@dataclass(frozen=True)
class FileDoc:
    path: Path
    text: str | None
    image: bytes | None
    media_type: str | None = None  # sniffed from the bytes ("image/png" for converted images)


@dataclass(frozen=True)
class Ranked:
    rank: int
    score: float
    path: Path


@dataclass(frozen=True)
class Found:
    """What :func:`discover` found: files to rank, and files skipped for their type."""

    paths: list[Path]
    unsupported: list[Path] = field(default_factory=list)


@dataclass
class Outcome:
    """A run of :func:`rank_files`: the ranking of what could be scored, and the bad files."""

    ranked: list[Ranked]
    failed: list[BadFile]
    stopped: bool  # bad files ended the run before every file was tried


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="files, folders or globs of images and text files")
    parser.add_argument("--query", "-q", help="query text")
    parser.add_argument("--query-image", type=Path, help="query image file")
    parser.add_argument("--instruction", help="task instruction (default: the model's web-search one)")
    parser.add_argument("--top-n", type=int, help="show only the best N")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--html",
        type=Path,
        metavar="REPORT",
        help="also write the ranking as one self-contained HTML file (a grid of thumbnails, text "
        "snippets and scores; opens offline)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="at most this many documents per request (default: as many as the server takes in one "
        "request: its max_documents, and about half its message limit in bytes)",
    )
    parser.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="a running server, host:port")
    where.add_argument("--model", help="score in-process with this checkpoint (dir or hub id)")
    parser.add_argument("--api-key", help="bearer token for --target (or LYCHEE_API_KEY)")
    parser.add_argument("--tls-ca", type=Path, help="PEM root certificate: use TLS to --target")
    parser.add_argument("--device", default="auto", help="in-process device (auto, cpu, cuda)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.epilog = (
        "Images: .jpg .jpeg .png .webp, and .gif .bmp .tif .tiff (converted to PNG; first frame). "
        "Text: " + " ".join(sorted(TEXT_SUFFIXES)) + ". Other files are skipped and listed; hidden "
        "files and folders inside a folder are ignored. Exit status: 0 ranked, 1 a bad file stopped "
        "the run (see --skip-bad) or the server/model failed, 2 bad arguments."
    )


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def discover(inputs: Iterable[str]) -> Found:
    """Expand files, folders and globs into a sorted, de-duplicated list of files to rank, plus
    the files skipped because of their type."""
    found: dict[Path, None] = {}
    unsupported: dict[Path, None] = {}

    def add(path: Path) -> None:
        (found if _usable(path) else unsupported)[path] = None

    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for m in matches:
            if m.is_dir():
                for f in sorted(m.rglob("*")):
                    if f.is_file() and not _hidden(f, m):
                        add(f)
            elif m.is_file():
                add(m)
            elif not m.exists():
                raise FileNotFoundError(f"no such file, folder or glob match: {item}")
    return Found(list(found), [p for p in unsupported if p not in found])


def _usable(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or suffix in TEXT_SUFFIXES


def probe(path: Path) -> BadFile | None:
    """A cheap look (size, and an image's first bytes) that finds most bad files before any
    scoring; :func:`load` still checks everything."""
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as err:
        return BadFile(path, f"cannot read the file: {err.strerror or err}")
    if not head:
        return BadFile(path, "the file is empty")
    if path.suffix.lower() in IMAGE_SUFFIXES and not (
        head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    ):
        return BadFile(path, "not a JPEG, PNG, WebP, GIF, BMP or TIFF image (unrecognised file signature)")
    return None


def load(path: Path) -> FileDoc:
    """Read one file as a document; raises :class:`BadFile`."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from lychee.rerank.client import EncodedImage

        try:
            image = EncodedImage.from_file(path)  # sniffed; GIF/BMP/TIFF converted to PNG
        except ValueError as err:
            prefix = f"{path}: "
            message = str(err)
            raise BadFile(path, message[len(prefix) :] if message.startswith(prefix) else message) from err
        return FileDoc(path, None, image.data, image.media_type)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise BadFile(path, f"cannot read the file: {err.strerror or err}") from err
    if not text:
        raise BadFile(path, "the file is empty")
    return FileDoc(path, text, None)


ScoreFn = Callable[..., list[float]]
"""``score(docs)`` -> scores in input order; the scorers here also take ``on_progress=``, a
:data:`ProgressFn` called as the request's pairs are scored."""
ProgressFn = Callable[[str, int], None]
"""``(phase, pairs_scored)`` of the request in flight: queued, preparing, scoring, done."""


@dataclass(frozen=True)
class SliceLimits:
    """How much one request may carry: documents, and bytes of file content."""

    max_documents: int
    max_bytes: int


IN_PROCESS_SLICE_BYTES = 256 * 1024 * 1024
"""In-process there is no message limit; this bounds the file bytes held for one request."""

_DOCUMENT_FIELD = re.compile(r"^documents\[(\d+)\](?:\.(.+))?$")
_DOCUMENT_MENTION = re.compile(r"documents\[(\d+)\](?:\.[\w.\[\]]+)?")


def document_errors(violations: Iterable[tuple[str, str]], count: int) -> dict[int, str] | None:
    """Per-document reasons from ``(field path, description)`` pairs, or ``None`` when any of them
    is about something other than one of the ``count`` documents sent (then no file is to blame)."""
    errors: dict[int, list[str]] = {}
    for path, description in violations:
        match = _DOCUMENT_FIELD.match(path)
        if match is None or int(match[1]) >= count:
            return None
        part = match[2] or ""
        what = "image" if "image" in part else "text" if "text" in part else ""
        # The description may quote the field path itself; the file name replaces it later.
        reason = _DOCUMENT_MENTION.sub("this document", description).strip() or "refused by the server"
        errors.setdefault(int(match[1]), []).append(
            f"{what}: {reason}" if what and what not in reason else reason
        )
    return {i: "; ".join(dict.fromkeys(reasons)) for i, reasons in errors.items()} or None


def _scores_in_input_order(results: Iterable[Any], n: int) -> list[float]:
    """Scores of ranked results (``.index``, ``.score``) back in the order the documents were sent."""
    out = [0.0] * n
    for r in results:
        out[r.index] = r.score
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _client_scorer(ns: argparse.Namespace) -> tuple[ScoreFn, Callable[[], None], bool, SliceLimits]:
    from lychee.rerank.client import Doc, EncodedImage, LycheeClient, LycheeError, MediaType, Query

    api_key = ns.api_key or os.environ.get("LYCHEE_API_KEY")
    query = Query(text=ns.query, image=_query_image(ns))
    try:
        root = ns.tls_ca.read_bytes() if ns.tls_ca else None
    except OSError as err:
        raise FatalError(f"cannot read --tls-ca {str(ns.tls_ca)!r}: {err.strerror or err}") from err
    try:
        client = LycheeClient(ns.target, api_key=api_key, root_certificates=root, timeout=ns.timeout)
    except ValueError as err:
        raise FatalError(str(err)) from err

    def score(docs: Sequence[FileDoc], on_progress: ProgressFn | None = None) -> list[float]:
        batch = [
            Doc(
                text=d.text, image=EncodedImage(d.image, cast("MediaType", d.media_type)) if d.image else None
            )
            for d in docs
        ]
        follow = None if on_progress is None else (lambda p: on_progress(p.phase, p.pairs_scored))
        try:
            result = client.rerank(query, batch, instruction=ns.instruction, on_progress=follow)
        except LycheeError as err:
            per_doc = document_errors(((v.field, v.description) for v in err.field_violations), len(docs))
            if per_doc is not None:
                raise DocumentErrors(per_doc) from err
            raise FatalError(_one_line(str(err))) from err
        return _scores_in_input_order(result.results, len(docs))

    try:
        info = client.server_info()
    except LycheeError as err:
        client.close()
        raise FatalError(_one_line(str(err))) from err
    # Half the message limit keeps a request under the client's streaming threshold (3/4 of it),
    # so it goes over RerankWithProgress and the bar moves as its pairs are scored.
    limits = SliceLimits(
        max_documents=max(1, info.limits.max_documents or 1000),
        max_bytes=max(1, (info.limits.max_message_bytes or 4 * 1024 * 1024) // 2),
    )
    return score, client.close, info.random_weights, limits


def _query_image(ns: argparse.Namespace) -> Any:
    """The ``--query-image`` as an ``EncodedImage`` (converted like the documents), or ``None``."""
    if ns.query_image is None:
        return None
    from lychee.rerank.client import EncodedImage

    try:
        return EncodedImage.from_file(ns.query_image)
    except ValueError as err:
        raise FatalError(f"--query-image {err}") from err


def _inprocess_scorer(ns: argparse.Namespace) -> tuple[ScoreFn, Callable[[], None], bool, SliceLimits]:
    from lychee_server.domain import DEFAULT_INSTRUCTION, Content, Document, ImageInput, MediaType, RerankJob
    from lychee_server.engine import load_engine
    from lychee_server.errors import LycheeError
    from lychee_server.scheduler import Scheduler
    from lychee_server.settings import Settings

    query_image = _query_image(ns)
    settings = Settings(model=ns.model, device=ns.device, metrics_port=None)
    try:
        engine = load_engine(settings)
    except LycheeError as err:
        raise FatalError(_one_line(err.message)) from err
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(engine, settings)
    loop.run_until_complete(scheduler.start())

    def content(text: str | None, image: bytes | None, media_type: str | None) -> Content:
        img = ImageInput(image, MediaType(media_type)) if image is not None and media_type else None
        return Content(text=text, image=img)

    def score(docs: Sequence[FileDoc], on_progress: ProgressFn | None = None) -> list[float]:
        # A fresh query value per job: the engine groups (and cancels) a request's image decodes
        # by the identity of its query object, so two jobs must never share one.
        query = content(
            ns.query,
            query_image.data if query_image else None,
            query_image.media_type if query_image else None,
        )
        job = RerankJob(
            instruction=ns.instruction or DEFAULT_INSTRUCTION,
            query=query,
            documents=tuple(Document(content(d.text, d.image, d.media_type)) for d in docs),
        )
        follow = None if on_progress is None else (lambda p: on_progress(p.phase.value, p.pairs_scored))
        try:
            result = loop.run_until_complete(scheduler.rerank(job, on_progress=follow))
        except LycheeError as err:
            per_doc = document_errors(((v.field, v.description) for v in err.violations), len(docs))
            if per_doc is not None:
                raise DocumentErrors(per_doc) from err
            raise FatalError(_one_line(f"{err.reason}: {err.message}")) from err
        return _scores_in_input_order(result.results, len(docs))

    def close() -> None:
        loop.run_until_complete(scheduler.stop())
        loop.close()

    limits = SliceLimits(max_documents=settings.max_documents, max_bytes=IN_PROCESS_SLICE_BYTES)
    return score, close, engine.info.random_weights, limits


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def slices(paths: Sequence[Path], batch_size: int | None, limits: SliceLimits | None) -> list[list[Path]]:
    """``paths`` cut into requests: at most ``batch_size`` files each (when given) and within
    ``limits`` (documents, and file bytes; a file larger than the byte limit goes alone)."""
    most = batch_size if batch_size is not None else (limits.max_documents if limits else len(paths))
    if limits is not None:
        most = min(most, limits.max_documents)
    most = max(1, most)
    budget = limits.max_bytes if limits is not None else None
    out: list[list[Path]] = []
    current: list[Path] = []
    size = 0
    for p in paths:
        n = _file_size(p) if budget is not None else 0
        if current and (len(current) >= most or (budget is not None and size + n > budget)):
            out.append(current)
            current, size = [], 0
        current.append(p)
        size += n
    if current:
        out.append(current)
    return out


def rank_files(
    paths: Sequence[Path],
    score: ScoreFn,
    batch_size: int | None,
    progress: bool,
    *,
    skip_bad: bool = False,
    limits: SliceLimits | None = None,
) -> Outcome:
    """Score ``paths`` in as few requests as :func:`slices` allows; each request's files are read
    only for its call, so a folder of thousands of photos never sits in memory at once. With
    ``progress``, the bar follows each request's pairs as they are scored (``on_progress``).

    Bad files (found by :func:`probe` up front, by :func:`load`, or named by the scorer's
    :class:`DocumentErrors`) stop the run unless ``skip_bad``; then they are left out and the
    request is sent again without them, so a good file is never dropped for a bad neighbour.
    """
    from rich.progress import Progress

    failed = [bad for p in paths if (bad := probe(p)) is not None]
    if failed and not skip_bad:
        return Outcome([], failed, stopped=True)
    refused = {bad.path for bad in failed}
    todo = [p for p in paths if p not in refused]
    scored: list[tuple[float, Path]] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("ranking", total=len(todo))
        done = 0
        for chunk in slices(todo, batch_size, limits):
            docs: list[FileDoc] = []
            for p in chunk:
                try:
                    docs.append(load(p))
                except BadFile as bad:
                    failed.append(bad)
            if failed and not skip_bad:
                return Outcome([], failed, stopped=True)
            high = [done]  # the bar never moves back, not even when a request is sent again

            def follow(
                phase: str, pairs_scored: int, base: int = done, cap: int = len(chunk), high: list[int] = high
            ) -> None:
                high[0] = max(high[0], base + min(pairs_scored, cap))
                bar.update(task, completed=high[0], description=phase)

            while docs:  # each round drops at least one document, so this ends
                try:
                    scores = score(docs, on_progress=follow) if progress else score(docs)
                except DocumentErrors as err:
                    failed.extend(BadFile(docs[i].path, reason) for i, reason in sorted(err.errors.items()))
                    if not skip_bad:
                        return Outcome([], failed, stopped=True)
                    docs = [d for i, d in enumerate(docs) if i not in err.errors]
                    continue
                scored.extend(zip(scores, (d.path for d in docs), strict=True))
                break
            done += len(chunk)
            bar.update(task, completed=done, description="ranking")
    order = sorted(range(len(scored)), key=lambda i: (-scored[i][0], i))
    ranked = [Ranked(rank + 1, scored[i][0], scored[i][1]) for rank, i in enumerate(order)]
    return Outcome(ranked, failed, stopped=False)


RANDOM_NOTE = "the model has random weights (a test checkpoint): these scores carry no meaning"


def render(ranked: Sequence[Ranked], as_json: bool, random_weights: bool = False) -> None:
    if random_weights:
        print(f"{PROG}: note: {RANDOM_NOTE}", file=sys.stderr)
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


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:_LISTED])
    return shown + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


def _report_unsupported(paths: Sequence[Path]) -> None:
    if len(paths) <= _LISTED:
        for p in paths:
            print(
                f"{PROG}: skipped {p}: unsupported file type {p.suffix or '(no suffix)'!r}", file=sys.stderr
            )
        return
    counts = collections.Counter(p.suffix.lower() or "(no suffix)" for p in paths)
    kinds = ", ".join(f"{suffix} x{n}" for suffix, n in counts.most_common())
    print(f"{PROG}: skipped {len(paths)} files of unsupported types: {kinds}", file=sys.stderr)


def _write_html(
    ns: argparse.Namespace,
    ranked: Sequence[Ranked],
    outcome: Outcome,
    unsupported: Sequence[Path],
    random_weights: bool,
) -> bool:
    """Write the ``--html`` report; False (and one line on stderr) when it cannot be written."""
    from lychee_server.domain import DEFAULT_INSTRUCTION
    from lychee_server.report_html import ReportDocument, render_report, write_report

    docs = [ReportDocument(r.rank, r.score, r.path, r.path.suffix.lower() in IMAGE_SUFFIXES) for r in ranked]
    text = render_report(
        docs,
        query=ns.query,
        query_image=ns.query_image,
        instruction=ns.instruction or DEFAULT_INSTRUCTION,
        source=f"server {ns.target}" if ns.target else f"model {ns.model} (in-process)",
        failed=[(bad.path, _one_line(bad.reason)) for bad in outcome.failed],
        unsupported=unsupported,
        random_weights=random_weights,
        total_ranked=len(outcome.ranked),
    )
    try:
        write_report(ns.html, text)
    except OSError as err:
        print(f"{PROG}: cannot write --html {str(ns.html)!r}: {err.strerror or err}", file=sys.stderr)
        return False
    print(f"{PROG}: wrote {ns.html}", file=sys.stderr)
    return True


def run_rank(ns: argparse.Namespace) -> int:
    if ns.query is None and ns.query_image is None:
        print(f"{PROG}: give --query and/or --query-image", file=sys.stderr)
        return 2
    try:
        found = discover(ns.inputs)
    except FileNotFoundError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    _report_unsupported(found.unsupported)
    if not found.paths:
        print(f"{PROG}: no image or text files found", file=sys.stderr)
        return 2
    try:
        score, close, random_weights, limits = _client_scorer(ns) if ns.target else _inprocess_scorer(ns)
        try:
            outcome = rank_files(
                found.paths,
                score,
                None if ns.batch_size is None else max(1, ns.batch_size),
                progress=not ns.json and sys.stderr.isatty(),
                skip_bad=ns.skip_bad,
                limits=limits,
            )
        finally:
            close()
    except FatalError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    failed_paths = [bad.path for bad in outcome.failed]
    for bad in outcome.failed:
        print(
            f"{PROG}: {'skipped ' if ns.skip_bad else ''}{bad.path}: {_one_line(bad.reason)}", file=sys.stderr
        )
    if outcome.stopped:
        n = len(outcome.failed)
        print(
            f"{PROG}: stopped: {n} file{'s' if n != 1 else ''} could not be ranked ({_names(failed_paths)}); "
            "nothing was ranked. Fix or remove them, or pass --skip-bad to rank the other files.",
            file=sys.stderr,
        )
        return 1
    ranked = outcome.ranked if ns.top_n is None else outcome.ranked[: ns.top_n]
    if outcome.ranked:
        render(ranked, ns.json, random_weights)
        if ns.html is not None and not _write_html(ns, ranked, outcome, found.unsupported, random_weights):
            return 1
    skipped = failed_paths + found.unsupported
    summary = f"{PROG}: ranked {len(outcome.ranked)} file{'s' if len(outcome.ranked) != 1 else ''}"
    if skipped:
        summary += f", skipped {len(skipped)}: {_names(skipped)}"
    print(summary, file=sys.stderr)
    return 0 if outcome.ranked else 1
