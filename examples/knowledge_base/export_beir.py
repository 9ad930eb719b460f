"""Export the generated knowledge base as a small retrieval benchmark in the BEIR layout.

    python examples/knowledge_base/export_beir.py /tmp/kb-beir
    lychee-rerank eval /tmp/kb-beir --target localhost:50051                 # BM25 first stage
    lychee-rerank eval /tmp/kb-beir --run /tmp/kb-beir/run.trec --target ... # the example's retriever

Writes ``corpus.jsonl`` (the 20 text chunks, ``title`` = their source, and the three figures,
``text`` = caption, ``image`` = a PNG under ``images/`` or inline base64), ``queries.jsonl``
(employee questions, one of them an image + text query), ``qrels/test.tsv`` with graded
judgments (2 = answers the question, 1 = related, 0 = judged not relevant), and ``run.trec``:
the example's own first stage (the hashed bag-of-words ``InMemoryVectorStore`` of ``kb.py``)
as a TREC run. Everything is generated locally and deterministically.

The judgments are written by hand for this corpus. They are enough to exercise the harness end
to end; with a random-weight test checkpoint the resulting numbers mean nothing.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kb import TEXT_CHUNKS, architecture_diagram, bar_chart, build_vector_store, vpn_screenshot

# (id, text, image file name or None, {doc id: relevance})
QUERIES: list[tuple[str, str, str | None, dict[str, int]]] = [
    (
        "q-travel-claim",
        "How long do I have to submit my travel expense claim?",
        None,
        {"hr-travel-1": 2, "hr-travel-3": 1, "hr-travel-2": 0},
    ),
    (
        "q-vpn-reset",
        "How do I reset my VPN password?",
        None,
        {"it-vpn-2": 2, "fig-vpn": 2, "it-vpn-1": 1, "it-pw-1": 1},
    ),
    (
        "q-tickets",
        "Which region had the most support tickets last quarter?",
        None,
        {"fig-tickets": 2, "ops-support-1": 1},
    ),
    (
        "q-request-flow",
        "How does a request travel from the load balancer to the database?",
        None,
        {"fig-architecture": 2, "eng-arch-1": 1, "eng-arch-2": 1},
    ),
    ("q-vacation", "How many vacation days do I earn each month?", None, {"hr-leave-1": 2, "hr-leave-2": 0}),
    ("q-abroad", "Can I work remotely from another country?", None, {"hr-remote-1": 2}),
    (
        "q-purchase",
        "Who has to approve a purchase of 8000 EUR?",
        None,
        {"fin-budget-1": 2, "fin-invoice-1": 0},
    ),
    ("q-phishing", "What should I do with a suspicious email?", None, {"sec-incident-1": 2, "sec-data-2": 0}),
    (
        "q-sev1",
        "What happens when a severity 1 incident is raised?",
        None,
        {"ops-support-2": 2, "ops-support-1": 0},
    ),
    (
        "q-screenshot",
        "What does the red button in this dialog do?",
        "query-vpn-dialog.png",
        {"it-vpn-2": 2, "fig-vpn": 1},
    ),
]


def export(out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    chart, screenshot, diagram = bar_chart(), vpn_screenshot(), architecture_diagram()
    (out / "images" / "fig-tickets.png").write_bytes(chart)
    (out / "images" / "fig-vpn.png").write_bytes(screenshot)
    (out / "images" / "query-vpn-dialog.png").write_bytes(screenshot)

    corpus = [{"_id": doc_id, "title": source, "text": text} for doc_id, source, text in TEXT_CHUNKS]
    corpus += [
        {
            "_id": "fig-tickets",
            "title": "Support operations",
            "text": "Figure: support tickets per region in Q3",
            "image": "images/fig-tickets.png",
        },
        {
            "_id": "fig-vpn",
            "title": "IT manual",
            "text": "Screenshot: VPN Settings dialog of the Corporate Connect app",
            "image": "images/fig-vpn.png",
        },
        {
            "_id": "fig-architecture",
            "title": "Architecture",
            "text": "Diagram: request flow from the load balancer to the database",
            "image": base64.b64encode(diagram).decode(),
        },  # inline: the other form `image` may take
    ]
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for row in corpus:
            f.write(json.dumps(row) + "\n")
    with (out / "queries.jsonl").open("w", encoding="utf-8") as f:
        for qid, text, image, _ in QUERIES:
            row = {"_id": qid, "text": text} | ({"image": f"images/{image}"} if image else {})
            f.write(json.dumps(row) + "\n")
    with (out / "qrels" / "test.tsv").open("w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, _, _, judged in QUERIES:
            for doc_id, rel in judged.items():
                f.write(f"{qid}\t{doc_id}\t{rel}\n")

    # The example's first stage, every document ranked, as a TREC run.
    store = build_vector_store()
    with (out / "run.trec").open("w", encoding="utf-8") as f:
        for qid, text, _, _ in QUERIES:
            hits = store.similarity_search_with_score(text, k=len(corpus))
            for rank, (doc, score) in enumerate(hits, 1):
                f.write(f"{qid} Q0 {doc.id} {rank} {score:.6f} hashed-bow\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("out", type=Path, help="output folder (created)")
    export(p.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
