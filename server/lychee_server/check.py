"""``lychee-rerank check``: the engine's scores against the naive reference recipe, on any model.

The golden tests prove the optimised engine equal to a one-pair-at-a-time reference on the tiny test
checkpoint. This command runs the same comparison on whatever model the engine loads: a real
checkpoint (``--model DIR``, to confirm a deployment scores like the published recipe), or random
weights at a real architecture shape (``--random-weights --shape qwen2.5-vl-3b``), where head_dim
128, the [16, 24, 24] M-RoPE sections, grouped-query attention and the 32-layer windowed vision tower
are exercised as the tiny checkpoint cannot.

One request per query kind (text, image, text + image), each with documents of every kind (short
and longer text, images of odd sizes, one under min_pixels, text + image), plus one image above
max_pixels for the text query: every pair goes through the engine as one request (prefix reuse,
length-grouped batches) and through :class:`NaiveRecipe` (chat template + processor + full forward +
full-vocabulary logits). Exit 1 if any |p_engine - p_naive| exceeds ``--tolerance``.

The naive loop shares nothing with the engine but the weights: the recipe's system prompt and message
layout are typed out here again (not taken from ``domain`` / ``engine.recipe``), images are decoded
with PIL here, the processor is loaded again from the checkpoint with the recipe's pixel bounds (not
the engine's, whatever ``--min-pixels`` the loader applied), and the yes/no ids are the tokenizer's
encodings of the two words. So a template, id or pixel-bound bug in the engine makes ``check`` fail.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["NaiveRecipe", "add_check_arguments", "kendall_tau", "run_check"]

# The published recipe (vec-ai/lychee-rerank-mm model card), typed here on purpose (see above).
RECIPE_SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
RECIPE_MIN_PIXELS = 4 * 28 * 28
RECIPE_MAX_PIXELS = 1280 * 28 * 28


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``check`` flags on ``parser`` (the CLI owns the sub-command)."""
    from lychee_server.bench import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="Largest allowed |p_engine - p_naive| (default 1e-5 in float32, 2e-2 otherwise).",
    )
    parser.add_argument(
        "--bf16-ranking",
        action="store_true",
        help="Also rank --ranking-docs documents per query in float32 and again with the model cast to "
        "bfloat16, and report Kendall's tau between the two rankings (needs --dtype float32).",
    )
    parser.add_argument(
        "--ranking-docs", type=int, default=24, help="Documents per query for --bf16-ranking."
    )
    parser.add_argument(
        "--min-tau", type=float, default=0.99, help="Exit 1 if the --bf16-ranking tau is lower."
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the report here.")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave default).")


@dataclass
class CheckRow:
    query: str
    document: str
    engine_p: float
    naive_p: float
    abs_diff_p: float
    abs_diff_logit: float


