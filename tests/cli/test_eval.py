"""``lychee-rerank eval``: metrics against hand-computed values and pytrec_eval, the BEIR reader,
and the command end to end on the knowledge-base export (a real server and in-process)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pytrec_eval")
pytest.importorskip("rank_bm25")

import pytrec_eval

from lychee_server.eval import (
    EvalError,
    Item,
    bm25_run,
    evaluate,
    evaluated_queries,
    load_benchmark,
    metric_names,
    read_trec_run,
    rerank_run,
)

ROOT = Path(__file__).resolve().parents[2]
EXPORT = ROOT / "examples" / "knowledge_base" / "export_beir.py"
L2 = math.log2


# -- metrics: hand-computed -------------------------------------------------------------------------


def test_graded_relevance_by_hand() -> None:
    qrels = {"q": {"a": 2, "b": 1, "c": 0}}
    got = evaluate(qrels, {"q": ["c", "a", "x", "b"]}, ["q"], k=4)["q"]
    # DCG = 2/log2(3) + 1/log2(5); ideal = 2/log2(2) + 1/log2(3); gains are the grades (trec_eval).
    assert got["nDCG@10"] == pytest.approx((2 / L2(3) + 1 / L2(5)) / (2 + 1 / L2(3)), abs=1e-9)
    assert got["MRR@10"] == pytest.approx(1 / 2)  # "c" is judged 0: not relevant
    assert (got["Recall@1"], got["Recall@4"], got["Recall@5"], got["Recall@10"]) == (0.0, 1.0, 1.0, 1.0)
    ideal = evaluate(qrels, {"q": ["a", "b", "c"]}, ["q"], k=3)["q"]
    assert ideal["nDCG@10"] == pytest.approx(1.0) and ideal["MRR@10"] == 1.0
    half = evaluate(qrels, {"q": ["b", "x"]}, ["q"], k=2)["q"]  # "a" (grade 2) never retrieved
    assert half["nDCG@10"] == pytest.approx(1 / (2 + 1 / L2(3)))
    assert (half["Recall@1"], half["Recall@2"]) == (0.5, 0.5)


def test_cutoffs_and_missing_candidates() -> None:
    qrels = {"q": {"hit": 1}, "empty": {"hit": 1}}
    ranked = [f"n{i}" for i in range(10)] + ["hit"]  # the relevant document at rank 11
    got = evaluate(qrels, {"q": ranked}, ["q", "empty"], k=20)
    assert got["q"]["MRR@10"] == 0.0 and got["q"]["nDCG@10"] == 0.0
    assert got["q"]["Recall@10"] == 0.0 and got["q"]["Recall@20"] == 1.0
    assert got["empty"] == dict.fromkeys(metric_names(20), 0.0)  # counted, nothing retrieved: zeros
    assert metric_names(10) == ["nDCG@10", "MRR@10", "Recall@1", "Recall@5", "Recall@10"]


def test_which_queries_count() -> None:
    from lychee_server.eval import Benchmark

    bench = Benchmark(
        corpus={"d": Item("d", "x")},
        queries={"q1": Item("q1", "a"), "q0": Item("q0", "b"), "qz": Item("qz", "c")},
        qrels={"q1": {"d": 1}, "q0": {"d": 0}, "gone": {"d": 2}},
    )
    counted, skipped = evaluated_queries(bench)
    assert counted == ["q1"]  # qz has no qrels at all: not a benchmark query
    assert skipped == {"q0": "no relevant document in the qrels", "gone": "not in queries.jsonl"}


def test_ties_follow_our_order_not_trec_evals(tmp_path: Path) -> None:
    # Equal scores: the run file's rank column decides. trec_eval itself would order ties by
    # document id, descending, and put "z" first.
    run_file = tmp_path / "run.trec"
    run_file.write_text("q Q0 a 1 5.0 t\nq Q0 z 2 5.0 t\nq Q0 m 3 1.0 t\nq Q0 a 9 0.5 t\n")
    run = read_trec_run(run_file)
    assert run == {"q": ["a", "z", "m"]}  # the duplicate line of "a" keeps its best score
    qrels = {"q": {"a": 1}}
    assert evaluate(qrels, run, ["q"], k=3)["q"]["MRR@10"] == 1.0
    raw = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(
        {"q": {"a": 5.0, "z": 5.0, "m": 1.0}}
    )
    assert raw["q"]["recip_rank"] == 0.5


async def test_rerank_ties_keep_first_stage_order() -> None:
    from lychee.rerank.client import RankedDocument

    class Fixed:
        """Scores by document text; c and a tie."""

        async def rerank(self, query: Any, docs: list[Any], **_: Any) -> Any:
            table = {"a": 0.5, "b": 0.9, "c": 0.5}
            results = [RankedDocument(index=i, score=table[d.text]) for i, d in enumerate(docs)]
            return type("R", (), {"results": sorted(results, key=lambda r: -r.score)})()

    from lychee_server.eval import Benchmark

    bench = Benchmark({d: Item(d, d) for d in "abc"}, {"q": Item("q", "query")}, {"q": {"a": 1}})
    run, scores, stats = await rerank_run(
        Fixed(), bench, {"q": ["c", "a", "b"]}, ["q"], instruction=None, batch_size=2, concurrency=1
    )
    assert run == {"q": ["b", "c", "a"]} and scores["q"] == {"a": 0.5, "b": 0.9, "c": 0.5}
    assert (stats.pairs, stats.requests) == (3, 2)  # slices of batch_size


# -- metrics: against pytrec_eval on random cases ---------------------------------------------------


def _reference(qrels: dict[str, int], ranked: list[str], k: int) -> dict[str, float]:
    """The textbook formulas, independent of the code under test."""
    rel = [qrels.get(d, 0) for d in ranked]
    dcg = sum(g / L2(i + 2) for i, g in enumerate(rel[:10]) if g > 0)
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:10]
    idcg = sum(g / L2(i + 2) for i, g in enumerate(ideal))
    first = next((i for i, g in enumerate(rel[:10]) if g >= 1), None)
    n_rel = sum(g >= 1 for g in qrels.values())
    out = {"nDCG@10": dcg / idcg if idcg else 0.0, "MRR@10": 0.0 if first is None else 1 / (first + 1)}
    for c in sorted({1, 5, 10, k}):
        out[f"Recall@{c}"] = sum(g >= 1 for g in rel[:c]) / n_rel
    return out


def test_random_cases_match_the_reference_and_the_library() -> None:
    rng = random.Random(7)
    docs = [f"d{i:02d}" for i in range(40)]
    qrels, run = {}, {}
    for q in range(60):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 12))
        qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        qrels[qid][judged[0]] = rng.choice([1, 2, 3])  # at least one relevant
        run[qid] = rng.sample(docs, rng.randint(1, 30))
    qids = list(qrels)
    got = evaluate(qrels, run, qids, k=30)
    # pytrec_eval on the raw lists with distinct scores (no ties, so its order is ours).
    direct = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.1,5,10,30"}).evaluate(
        {q: {d: 100.0 - i for i, d in enumerate(run[q])} for q in qids}
    )
    for q in qids:
        ref = _reference(qrels[q], run[q], 30)
        assert got[q] == pytest.approx(ref, abs=1e-9), q
        assert got[q]["nDCG@10"] == pytest.approx(direct[q]["ndcg_cut_10"], abs=1e-9)
        assert got[q]["Recall@30"] == pytest.approx(direct[q]["recall_30"], abs=1e-9)


# -- reading a benchmark ----------------------------------------------------------------------------


def _write_bench(root: Path, corpus: list[dict[str, Any]], queries: list[dict[str, Any]], qrels: str) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


def test_beir_reader_and_image_forms(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "a.png").write_bytes(png)
    b64 = base64.b64encode(png).decode()
    root = _write_bench(
        tmp_path,
        [
            {"_id": "t", "title": "Travel", "text": "Claims within 30 days."},
            {"_id": "p", "text": "", "image": "figs/a.png"},
            {"_id": 7, "title": "Inline", "image": b64},
            {"_id": "u", "text": "x", "image": f"data:image/png;base64,{b64}"},
        ],
        [{"_id": "q", "text": "travel claims", "image": "figs/a.png"}],
        "query-id\tcorpus-id\tscore\nq\tt\t2\nq\tp\t0\n",
    )
    bench = load_benchmark(root)
    assert bench.corpus["t"] == Item("t", "Travel Claims within 30 days.")
    assert bench.corpus["p"].text is None and bench.corpus["p"].image == root / "figs" / "a.png"
    assert bench.corpus["7"] == Item("7", "Inline", png) and bench.corpus["u"].image == png
    assert bench.queries["q"].image == root / "figs" / "a.png"
    assert bench.qrels == {"q": {"t": 2, "p": 0}}


@pytest.mark.parametrize(
    ("corpus", "match"),
    [
        ([{"_id": "a"}], "neither text nor an image"),
        ([{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}], "duplicate _id"),
        ([{"_id": "a", "text": "x", "image": "nope/missing.png"}], "neither a file"),
        ([{"text": "no id"}], "'_id'"),
    ],
)
def test_bad_benchmarks_are_eval_errors(tmp_path: Path, corpus: list[dict[str, Any]], match: str) -> None:
    root = _write_bench(tmp_path, corpus, [{"_id": "q", "text": "x"}], "q\ta\t1\n")
    with pytest.raises(EvalError, match=match):
        load_benchmark(root)


def test_bm25_first_stage() -> None:
    corpus = {
        "a": Item("a", "The cafeteria opens at 8 am."),
        "b": Item("b", "Travel expenses are refunded within 30 days."),
        "c": Item("c", None, b"img"),
        "d": Item("d", "Passwords rotate every 90 days."),
    }
    queries = {"q": Item("q", "When are travel expenses refunded?"), "img": Item("img", None, b"img")}
    run = bm25_run(corpus, queries, ["q", "img"], k=3)
    assert run["q"][0] == "b" and len(run["q"]) == 3
    assert run["img"] == ["a", "b", "c"]  # no query words: all tie, corpus order
    with pytest.raises(EvalError, match="--run"):  # an image-only corpus has nothing for BM25
        bm25_run({"c": corpus["c"]}, queries, ["q"], k=1)


# -- the command, end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def eval_server(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    from server_support import tiny_server

    async with tiny_server(request) as srv:
        yield srv


@pytest.fixture(scope="module")
def kb_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("langchain_core")
    out = tmp_path_factory.mktemp("kb-beir")
    subprocess.run([sys.executable, str(EXPORT), str(out)], check=True, timeout=120)
    return out


async def _cli(*args: str) -> tuple[int, str, str]:
    # asyncio subprocess: the server lives on this event loop and must keep serving meanwhile.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lychee_server.cli",
        "eval",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=240)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_eval_on_the_knowledge_base_through_a_server(
    eval_server: Any, kb_export: Path, tmp_path: Path
) -> None:
    report_file, saved = tmp_path / "report.json", tmp_path / "reranked.trec"
    code, out, err = await _cli(
        str(kb_export),
        "--run",
        str(kb_export / "run.trec"),
        "--top-k",
        "6",
        "--target",
        eval_server.address,
        "--json",
        str(report_file),
        "--save-run",
        str(saved),
    )
    assert code == 0, err
    assert "random weights" in err and "carry no meaning" in out  # said plainly, twice
    assert "| nDCG@10 |" in out and "| Recall@6 |" in out
    report = json.loads(report_file.read_text())
    assert report["queries"] == 10 and report["skipped_queries"] == {} and report["random_weights"]
    assert report["pairs"] == 60 and report["pairs_per_second"] > 0
    assert list(report["metrics"]) == metric_names(6)

    # "before" is the run file's top 6, scored by pytrec_eval directly; recall@k cannot move.
    bench = load_benchmark(kb_export)
    qids, _ = evaluated_queries(bench)
    first = {q: docs[:6] for q, docs in read_trec_run(kb_export / "run.trec").items()}
    before = evaluate(bench.qrels, first, qids, 6)
    for m, v in report["metrics"].items():
        assert v["before"] == pytest.approx(sum(before[q][m] for q in qids) / len(qids), abs=1e-9)
    assert report["metrics"]["Recall@6"]["after"] == pytest.approx(report["metrics"]["Recall@6"]["before"])

    # "after" is the server's ranking: the saved run against the client's own scores.
    reranked = read_trec_run(saved)
    assert {q: sorted(d) for q, d in reranked.items()} == {q: sorted(first[q]) for q in qids}
    after = evaluate(bench.qrels, reranked, qids, 6)
    assert report["metrics"]["nDCG@10"]["after"] == pytest.approx(
        sum(after[q]["nDCG@10"] for q in qids) / len(qids), abs=1e-9
    )
    from lychee.rerank.client import AsyncLycheeClient, Doc, Query

    q = bench.queries["q-screenshot"]  # the image + text query
    async with AsyncLycheeClient(eval_server.address) as client:
        direct = await client.rerank(
            Query(text=q.text, image=q.image),
            [Doc(text=bench.corpus[d].text, image=bench.corpus[d].image) for d in first["q-screenshot"]],
        )
    assert reranked["q-screenshot"] == [first["q-screenshot"][r.index] for r in direct.results]


async def test_eval_in_process_with_bm25(tiny_checkpoint: Path, kb_export: Path, tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    code, out, err = await _cli(
        str(kb_export),
        "--model",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--top-k",
        "4",
        "--max-queries",
        "3",
        "--json",
        str(report_file),
    )
    assert code == 0, err
    report = json.loads(report_file.read_text())
    assert report["first_stage"].startswith("BM25") and report["queries"] == 3 and report["pairs"] == 12
    assert len(report["per_query"]) == 3 and "carry no meaning" in out


async def test_eval_reports_unusable_input(kb_export: Path, tmp_path: Path) -> None:
    code, _, err = await _cli(str(tmp_path / "nowhere"), "--target", "127.0.0.1:1")
    assert code == 2 and "not a directory" in err
    bad_run = tmp_path / "bad.trec"
    bad_run.write_text("q-vacation Q0 no-such-doc 1 1.0 t\n")
    code, _, err = await _cli(str(kb_export), "--run", str(bad_run), "--target", "127.0.0.1:1")
    assert code == 2 and "not in corpus.jsonl" in err
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = await _cli(str(kb_export), "--target", f"127.0.0.1:{port}", "--timeout", "2")
    assert code == 1 and "UnavailableError" in err
