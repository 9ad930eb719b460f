"""A ranking as one self-contained HTML file (``lychee-rerank rank ... --html report.html``).

The report shows the playground's ranked grid (the same markup and the playground's stylesheet,
inlined): rank, score (bar and number) and name of every document, a thumbnail for images
(scaled down with Pillow and embedded as ``data:`` URIs) and the first lines of text documents;
a click enlarges a document, a slider hides scores under a threshold, and the files that could
not be ranked are listed with their reasons. Nothing is fetched when it is opened: a
Content-Security-Policy allows only the embedded images, the inline stylesheet and the one
inline script (by its hash), so the file opens offline and can be mailed or attached as is.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["THUMBNAIL_SIZE", "ReportDocument", "render_report", "thumbnail_data_uri", "write_report"]

THUMBNAIL_SIZE = 480
"""Longest side of an embedded thumbnail, in pixels (a few tens of KB each as JPEG)."""
SNIPPET_LINES = 6
SNIPPET_CHARS = 320
FULL_TEXT_CHARS = 20_000
"""At most this much of a text document is embedded for the enlarged view."""
TEXT_READ_BYTES = 256 * 1024
STYLESHEET = Path(__file__).resolve().parent / "edge" / "http" / "playground" / "style.css"


@dataclass(frozen=True)
class ReportDocument:
    """One ranked document: its rank, score, path, and whether it is an image."""

    rank: int
    score: float
    path: Path
    is_image: bool


def thumbnail_data_uri(path: Path, size: int = THUMBNAIL_SIZE) -> str | None:
    """A ``data:`` URI of the image scaled to fit ``size`` x ``size`` (JPEG, or PNG when it has
    transparency; the first frame of an animation, EXIF orientation applied), or ``None`` when
    Pillow cannot read it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.thumbnail((size, size), Image.Resampling.LANCZOS)
            alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
            out = io.BytesIO()
            if alpha:
                image.convert("RGBA").save(out, "PNG", optimize=True)
                kind = "png"
            else:
                image.convert("RGB").save(out, "JPEG", quality=82, optimize=True)
                kind = "jpeg"
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return f"data:image/{kind};base64,{base64.b64encode(out.getvalue()).decode('ascii')}"


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            raw = fh.read(TEXT_READ_BYTES)
    except OSError as err:
        return f"(cannot read the file: {err.strerror or err})"
    return raw.decode("utf-8", errors="replace")


