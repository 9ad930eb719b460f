"""A small, self-generated enterprise knowledge base: policy/manual chunks and three figures.

Everything is produced locally and deterministically (no downloads): the text chunks below,
and images drawn with Pillow -- a bar chart, a fake UI screenshot and an architecture diagram.
The figures are attached to their documents in the three image forms ``LycheeRerank`` reads
from ``metadata["image"]``: raw bytes, a ``data:`` URI and a LangChain image content block.

The first-stage retriever is LangChain's ``InMemoryVectorStore`` over a tiny hashed
bag-of-words embedding: cheap, deterministic and deliberately crude, which is exactly the
situation a reranker is for (recall from a fast retriever, precision from the reranker).
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import math
import re

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore
from PIL import Image, ImageDraw

TEXT_CHUNKS: list[tuple[str, str, str]] = [
    ("hr-travel-1", "Travel policy", "Submit travel expense claims within 30 days of the trip's end date."),
    ("hr-travel-2", "Travel policy", "Economy class is required for flights shorter than six hours."),
    ("hr-travel-3", "Travel policy", "Hotel costs are refunded up to 180 EUR per night in major cities."),
    ("hr-leave-1", "Leave policy", "Employees accrue 2.5 days of paid vacation per month worked."),
    ("hr-leave-2", "Leave policy", "Parental leave requests go to HR at least eight weeks in advance."),
    ("hr-remote-1", "Remote work", "Remote work from abroad is allowed for up to 20 working days a year."),
    (
        "it-vpn-1",
        "IT manual",
        "Connect to the VPN with the Corporate Connect app before opening intranet pages.",
    ),
    ("it-vpn-2", "IT manual", "To reset your VPN password open VPN Settings and press Reset password."),
    ("it-pw-1", "IT manual", "Passwords must have 14 characters and are rotated every 90 days."),
    ("it-mfa-1", "IT manual", "Multi-factor authentication uses the Authenticator app or a hardware key."),
    ("it-laptop-1", "IT manual", "Lost laptops must be reported to the service desk within one hour."),
    ("sec-data-1", "Security policy", "Customer data may only be stored in approved EU data centres."),
    ("sec-data-2", "Security policy", "Confidential documents must be encrypted before leaving the company."),
    (
        "sec-incident-1",
        "Security policy",
        "Report phishing emails with the Report button in the mail client.",
    ),
    ("fin-budget-1", "Finance", "Purchases above 5000 EUR need approval from the budget owner and finance."),
    ("fin-invoice-1", "Finance", "Supplier invoices are paid 45 days after receipt."),
    ("ops-support-1", "Support operations", "Support tickets are triaged within four business hours."),
    ("ops-support-2", "Support operations", "Severity 1 incidents page the on-call engineer immediately."),
    (
        "eng-arch-1",
        "Architecture",
        "All public traffic enters through the load balancer and the API gateway.",
    ),
    ("eng-arch-2", "Architecture", "The API service writes to the primary database and reads from replicas."),
]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bar_chart() -> bytes:
    """Support tickets per region, Q3: EMEA is the tallest bar."""
    img = Image.new("RGB", (320, 220), "white")
    d = ImageDraw.Draw(img)
    d.text((70, 8), "Support tickets per region, Q3", fill="black")
    d.line((30, 190, 300, 190), fill="black")
    for i, (label, value, colour) in enumerate(
        [("EMEA", 150, "#d9534f"), ("APAC", 90, "#5bc0de"), ("AMER", 120, "#5cb85c")]
    ):
        x = 50 + i * 85
        d.rectangle((x, 190 - value, x + 50, 190), fill=colour, outline="black")
        d.text((x + 8, 195), label, fill="black")
        d.text((x + 12, 175 - value), str(value * 10), fill="black")
    return _png(img)


def vpn_screenshot() -> bytes:
    """A fake 'VPN Settings' dialog with a 'Reset password' button."""
    img = Image.new("RGB", (320, 200), "#ececec")
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 319, 24), fill="#2b5797")
    d.text((8, 6), "Corporate Connect - VPN Settings", fill="white")
    for row, label in enumerate(["Server", "Username", "Password"]):
        y = 40 + row * 36
        d.text((16, y + 4), label, fill="black")
        d.rectangle((100, y, 300, y + 22), fill="white", outline="#999999")
    d.text((106, 44), "vpn.example.com", fill="black")
    d.text((106, 116), "**********", fill="black")
    d.rectangle((180, 160, 300, 188), fill="#d9534f", outline="black")
    d.text((196, 168), "Reset password", fill="white")
    return _png(img)


def architecture_diagram() -> bytes:
    """Load balancer -> API gateway -> API service -> primary database (+ replica)."""
    img = Image.new("RGB", (420, 180), "white")
    d = ImageDraw.Draw(img)
    boxes = [("Load balancer", 10), ("API gateway", 115), ("API service", 220), ("Primary DB", 325)]
    for label, x in boxes:
        d.rectangle((x, 60, x + 85, 100), outline="black", fill="#f0f0ff")
        d.text((x + 6, 74), label, fill="black")
    for (_, x1), (_, x2) in itertools.pairwise(boxes):
        d.line((x1 + 85, 80, x2, 80), fill="black", width=2)
        d.polygon([(x2, 80), (x2 - 7, 76), (x2 - 7, 84)], fill="black")
    d.rectangle((325, 130, 410, 165), outline="black", fill="#fff0f0")
    d.text((333, 142), "Read replica", fill="black")
    d.line((262, 100, 325, 147), fill="black", width=2)
    return _png(img)


def build_documents() -> list[Document]:
    """About 20 text chunks plus three figure documents (text caption + image)."""
    docs = [
        Document(id=doc_id, page_content=text, metadata={"source": source})
        for doc_id, source, text in TEXT_CHUNKS
    ]
    chart = bar_chart()
    screenshot = base64.b64encode(vpn_screenshot()).decode()
    diagram = base64.b64encode(architecture_diagram()).decode()
    docs += [
        Document(
            id="fig-tickets",
            page_content="Figure: support tickets per region in Q3",
            metadata={"source": "Support operations", "image": chart},
        ),
        Document(
            id="fig-vpn",
            page_content="Screenshot: VPN Settings dialog of the Corporate Connect app",
            metadata={
                "source": "IT manual",
                "image": {"type": "image", "base64": screenshot, "mime_type": "image/png"},
            },
        ),
        Document(
            id="fig-architecture",
            page_content="Diagram: request flow from the load balancer to the database",
            metadata={"source": "Architecture", "image": f"data:image/png;base64,{diagram}"},
        ),
    ]
    return docs


class HashedBagOfWords(Embeddings):
    """Deterministic local embedding: hashed word counts, L2-normalised. No model, no network."""

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim

    def _embed(self, text: str) -> list[float]:
        vec = [0.0] * self.dim
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big")
            vec[bucket % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._embed(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._embed(text)


def build_vector_store() -> InMemoryVectorStore:
    store = InMemoryVectorStore(HashedBagOfWords())
    store.add_documents(build_documents())
    return store
