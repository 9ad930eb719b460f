"""``lychee-rerank eval``: does reranking improve retrieval on a benchmark, and by how much?

Input is a retrieval benchmark in the BEIR layout, extended with images::

    DATASET/corpus.jsonl     {"_id": "d1", "title": "...", "text": "...", "image": "figs/d1.png"}
    DATASET/queries.jsonl    {"_id": "q1", "text": "...", "image": "data:image/png;base64,..."}
    DATASET/qrels/test.tsv   query-id <TAB> corpus-id <TAB> score   (header line optional)

``image`` (optional, documents and queries alike) is a file path relative to DATASET (or
absolute), a ``data:`` URI or bare base64. A document's text is its title and text joined by
a space. The first stage is a TREC run file (``--run``: ``qid Q0 docid rank score tag``) or,
without one, BM25 (rank-bm25's Okapi BM25 over lower-cased word tokens of the text). Its top
``--top-k`` candidates per query are reranked through a running server (``--target``) or an
in-process one (``--model``: the same server, on a loopback port of this process).

Metrics are trec_eval's, computed by pytrec_eval on the first-stage ranking ("before") and on
the reranked one ("after"): nDCG@10 (``ndcg_cut.10``: gain = the graded relevance, log2
discount, ideal ranking from all judged documents), MRR@10 (``recip_rank`` of the top 10) and
Recall@1/5/10/k (``recall.N``). A document counts as relevant when its qrel score is >= 1.
Which queries count: those with at least one relevant judgment and a line in queries.jsonl;
the rest are listed as skipped, never averaged in as zeros. A counted query whose candidate
list is empty scores 0. Rankings are fixed here, not by trec_eval's tie rule (which orders
equal scores by document id): the first stage orders by score, ties by the run file's rank
then file order (BM25: corpus order); the rerank orders by the reranker's score, ties by the
first-stage order. pytrec_eval is handed these exact orders.

Output: a Markdown report on stdout (``--markdown FILE`` writes it to a file too), the full
report as JSON with ``--json FILE`` (per-query before/after/delta included), the reranked run
in TREC format with ``--save-run FILE``. Exit status 0, 2 for unusable input, 1 when reranking
failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Benchmark",
    "EvalError",
    "Item",
    "add_eval_arguments",
    "bm25_run",
    "evaluate",
    "load_benchmark",
    "mean_metrics",
    "metric_names",
    "read_trec_run",
    "run_eval",
]

RANDOM_NOTE = "the model has random weights (a test checkpoint): these numbers carry no meaning"
_WORD = re.compile(r"\w+")


class EvalError(ValueError):
    """The benchmark, the run file or the options cannot be used (exit status 2)."""


@dataclass(frozen=True, slots=True)
class Item:
    """A document or a query: text, an image (bytes, or a file read when sent), or both."""

    id: str
    text: str | None
    image: bytes | Path | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Benchmark:
    corpus: dict[str, Item]
    queries: dict[str, Item]
    qrels: dict[str, dict[str, int]]
    """query id -> {doc id: graded relevance} (every judgment, relevant or not)."""


# -- reading the benchmark ------------------------------------------------------------------------


def _image(value: object, root: Path, where: str) -> bytes | Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise EvalError(f"{where}: 'image' must be a string (a path, a data: URI or base64)")
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise EvalError(f"{where}: only base64 data URIs are supported")
        value = payload
    elif len(value) < 4096:
        path = Path(value) if Path(value).is_absolute() else root / value
        if path.is_file():
            return path
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EvalError(f"{where}: 'image' is neither a file (under {root}) nor base64 data") from None
    if not data:
        raise EvalError(f"{where}: 'image' is empty")
    return data


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise EvalError(f"missing {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("_id"), str | int):
                raise EvalError(f"{where}: a JSON object with an '_id' is expected")
            yield where, row


def _items(path: Path, root: Path, *, with_title: bool) -> dict[str, Item]:
    items: dict[str, Item] = {}
    for where, row in _jsonl(path):
        item_id = str(row["_id"])
        parts = [row.get("title"), row.get("text")] if with_title else [row.get("text")]
        text = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip()) or None
        image = _image(row.get("image"), root, where)
        if text is None and image is None:
            raise EvalError(f"{where}: {item_id!r} has neither text nor an image")
        if item_id in items:
            raise EvalError(f"{where}: duplicate _id {item_id!r}")
        items[item_id] = Item(item_id, text, image)
    return items


def _qrels_file(root: Path, split: str | None) -> Path:
    folder = root / "qrels"
    if split is not None:
        path = folder / f"{split}.tsv"
        if not path.is_file():
            raise EvalError(f"missing {path}")
        return path
    files = sorted(folder.glob("*.tsv"))
    if (folder / "test.tsv").is_file():
        return folder / "test.tsv"
    if len(files) == 1:
        return files[0]
    raise EvalError(f"{folder}: give --split (found {', '.join(f.stem for f in files) or 'no qrels'})")


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """``query-id corpus-id score`` lines (tab or space separated; a header line is skipped)."""
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols:
                continue
            if n == 1 and cols[0] == "query-id":
                continue
            if len(cols) == 4:  # TREC qrels: qid iteration docid rel
                cols = [cols[0], cols[2], cols[3]]
            if len(cols) != 3:
                raise EvalError(f"{path.name} line {n}: expected 'query-id corpus-id score'")
            try:
                score = int(cols[2])
            except ValueError:
                raise EvalError(f"{path.name} line {n}: relevance {cols[2]!r} is not an integer") from None
            qrels.setdefault(cols[0], {})[cols[1]] = score
    return qrels


def load_benchmark(root: Path, split: str | None = None) -> Benchmark:
    """Read ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv`` (default: test, or the only one)."""
    if not root.is_dir():
        raise EvalError(f"{root} is not a directory")
    corpus = _items(root / "corpus.jsonl", root, with_title=True)
    queries = _items(root / "queries.jsonl", root, with_title=False)
    return Benchmark(corpus, queries, read_qrels(_qrels_file(root, split)))


def evaluated_queries(bench: Benchmark) -> tuple[list[str], dict[str, str]]:
    """Query ids that count (qrels order), and why each other judged query was skipped."""
    counted: list[str] = []
    skipped: dict[str, str] = {}
    for qid, judged in bench.qrels.items():
        if not any(rel >= 1 for rel in judged.values()):
            skipped[qid] = "no relevant document in the qrels"
        elif qid not in bench.queries:
            skipped[qid] = "not in queries.jsonl"
        else:
            counted.append(qid)
    return counted, skipped


# -- first stage ----------------------------------------------------------------------------------


def read_trec_run(path: Path) -> dict[str, list[str]]:
    """A TREC run (``qid Q0 docid rank score tag``) as ranked doc ids per query.

    Order: score descending, ties by the rank column, then by position in the file; a
    document listed twice for a query keeps its best line.
    """
    rows: dict[str, list[tuple[float, float, int, str]]] = {}
    if not path.is_file():
        raise EvalError(f"missing run file {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) != 6:
                raise EvalError(f"{path.name} line {n}: expected 'qid Q0 docid rank score tag'")
            try:
                rank, score = float(cols[3]), float(cols[4])
            except ValueError:
                raise EvalError(f"{path.name} line {n}: rank and score must be numbers") from None
            rows.setdefault(cols[0], []).append((-score, rank, n, cols[2]))
    run: dict[str, list[str]] = {}
    for qid, entries in rows.items():
        seen: set[str] = set()
        ranked = []
        for *_, doc in sorted(entries):
            if doc not in seen:
                seen.add(doc)
                ranked.append(doc)
        run[qid] = ranked
    return run


def tokenize(text: str | None) -> list[str]:
    return _WORD.findall(text.lower()) if text else []


def bm25_run(
    corpus: Mapping[str, Item], queries: Mapping[str, Item], qids: Iterable[str], k: int
) -> dict[str, list[str]]:
    """Top ``k`` documents per query by Okapi BM25 (rank-bm25), ties in corpus order."""
    import numpy as np
    from rank_bm25 import BM25Okapi

    doc_ids = list(corpus)
    tokens = [tokenize(corpus[d].text) for d in doc_ids]
    if not any(tokens):
        raise EvalError("no document has text for BM25 (an image-only corpus): give a first stage with --run")
    bm25 = BM25Okapi(tokens)
    run: dict[str, list[str]] = {}
    for qid in qids:
        scores = np.asarray(bm25.get_scores(tokenize(queries[qid].text)), dtype=float)
        order = np.argsort(-scores, kind="stable")[:k]
        run[qid] = [doc_ids[i] for i in order]
    return run


# -- metrics --------------------------------------------------------------------------------------


def metric_names(k: int) -> list[str]:
    cutoffs = sorted({1, 5, 10, k})
    return ["nDCG@10", "MRR@10", *[f"Recall@{c}" for c in cutoffs]]


def evaluate(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Sequence[str]], qids: Sequence[str], k: int
) -> dict[str, dict[str, float]]:
    """Per-query metrics (:func:`metric_names`) of ranked lists, computed by pytrec_eval.

    ``run`` gives each query's documents best first; pytrec_eval receives strictly decreasing
    scores in that order, so trec_eval's own tie rule never applies. Queries in ``qids``
    without candidates score 0 on every metric.
    """
    import pytrec_eval

    cutoffs = sorted({1, 5, 10, k})
    judged = {q: dict(qrels[q]) for q in qids}
    scored = {q: _scores(run.get(q, ())) for q in qids if run.get(q)}
    top10 = {q: _scores(run[q][:10]) for q in scored}
    main = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10", "recall." + ",".join(map(str, cutoffs))})
    rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"})
    by_query = main.evaluate(scored) if scored else {}
    rr_by_query = rr.evaluate(top10) if top10 else {}
    out: dict[str, dict[str, float]] = {}
    for q in qids:
        m = by_query.get(q, {})
        row = {"nDCG@10": m.get("ndcg_cut_10", 0.0), "MRR@10": rr_by_query.get(q, {}).get("recip_rank", 0.0)}
        row.update({f"Recall@{c}": m.get(f"recall_{c}", 0.0) for c in cutoffs})
        out[q] = row
    return out


def _scores(docs: Sequence[str]) -> dict[str, float]:
    return {d: float(len(docs) - i) for i, d in enumerate(docs)}


def mean_metrics(per_query: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> dict[str, float]:
    n = len(per_query)
    return {m: (sum(row[m] for row in per_query.values()) / n if n else 0.0) for m in names}


# -- reranking ------------------------------------------------------------------------------------


@dataclass
class RerankStats:
    pairs: int = 0
    seconds: float = 0.0
    requests: int = 0


async def rerank_run(
    client: Any,
    bench: Benchmark,
    first_stage: Mapping[str, Sequence[str]],
    qids: Sequence[str],
    *,
    instruction: str | None,
    batch_size: int,
    concurrency: int,
    on_query: Callable[[], None] = lambda: None,
) -> tuple[dict[str, list[str]], dict[str, dict[str, float]], RerankStats]:
    """Rerank every query's candidates with ``client`` (an ``AsyncLycheeClient``; its timeout applies).

    Candidates go in slices of ``batch_size`` documents (each pair is scored independently, so
    slicing changes no score); up to ``concurrency`` queries are in flight at once, which lets
    the server batch across them. Returns the reranked run, the scores, and the throughput.
    """
    from lychee.rerank.client import Doc, Query

    stats = RerankStats()
    gate = asyncio.Semaphore(max(1, concurrency))
    reranked: dict[str, list[str]] = {}
    scores: dict[str, dict[str, float]] = {}

    async def one(qid: str) -> None:
        q = bench.queries[qid]
        candidates = list(first_stage.get(qid, ()))
        query = Query(text=q.text, image=q.image)
        got: list[float] = []
        async with gate:
            for start in range(0, len(candidates), batch_size):
                chunk = candidates[start : start + batch_size]
                docs = [Doc(text=bench.corpus[d].text, image=bench.corpus[d].image) for d in chunk]
                result = await client.rerank(query, docs, instruction=instruction)
                by_index = [0.0] * len(chunk)
                for r in result.results:
                    by_index[r.index] = r.score
                got.extend(by_index)
                stats.pairs += len(chunk)
                stats.requests += 1
        order = sorted(range(len(candidates)), key=lambda i: (-got[i], i))
        reranked[qid] = [candidates[i] for i in order]
        scores[qid] = {candidates[i]: got[i] for i in range(len(candidates))}
        on_query()

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(q)) for q in qids]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    stats.seconds = time.perf_counter() - t0
    return reranked, scores, stats


# -- report ---------------------------------------------------------------------------------------


def build_report(
    *,
    dataset: str,
    first_stage: str,
    k: int,
    qids: Sequence[str],
    skipped: Mapping[str, str],
    before: Mapping[str, Mapping[str, float]],
    after: Mapping[str, Mapping[str, float]],
    stats: RerankStats,
    model: str,
    random_weights: bool,
) -> dict[str, Any]:
    names = metric_names(k)
    mean_before, mean_after = mean_metrics(before, names), mean_metrics(after, names)
    per_query = []
    for q in qids:
        row: dict[str, Any] = {"query_id": q}
        for m in names:
            row[m] = {"before": before[q][m], "after": after[q][m], "delta": after[q][m] - before[q][m]}
        per_query.append(row)
    deltas = [after[q]["nDCG@10"] - before[q]["nDCG@10"] for q in qids]
    return {
        "dataset": dataset,
        "first_stage": first_stage,
        "top_k": k,
        "model": model,
        "random_weights": random_weights,
        "queries": len(qids),
        "skipped_queries": dict(skipped),
        "metrics": {
            m: {"before": mean_before[m], "after": mean_after[m], "delta": mean_after[m] - mean_before[m]}
            for m in names
        },
        "ndcg@10_queries": {
            "improved": sum(d > 1e-12 for d in deltas),
            "unchanged": sum(abs(d) <= 1e-12 for d in deltas),
            "worse": sum(d < -1e-12 for d in deltas),
        },
        "pairs": stats.pairs,
        "requests": stats.requests,
        "rerank_seconds": stats.seconds,
        "pairs_per_second": stats.pairs / stats.seconds if stats.seconds > 0 else math.nan,
        "per_query": per_query,
    }


def to_markdown(report: Mapping[str, Any], worst_best: int = 5) -> str:
    lines = [
        f"## lychee-rerank eval: {report['dataset']}",
        "",
        f"{report['queries']} queries ({len(report['skipped_queries'])} skipped), first stage "
        f"{report['first_stage']}, top {report['top_k']} reranked by {report['model']}",
        "",
    ]
    if report["random_weights"]:
        lines += [f"**Note: {RANDOM_NOTE}.**", ""]
    lines += ["| metric | before | after | Δ |", "|---|---:|---:|---:|"]
    for m, v in report["metrics"].items():
        lines.append(f"| {m} | {v['before']:.4f} | {v['after']:.4f} | {v['delta']:+.4f} |")
    c = report["ndcg@10_queries"]
    lines += [
        "",
        f"nDCG@10 per query: {c['improved']} improved, {c['unchanged']} unchanged, {c['worse']} worse. "
        f"{report['pairs']} pairs in {report['rerank_seconds']:.2f} s "
        f"({report['pairs_per_second']:.1f} pairs/s, {report['requests']} requests).",
    ]
    moved = sorted(report["per_query"], key=lambda r: r["nDCG@10"]["delta"])
    losses = [r for r in moved if r["nDCG@10"]["delta"] < -1e-12][:worst_best]
    gains = [r for r in reversed(moved) if r["nDCG@10"]["delta"] > 1e-12][:worst_best]
    for title, rows in (("Largest gains", gains), ("Largest losses", losses)):
        if rows:
            lines += ["", f"{title} (nDCG@10):", "", "| query | before | after | Δ |", "|---|---:|---:|---:|"]
            for r in rows:
                v = r["nDCG@10"]
                lines.append(
                    f"| {r['query_id']} | {v['before']:.4f} | {v['after']:.4f} | {v['delta']:+.4f} |"
                )
    return "\n".join(lines) + "\n"


def write_trec_run(
    path: Path, run: Mapping[str, Sequence[str]], scores: Mapping[str, Mapping[str, float]]
) -> None:
    with path.open("w", encoding="utf-8") as f:
        for qid, docs in run.items():
            for rank, d in enumerate(docs, 1):
                f.write(f"{qid} Q0 {d} {rank} {scores[qid][d]:.8f} lychee\n")


# -- command line ---------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("--split", help="qrels/<split>.tsv to use (default: test, or the only file)")
    parser.add_argument("--run", type=Path, help="first-stage TREC run file (default: BM25 over the corpus)")
    parser.add_argument("--top-k", type=int, default=100, help="candidates reranked per query (default 100)")
    parser.add_argument("--instruction", help="task instruction (default: the model's web-search one)")
    parser.add_argument("--max-queries", type=int, help="evaluate only the first N counted queries")
    parser.add_argument("--batch-size", type=int, default=32, help="documents per request (default 32)")
    parser.add_argument("--concurrency", type=int, default=4, help="queries in flight at once (default 4)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="a running server, host:port")
    where.add_argument("--model", help="score in-process with this checkpoint (dir or hub id)")
    parser.add_argument("--api-key", help="bearer token for --target (or LYCHEE_API_KEY)")
    parser.add_argument("--tls-ca", type=Path, help="PEM root certificate: use TLS to --target")
    parser.add_argument("--device", default="auto", help="in-process device (auto, cpu, cuda)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--json", type=Path, dest="json_out", help="write the full report as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown report here too")
    parser.add_argument("--save-run", type=Path, help="write the reranked run here (TREC format)")


def _fail(message: str) -> int:
    print(f"lychee-rerank eval: {message}", file=sys.stderr)
    return 2


def run_eval(ns: argparse.Namespace) -> int:
    for name in ("top_k", "batch_size", "concurrency", "max_queries"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1")
    try:
        bench = load_benchmark(ns.dataset, ns.split)
        qids, skipped = evaluated_queries(bench)
        if ns.max_queries is not None:
            qids = qids[: ns.max_queries]
        if not qids:
            return _fail("no query has both a line in queries.jsonl and a relevant judgment")
        if ns.run is not None:
            full = read_trec_run(ns.run)
            unknown = sorted({d for q in qids for d in full.get(q, ())[: ns.top_k] if d not in bench.corpus})
            if unknown:
                raise EvalError(
                    f"the run names {len(unknown)} documents not in corpus.jsonl, e.g. {unknown[:3]}"
                )
            first_stage = {q: full.get(q, [])[: ns.top_k] for q in qids}
            first_name = f"run {ns.run.name}"
        else:
            first_stage = bm25_run(bench.corpus, bench.queries, qids, ns.top_k)
            first_name = "BM25 (rank-bm25 Okapi)"
    except EvalError as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"cannot read the benchmark: {err}")
    except ImportError as err:
        return _fail(f"{err.name} is missing: pip install 'lychee-rerank[eval]'")

    from lychee.rerank.client import LycheeError

    try:
        reranked, scores, stats, model, random_weights = asyncio.run(_rerank(ns, bench, first_stage, qids))
    except LycheeError as err:
        print(f"lychee-rerank eval: reranking failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    try:
        before = evaluate(bench.qrels, first_stage, qids, ns.top_k)
        after = evaluate(bench.qrels, reranked, qids, ns.top_k)
    except ImportError as err:
        return _fail(f"{err.name} is missing: pip install 'lychee-rerank[eval]'")
    report = build_report(
        dataset=ns.dataset.resolve().name,
        first_stage=first_name,
        k=ns.top_k,
        qids=qids,
        skipped=skipped,
        before=before,
        after=after,
        stats=stats,
        model=model,
        random_weights=random_weights,
    )
    markdown = to_markdown(report)
    if random_weights:
        print(f"lychee-rerank eval: note: {RANDOM_NOTE}", file=sys.stderr)
    sys.stdout.write(markdown)
    if ns.markdown is not None:
        ns.markdown.write_text(markdown, encoding="utf-8")
    if ns.json_out is not None:
        ns.json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if ns.save_run is not None:
        write_trec_run(ns.save_run, reranked, scores)
    return 0


async def _rerank(
    ns: argparse.Namespace, bench: Benchmark, first_stage: Mapping[str, Sequence[str]], qids: Sequence[str]
) -> tuple[dict[str, list[str]], dict[str, dict[str, float]], RerankStats, str, bool]:
    from rich.console import Console
    from rich.progress import Progress

    from lychee.rerank.client import AsyncLycheeClient

    server: Any = None
    if ns.target is not None:
        target = ns.target
        api_key = ns.api_key or os.environ.get("LYCHEE_API_KEY")
        tls_ca = ns.tls_ca.read_bytes() if ns.tls_ca is not None else None
    else:
        from lychee_server.app import build_server
        from lychee_server.settings import Settings

        settings = Settings(
            model=ns.model, device=ns.device, host="127.0.0.1", port=0, metrics_port=None, warmup=False
        )
        server = build_server(settings)
        await server.start()
        target, api_key, tls_ca = server.address, None, None
    try:
        async with AsyncLycheeClient(
            target, api_key=api_key, root_certificates=tls_ca, timeout=ns.timeout
        ) as client:
            info = await client.server_info()
            console = Console(stderr=True)
            with Progress(console=console, disable=not console.is_terminal, transient=True) as bar:
                task = bar.add_task("reranking", total=len(qids))
                reranked, scores, stats = await rerank_run(
                    client,
                    bench,
                    first_stage,
                    qids,
                    instruction=ns.instruction,
                    batch_size=ns.batch_size,
                    concurrency=ns.concurrency,
                    on_query=lambda: bar.advance(task),
                )
    finally:
        if server is not None:
            await server.stop(grace=0)
    return reranked, scores, stats, info.model_id, info.random_weights