class NaiveRecipe:
    """The recipe the plain way, over the engine's weights: one pair at a time, whole-string
    tokenization (check's inputs spell no special token), the processor's own image pipeline, the
    full vocabulary's last-position logits, softmax over (no, yes)."""

    def __init__(self, source: str, revision: str | None, model: Any, device: Any) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(source, revision=revision or None)  # type: ignore[no-untyped-call]
        self.processor.image_processor.size = {
            "shortest_edge": RECIPE_MIN_PIXELS,
            "longest_edge": RECIPE_MAX_PIXELS,
        }
        tok = self.processor.tokenizer
        ids = {w: tok.encode(w, add_special_tokens=False) for w in ("no", "yes")}
        if any(len(v) != 1 for v in ids.values()):
            raise SystemExit(f"the tokenizer does not encode 'no' / 'yes' as one token each: {ids}")
        self.no_id, self.yes_id = ids["no"][0], ids["yes"][0]
        self._special = [t.content for t in tok.added_tokens_decoder.values() if t.special]
        self.model = model
        self.device = device

    @staticmethod
    def messages(instruction: str, query: Any, doc: Any) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [
            {"type": "text", "text": "<Instruct>: " + instruction},
            {"type": "text", "text": "<Query>:"},
        ]
        if query.image is not None:
            content.append({"type": "image"})
        if query.text is not None:
            content.append({"type": "text", "text": query.text})
        content.append({"type": "text", "text": "\n<Document>:"})
        if doc.image is not None:
            content.append({"type": "image"})
        if doc.text is not None:
            content.append({"type": "text", "text": doc.text})
        return [
            {"role": "system", "content": [{"type": "text", "text": RECIPE_SYSTEM_PROMPT}]},
            {"role": "user", "content": content},
        ]

    @staticmethod
    def decode(data: bytes) -> Any:
        """PIL decode to RGB (check's inputs: RGB PNGs of at least 28 px a side)."""
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        img.load()
        if min(img.size) < 28:
            raise SystemExit("check's naive loop takes images of at least 28 px a side")
        return img.convert("RGB")

    def logit_diff(self, instruction: str, query: Any, doc: Any) -> float:
        import torch

        for text in (instruction, query.text, doc.text):
            if text and any(t in text for t in self._special):
                raise SystemExit("check's inputs must not spell special tokens (whole-string tokenization)")
        images = [self.decode(c.image.data) for c in (query, doc) if c.image is not None]
        text = self.processor.apply_chat_template(
            self.messages(instruction, query, doc), tokenize=False, add_generation_prompt=True
        )
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = self.model(**inputs).logits[0, -1].double()
        p = torch.softmax(torch.stack([logits[self.no_id], logits[self.yes_id]]), 0)
        return float(torch.log(p[1]) - torch.log(p[0]))