def _snippet(text: str) -> str:
    lines = [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    out = "\n".join(lines[:SNIPPET_LINES])
    if len(out) > SNIPPET_CHARS:
        return out[:SNIPPET_CHARS].rstrip() + "…"
    return out + ("\n…" if len(lines) > SNIPPET_LINES else "")


def _common_root(paths: Sequence[Path]) -> Path | None:
    """The deepest folder holding every path (so cards can show short names), or None."""
    if not paths:
        return None
    try:
        root = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    except ValueError:  # different drives, or relative and absolute mixed
        return None
    return None if root == Path(root.anchor) else root


def _name(path: Path, root: Path | None) -> str:
    if root is None:
        return str(path)
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _card(doc: ReportDocument, name: str) -> str:
    score = f"{doc.score:.4f}"
    pct = max(0.0, min(1.0, doc.score)) * 100
    label = f"Rank {doc.rank}: {name}, score {score}. Enlarge."
    full = ""
    if doc.is_image:
        uri = thumbnail_data_uri(doc.path)
        visual = (
            f'<span class="card-visual"><img src="{uri}" alt="{_e(name)}"></span>'
            if uri
            else '<span class="card-visual card-snippet">(no preview: the image cannot be read)</span>'
        )
        kind = "image"
    else:
        text = _read_text(doc.path)
        visual = f'<span class="card-visual card-snippet">{_e(_snippet(text))}</span>'
        cut = text[:FULL_TEXT_CHARS] + ("\n…" if len(text) > FULL_TEXT_CHARS else "")
        full = f'<pre class="full-text" hidden>{_e(cut)}</pre>'
        kind = "text"
    return (
        f'<li class="card card-{kind}" data-rank="{doc.rank}" data-score="{doc.score!r}" '
        f'data-name="{_e(name)}">'
        f'<button type="button" class="card-open" aria-label="{_e(label)}">'
        f'<span class="card-rank">#{doc.rank}</span>{visual}</button>'
        f'<div class="card-meta"><span class="card-name" title="{_e(name)}">{_e(name)}</span>'
        f'<span class="card-score"><span class="score-bar" aria-hidden="true">'
        f'<span style="width: {pct:.1f}%"></span></span><span class="score-num">{score}</span></span>'
        f"</div>{full}</li>"
    )


_SCRIPT = """\
"use strict";
(() => {
  const grid = document.getElementById("grid");
  const slider = document.getElementById("threshold");
  const value = document.getElementById("threshold-value");
  const count = document.getElementById("shown-count");
  const viewer = document.getElementById("viewer");
  const title = document.getElementById("viewer-title");
  const body = document.getElementById("viewer-body");
  let opener = null;
  function apply() {
    const t = Number(slider.value);
    value.textContent = t.toFixed(2);
    let shown = 0;
    for (const li of grid.children) {
      li.hidden = Number(li.dataset.score) < t;
      if (!li.hidden) shown += 1;
    }
    count.textContent = `showing ${shown} of ${grid.children.length}`;
  }
  slider.addEventListener("input", apply);
  grid.addEventListener("click", (e) => {
    const button = e.target.closest(".card-open");
    if (!button) return;
    const li = button.closest("li");
    opener = button;
    title.textContent = `#${li.dataset.rank} · ${li.dataset.name} · ${Number(li.dataset.score).toFixed(4)}`;
    const img = li.querySelector(".card-visual img");
    const full = li.querySelector(".full-text");
    body.replaceChildren();
    if (img) {
      const big = document.createElement("img");
      big.src = img.src;
      big.alt = img.alt;
      body.append(big);
    } else {
      const pre = document.createElement("pre");
      pre.className = "viewer-text";
      pre.textContent = full ? full.textContent : li.querySelector(".card-visual").textContent;
      body.append(pre);
    }
    viewer.showModal();
    document.getElementById("viewer-close").focus();
  });
  document.getElementById("viewer-close").addEventListener("click", () => viewer.close());
  viewer.addEventListener("click", (e) => { if (e.target === viewer) viewer.close(); });
  viewer.addEventListener("close", () => { if (opener) opener.focus(); });
  apply();
})();
"""


def _script_hash(script: str) -> str:
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def render_report(
    ranked: Sequence[ReportDocument],
    *,
    query: str | None,
    query_image: Path | None = None,
    instruction: str,
    source: str,
    failed: Sequence[tuple[Path, str]] = (),
    unsupported: Sequence[Path] = (),
    random_weights: bool = False,
    total_ranked: int | None = None,
    created: datetime.datetime | None = None,
) -> str:
    """The report as one HTML document (a str). ``ranked`` is what the grid shows (after
    ``--top-n``); ``total_ranked`` is how many were ranked in all, when that is more."""
    created = created or datetime.datetime.now(datetime.UTC).astimezone()
    css = STYLESHEET.read_text(encoding="utf-8")
    shown = len(ranked)
    total = shown if total_ranked is None else total_ranked
    query_parts: list[str] = []
    if query:
        query_parts.append(_e(query))
    if query_image is not None:
        uri = thumbnail_data_uri(query_image, 240)
        if uri:
            query_parts.append(f'<img class="query-image" src="{uri}" alt="Query image: {_e(query_image)}">')
        query_parts.append(f'<span class="help">{_e(query_image)}</span>')
    counts = f"{total} ranked" + (f" (the best {shown} shown)" if shown < total else "")
    if failed or unsupported:
        counts += f", {len(failed) + len(unsupported)} not ranked"
    root = _common_root([d.path for d in ranked] + [p for p, _ in failed] + list(unsupported))
    rows = [
        ("Query", "<br>".join(query_parts) or "(none)"),
        ("Instruction", _e(instruction)),
        ("Scored by", _e(source)),
        ("Documents", _e(counts) + (f" in {_e(root)}" if root is not None else "")),
        ("Created", _e(created.isoformat(timespec="seconds"))),
    ]
    head = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    warning = (
        '<p class="warning">The model has random weights (a test checkpoint): '
        "these scores carry no meaning.</p>"
        if random_weights
        else ""
    )
    cards = "\n".join(_card(doc, _name(doc.path, root)) for doc in ranked)
    problems = [
        f"<li><strong class='problem-name'>{_e(_name(p, root))}</strong>: {_e(reason)}</li>"
        for p, reason in failed
    ]
    problems += [
        f"<li><strong class='problem-name'>{_e(_name(p, root))}</strong>: unsupported file type "
        f"{_e(p.suffix or '(no suffix)')}</li>"
        for p in unsupported
    ]
    problem_block = (
        '<section class="panel" aria-labelledby="h-problems"><div class="problems">'
        f'<h2 id="h-problems">Not ranked</h2><ul>{"".join(problems)}</ul></div></section>'
        if problems
        else ""
    )
    csp = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src {_script_hash(_SCRIPT)}; base-uri 'none'; form-action 'none'"
    )
    title = query or (query_image.name if query_image is not None else "ranking")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="generator" content="lychee-rerank rank --html">
<title>lychee-rerank report: {_e(title)}</title>
<style>
{css}
</style>
</head>
<body>
<header class="report-head">
<h1>lychee-rerank <span class="subtle">report</span></h1>
<dl>{head}</dl>
{warning}
</header>
<main>
<section id="results" class="panel" aria-labelledby="h-results">
<h2 id="h-results">Ranking</h2>
<div class="toolbar">
<label for="threshold">Hide scores below</label>
<input type="range" id="threshold" min="0" max="1" step="0.01" value="0" aria-describedby="shown-count">
<output id="threshold-value" for="threshold">0.00</output>
<span id="shown-count" class="help">showing {shown} of {shown}</span>
</div>
<ol id="grid" class="grid">
{cards}
</ol>
</section>
{problem_block}
</main>
<dialog id="viewer" class="viewer" aria-labelledby="viewer-title">
<div class="viewer-head"><h2 id="viewer-title"></h2>
<button type="button" id="viewer-close" class="viewer-close">Close</button></div>
<div id="viewer-body" class="viewer-body"></div>
</dialog>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_report(path: Path, text: str) -> None:
    """Write a rendered report to ``path`` atomically (a temporary file next to it, then a rename),
    so a reader never sees half a report."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
