"""Rerank a generated enterprise knowledge base with Lychee inside a LangChain chain.

    python examples/knowledge_base/run.py --target localhost:50051

Pipeline per question: a crude first-stage retriever (InMemoryVectorStore, hashed
bag-of-words) returns ``--fetch-k`` candidates; ``ContextualCompressionRetriever`` with
``LycheeRerank`` keeps the best ``--top-n``, text and figures alike; an LCEL chain formats them
as the context block an LLM prompt would get, and prints it. The last question also runs
through the async path (``ainvoke``, grpc.aio).

Exit status: 0 on success, 1 when anything fails (server unreachable, request rejected,
malformed output), so CI can run it end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kb import build_vector_store
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from langchain_lychee import LycheeRerank
from lychee.rerank.client import LycheeClient, LycheeError, ServerInfo

QUESTIONS = [
    "How long do I have to submit my travel expense claim?",
    "How do I reset my VPN password?",
    "Which region had the most support tickets last quarter?",
    "How does a request travel from the load balancer to the database?",
]
INSTRUCTION = "Given an employee's question, retrieve the knowledge-base passage or figure that answers it"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--target", default="localhost:50051", help="server address HOST:PORT")
    p.add_argument(
        "--api-key", default=os.environ.get("LYCHEE_API_KEY"), help="bearer token ($LYCHEE_API_KEY)"
    )
    p.add_argument("--tls-ca", type=Path, help="PEM root certificate: connect with TLS")
    p.add_argument("--top-n", type=int, default=3, help="documents kept after reranking")
    p.add_argument("--fetch-k", type=int, default=8, help="candidates from the first-stage retriever")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline per rerank call, seconds")
    return p.parse_args(argv)


def describe(info: ServerInfo) -> str:
    lines = [
        f"server {info.server_version}: model {info.model_id} ({info.dtype} on {info.device})",
        f"  query modalities: {sorted(info.query_modalities)}, documents: {sorted(info.document_modalities)}",
        f"  max documents {info.limits.max_documents}, max message {info.limits.max_message_bytes} bytes",
    ]
    if info.random_weights:
        lines.append(
            "  NOTE: this server runs a random-weight test checkpoint -- the scores below carry no "
            "meaning; the example only demonstrates the plumbing."
        )
    return "\n".join(lines)


def format_docs(docs: list[Document]) -> str:
    """The reranked context as an LLM prompt would receive it (figures referenced by caption)."""
    blocks = []
    for rank, doc in enumerate(docs, 1):
        kind = "figure" if "image" in doc.metadata else "text"
        score = doc.metadata["relevance_score"]
        blocks.append(
            f"[{rank}] ({kind}, {doc.metadata['source']}, id={doc.id}, score={score:.4f})\n{doc.page_content}"
        )
    return "\n".join(blocks)


def render(inputs: dict[str, Any]) -> str:
    return f"Question: {inputs['question']}\nContext:\n{inputs['context']}\n"


def build_chain(args: argparse.Namespace) -> tuple[Runnable[str, str], ContextualCompressionRetriever]:
    reranker = LycheeRerank(
        target=args.target,
        api_key=args.api_key,
        tls_root_cert=args.tls_ca,
        instruction=INSTRUCTION,
        top_n=args.top_n,
        timeout=args.timeout,
    )
    retriever = ContextualCompressionRetriever(
        base_compressor=reranker,
        base_retriever=build_vector_store().as_retriever(search_kwargs={"k": args.fetch_k}),
    )

    def check(docs: list[Document]) -> list[Document]:
        # Fail loudly (non-zero exit) if the pipeline ever returns something malformed.
        if not 0 < len(docs) <= args.top_n:
            raise RuntimeError(f"expected 1..{args.top_n} reranked documents, got {len(docs)}")
        scores = [d.metadata["relevance_score"] for d in docs]
        if scores != sorted(scores, reverse=True):
            raise RuntimeError(f"documents are not sorted by relevance: {scores}")
        return docs

    chain: Runnable[str, str] = {
        "context": retriever | RunnableLambda(check) | RunnableLambda(format_docs),
        "question": RunnablePassthrough(),
    } | RunnableLambda(render)
    return chain, retriever


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with LycheeClient(
            args.target, api_key=args.api_key, root_certificates=args.tls_ca, timeout=args.timeout
        ) as client:
            print(describe(client.server_info()), end="\n\n")
        chain, _ = build_chain(args)
        for question in QUESTIONS[:-1]:
            print(chain.invoke(question))
        print("(async path)")
        print(asyncio.run(chain.ainvoke(QUESTIONS[-1])))
    except (LycheeError, ValueError, TimeoutError, RuntimeError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