def _png(w: int, h: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 7 + seed * 40) % 256, (yy * 5 + seed * 17) % 256, ((xx + yy) * 3) % 256], -1)
    img = Image.fromarray(arr.astype(np.uint8), mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def golden_inputs() -> tuple[dict[str, Any], dict[str, Any]]:
    """Queries and documents of every modality (small, so a real-shape model runs them on a CPU);
    "small image" (40x30) is under the recipe's min_pixels, so the processor scales it up."""
    from lychee_server.domain import Content, ImageInput, MediaType

    def image(w: int, h: int, seed: int) -> ImageInput:
        return ImageInput(_png(w, h, seed), MediaType.PNG)

    queries = {
        "text": Content(text="what does the chart say about rainfall in spring"),
        "image": Content(image=image(96, 72, 1)),
        "text+image": Content(text="find more photos like this one", image=image(57, 91, 2)),
    }
    documents = {
        "text": Content(text="Spring rainfall rose by a fifth compared with the previous decade."),
        "long text": Content(
            text=" ".join(
                f"Paragraph {i}: rivers, rainfall and harvests across the region." for i in range(24)
            )
        ),
        "image": Content(image=image(120, 80, 3)),
        "odd image": Content(image=image(300, 40, 4)),
        "small image": Content(image=image(40, 30, 6)),
        "text+image": Content(text="A photo of a wet street in April.", image=image(64, 64, 5)),
    }
    return queries, documents


_WORDS = (  # noqa: SIM905 - one readable string
    "refund policy travel expense laptop password office holiday invoice badge vpn printer rainfall "
    "harvest river street photo chart spring decade"
).split()


def large_image_input() -> Any:
    """An image above the recipe's max_pixels (1100x960 = 1.06 Mpx > 1280*28*28), scored with the
    text query only: the processor scales it down (to 1064x924, 1254 LLM tokens)."""
    from lychee_server.domain import Content, ImageInput, MediaType

    return Content(image=ImageInput(_png(1100, 960, 7), MediaType.PNG))


def ranking_documents(n: int) -> list[Any]:
    """``n`` distinct documents (text, image, text + image) for the BF16 ranking comparison."""
    from lychee_server.domain import Content, ImageInput, MediaType

    docs: list[Any] = []
    for i in range(n):
        text = " ".join(_WORDS[(i * k + i) % len(_WORDS)] for k in range(1, 4 + i % 9))
        if i % 4 == 1:
            docs.append(Content(image=ImageInput(_png(40 + 9 * (i % 12), 56, i), MediaType.PNG)))
        elif i % 4 == 2:
            docs.append(Content(text=text, image=ImageInput(_png(64, 30 + 5 * (i % 12), i), MediaType.PNG)))
        else:
            docs.append(Content(text=text))
    return docs


def kendall_tau(a: list[float], b: list[float], min_gap: float = 0.0) -> float:
    """Kendall's tau between two score lists, over the pairs whose gap in ``a`` exceeds ``min_gap``."""
    concordant = discordant = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            if abs(a[i] - a[j]) <= min_gap:
                continue
            s = (a[i] - a[j]) * (b[i] - b[j])
            if s > 0:
                concordant += 1
            elif s < 0:
                discordant += 1
    return (concordant - discordant) / max(1, concordant + discordant)


def _rank_scores(engine: Any, queries: dict[str, Any], docs: list[Any]) -> dict[str, list[float]]:
    from lychee_server.domain import DEFAULT_INSTRUCTION

    out: dict[str, list[float]] = {}
    for name, query in queries.items():
        pq = engine.prepare_query(DEFAULT_INSTRUCTION, query, 3200)
        try:
            out[name] = engine.score([engine.prepare_pair(pq, d) for d in docs])
        finally:
            engine.release(pq)
    return out


def _cast_to_bf16(engine: Any) -> Any:
    """A new engine over ``engine``'s model cast to bfloat16 in place (``engine`` is spent after).

    The rotary ``inv_freq`` buffers stay float32, as ``from_pretrained`` leaves them in a BF16 model.
    """
    import dataclasses

    import torch

    from lychee_server.engine.qwen import QwenRerankEngine

    model = engine.model
    keep = {
        name: buf.detach().clone()
        for name, buf in model.named_buffers()
        if name.endswith("inv_freq") and buf.dtype == torch.float32
    }
    model.to(torch.bfloat16)
    for name, value in keep.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value
    engine.close()
    return QwenRerankEngine(dataclasses.replace(engine.loaded, dtype=torch.bfloat16), engine.settings)


def run_check(args: argparse.Namespace) -> int:
    """Compare engine and naive scores; print a table (and JSON). Returns an exit code."""
    import torch

    from lychee_server.bench import open_engine
    from lychee_server.domain import DEFAULT_INSTRUCTION
    from lychee_server.engine.interface import probability

    if args.threads:
        torch.set_num_threads(args.threads)
    engine, tmp = open_engine(args, batch_token_budget=16384, max_batch_pairs=64)
    info = engine.info  # the model as loaded (--bf16-ranking later swaps in a BF16 engine)
    tolerance = args.tolerance
    if tolerance is None:
        tolerance = 1e-5 if engine.dtype == torch.float32 else 2e-2
    queries, documents = golden_inputs()
    naive = NaiveRecipe(engine.settings.model, engine.settings.revision, engine.model, engine.device)
    rows: list[CheckRow] = []
    t_engine = t_naive = 0.0
    try:
        for qname, query in queries.items():
            these = dict(documents)
            if qname == "text":
                these["large image"] = large_image_input()
            t0 = time.perf_counter()
            pq = engine.prepare_query(DEFAULT_INSTRUCTION, query, 3200)
            try:
                pairs = [engine.prepare_pair(pq, d) for d in these.values()]
                diffs = engine.score(pairs)
            finally:
                engine.release(pq)
            t_engine += time.perf_counter() - t0
            for (dname, doc), diff in zip(these.items(), diffs, strict=True):
                t0 = time.perf_counter()
                ref = naive.logit_diff(DEFAULT_INSTRUCTION, query, doc)
                t_naive += time.perf_counter() - t0
                p, p_ref = probability(diff), probability(ref)
                rows.append(CheckRow(qname, dname, p, p_ref, abs(p - p_ref), abs(diff - ref)))
                print(
                    f"[check] {qname:>10} x {dname:<10} p={p:.6f} naive={p_ref:.6f} "
                    f"|dp|={abs(p - p_ref):.2e}",
                    file=sys.stderr,
                )
        ranking: dict[str, Any] | None = None
        if args.bf16_ranking:
            if engine.dtype != torch.float32:
                raise SystemExit("--bf16-ranking compares against float32: load with --dtype float32")
            docs = ranking_documents(args.ranking_docs)
            fp32 = _rank_scores(engine, queries, docs)
            engine = _cast_to_bf16(engine)
            bf16 = _rank_scores(engine, queries, docs)
            taus = {q: kendall_tau(fp32[q], bf16[q]) for q in queries}
            flat32 = [x for q in queries for x in fp32[q]]
            flat16 = [x for q in queries for x in bf16[q]]
            dev = max(abs(x - y) for x, y in zip(flat32, flat16, strict=True))
            ranking = {
                "documents_per_query": len(docs),
                "kendall_tau_per_query": taus,
                "min_kendall_tau": min(taus.values()),
                "max_abs_diff_logit": dev,
                # Pairs whose FP32 logits are farther apart than twice the largest BF16 move: the
                # ones BF16 noise alone cannot swap (near-ties below that are a coin toss).
                "kendall_tau_resolved_per_query": {
                    q: kendall_tau(fp32[q], bf16[q], 2 * dev) for q in queries
                },
                "fp32_logit_spread": [min(flat32), max(flat32)],
                "fp32_logits": fp32,
                "bf16_logits": bf16,
            }
            for q, tau in taus.items():
                print(
                    f"[check] bf16 ranking {q:>10}: Kendall tau {tau:.4f} over {len(docs)} docs",
                    file=sys.stderr,
                )
    finally:
        engine.close()
        if tmp is not None:
            tmp.cleanup()
    worst = max(r.abs_diff_p for r in rows)
    exact = math.isfinite(worst) and worst <= tolerance
    ok = exact
    if ranking is not None:
        ranking["min_tau"] = args.min_tau
        ranking["ok"] = ranking["min_kendall_tau"] >= args.min_tau
        ok = ok and ranking["ok"]
    report = {
        "model": info.model_id,
        "random_weights": info.random_weights,
        "device": info.device,
        "dtype": info.dtype,
        "torch": torch.__version__,
        "pairs": len(rows),
        "max_abs_diff_p": worst,
        "max_abs_diff_logit": max(r.abs_diff_logit for r in rows),
        "tolerance": tolerance,
        "ok": ok,
        "engine_seconds": t_engine,
        "naive_seconds": t_naive,
        "rows": [asdict(r) for r in rows],
        "bf16_ranking": ranking,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    verdict = "OK" if exact else "MISMATCH"
    print(
        f"{verdict}: {len(rows)} pairs on {report['model']} ({report['dtype']}, {report['device']}): "
        f"max |p_engine - p_naive| = {worst:.2e} (tolerance {tolerance:.0e}), "
        f"max |logit gap| = {report['max_abs_diff_logit']:.2e}; "
        f"engine {t_engine:.1f} s, naive {t_naive:.1f} s"
    )
    if ranking is not None:
        print(
            f"{'OK' if ranking['ok'] else 'BELOW THRESHOLD'}: BF16 vs FP32 ranking: "
            f"Kendall tau min {ranking['min_kendall_tau']:.4f} over "
            f"{ranking['documents_per_query']} documents per query (threshold {args.min_tau}), "
            f"max |logit gap| {ranking['max_abs_diff_logit']:.3f}"
        )
    return 0 if ok else 1
