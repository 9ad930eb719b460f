"""``engine.audit.SyncAudit``: it catches each kind of host-synchronising op when one is planted (with
the source line that issued it), allows the final readback only in its narrow way, and finds none
in the engine's ``score()``: on the CPU tiny engine (text, image, mixed; one request and several
packed ones) and on the fake-CUDA dry run, where host<->device copies are visible.

Before the engine fix (commit c7dc5e4) the "none in score()" tests failed on a boolean index_put in
``_embed``, blocking ``torch.tensor(..., device=)`` copies in ``_batch_prefix`` and the ViT plan,
and a device-to-host copy outside ``_readback``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import image_input
from lychee_server.domain import DEFAULT_INSTRUCTION, Content
from lychee_server.engine.audit import SyncAudit, Violation
from lychee_server.engine.dryrun import DryRun, fake_cuda

HERE = Path(__file__).resolve().parent


def _kinds(audit: SyncAudit) -> list[str]:
    return [v.kind for v in audit.violations]


def _line_of(marker: str) -> int:
    """The line of this file holding ``marker`` (so a test states where a violation must point)."""
    for i, line in enumerate(Path(__file__).read_text().splitlines(), 1):
        if marker in line and "_line_of" not in line:
            return i
    raise AssertionError(marker)


# ---------------------------------------------------------------- planted, CPU
@pytest.mark.parametrize("inference", [False, True], ids=["grad-mode", "inference-mode"])
def test_each_data_dependent_op_is_caught_with_its_line(inference: bool) -> None:
    x = torch.tensor([1.0, -2.0, 3.0, 0.5])
    cases: list[tuple[str, Any]] = [
        ("bool_index", lambda: x[x > 0]),  # plant: bool_index
        ("bool_index", lambda: x.clone().__setitem__(x > 0, 0.0)),  # plant: bool_put
        ("item", lambda: x.sum().item()),  # plant: item
        ("item", lambda: float(x[0])),  # plant: float
        ("nonzero", lambda: torch.nonzero(x)),  # plant: nonzero
        ("masked_select", lambda: torch.masked_select(x, x > 0)),  # plant: masked_select
        ("unique", lambda: torch.unique(x)),  # plant: unique
        ("unique", lambda: torch.unique_consecutive(x)),  # plant: unique_consecutive
        ("repeat_interleave", lambda: torch.repeat_interleave(x, torch.tensor([1, 2, 1, 1]))),  # plant: rep
    ]
    markers = [
        "bool_index",
        "bool_put",
        "item",
        "float",
        "nonzero",
        "masked_select",
        "unique",
        "unique_consecutive",
        "rep",
    ]
    for (kind, fn), marker in zip(cases, markers, strict=True):
        with torch.inference_mode(inference), SyncAudit("cpu", roots=[HERE]) as audit:
            fn()
        assert kind in _kinds(audit), (marker, audit.summary())
        v = next(v for v in audit.violations if v.kind == kind)
        assert v.stack and v.stack[0].file == Path(__file__).name, v
        assert v.stack[0].line == _line_of(f"# plant: {marker}"), v


def test_sync_free_ops_are_not_reported() -> None:
    x = torch.randn(64, 8)
    idx = torch.tensor([0, 5, 7])
    mask = x[:, 0] > 0
    with SyncAudit("cpu") as audit:
        y = x.index_select(0, idx) + x[idx].sum()  # long index: a gather, no sync
        z = torch.where(mask[:, None], x, 0.0).masked_fill(~mask[:, None], 1.0)
        w = x.index_copy(0, idx, y)
        s = x.masked_scatter(mask[:, None].expand_as(x), torch.zeros(64 * 8))
        r = x.repeat_interleave(2, dim=1)
    assert audit.violations == [], audit.summary()
    assert audit.ops >= 8 and z.shape == w.shape == s.shape and r.shape[1] == 16


# ---------------------------------------------------------------- planted, fake CUDA
def test_host_device_copies_are_caught_on_the_fake_device() -> None:
    with fake_cuda(), SyncAudit("cuda", roots=[HERE]) as audit:
        torch.tensor([1, 2, 3], device="cuda")  # plant: tensor_device
        torch.ones(4).to("cuda", non_blocking=True)  # plant: pageable
        torch.ones(4).pin_memory().to("cuda", non_blocking=True)  # plant: pinned (allowed)
        d = torch.ones(8, device="cuda")
        d.cpu()  # plant: d2h
        d[torch.tensor([1, 2])]  # plant: cpu_index
        d * torch.tensor(2.0)  # a 0-dim host scalar: read on the host, not a copy
    got = {(v.kind, v.stack[0].line) for v in audit.violations}
    assert got == {
        ("h2d_blocking", _line_of("# plant: tensor_device")),
        ("h2d_unpinned", _line_of("# plant: pageable")),
        ("d2h", _line_of("# plant: d2h")),
        ("implicit_h2d", _line_of("# plant: cpu_index")),
    }, audit.summary()


def test_item_on_the_fake_device_is_caught() -> None:
    with fake_cuda(), SyncAudit("cuda", roots=[HERE]) as audit:
        d = torch.ones(8, device="cuda")
        d.sum().item()  # the dry run's device model answers 0
        bool(d.any())
    assert _kinds(audit).count("item") == 2, audit.summary()


def _readback(t: torch.Tensor) -> torch.Tensor:
    """Named like the engine's one readback helper: its device->host copy is allowed."""
    return t.cpu()


def test_the_final_readback_is_allowed_only_narrowly() -> None:
    with fake_cuda(), SyncAudit("cuda", roots=[HERE]) as audit:
        d = torch.ones(8, device="cuda")
        with audit.allowed("final readback"):
            d.cpu()  # allowed: a device->host copy in the named region
            d.sum().item()  # never allowed: a region allows copies, not scalar reads
        _readback(d)  # allowed: issued from a function named _readback
        d.cpu()  # not allowed: anywhere else
    assert [v.kind for v in audit.allowed_events] == ["d2h", "d2h"]
    assert audit.allowed_events[0].region == "final readback"
    assert sorted(_kinds(audit)) == ["d2h", "item"], audit.summary()


# ---------------------------------------------------------------- the engine, CPU
def _docs(kind: str) -> list[Content]:
    text = [Content(text=f"document {i} about rivers and mountains") for i in range(3)]
    images = [Content(image=image_input(64 + 8 * i, 48, seed=i)) for i in range(2)]
    mixed = [Content(text="a caption", image=image_input(56, 56, seed=9)), *text[:1], *images[:1]]
    return {"text": text, "image": images, "mixed": mixed}[kind]


def _score_audited(
    engine: Any, requests: list[tuple[Content, list[Content]]]
) -> tuple[SyncAudit, list[float]]:
    queries = [engine.prepare_query(DEFAULT_INSTRUCTION, q, 2048) for q, _ in requests]
    pairs = [
        engine.prepare_pair(pq, d) for pq, (_, docs) in zip(queries, requests, strict=True) for d in docs
    ]
    try:
        with SyncAudit(engine.device) as audit:
            scores = engine.score(pairs)
    finally:
        for pq in queries:
            engine.release(pq)
    assert len(scores) == len(pairs)
    assert audit.ops > 100  # the audit saw the forward
    return audit, scores


@pytest.fixture
def cpu_engine(tiny_engine: Any) -> Iterator[Any]:
    tiny_engine.vision_cache.clear()
    yield tiny_engine
    tiny_engine.vision_cache.clear()


@pytest.mark.parametrize("kind", ["text", "image", "mixed"])
def test_cpu_score_of_one_request_has_no_sync(cpu_engine: Any, kind: str) -> None:
    audit, _ = _score_audited(cpu_engine, [(Content(text="rivers"), _docs(kind))])
    assert audit.violations == [], audit.summary()


def test_cpu_score_of_packed_requests_has_no_sync(cpu_engine: Any) -> None:
    requests = [
        (Content(text="rivers"), _docs("text")[:2]),
        (Content(text="pictures"), _docs("image")[:1]),
        (Content(image=image_input(40, 40, seed=3)), _docs("mixed")[:2]),
    ]
    audit, _ = _score_audited(cpu_engine, requests)
    assert audit.violations == [], audit.summary()


def test_the_cpu_audit_sees_a_sync_planted_in_the_engine(cpu_engine: Any) -> None:
    """The engine-level test above can fail: a sync added to the embedding step is found, at its line."""
    original = cpu_engine.lm.embed_tokens

    class Syncing(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = original(ids)
            return out * float(out.abs().max())  # plant: engine_item

    # Swapped by hand, not with monkeypatch: its undo of an nn.Module child deleted the child from
    # the shared session engine (every later test then failed on a missing embed_tokens).
    cpu_engine.lm.embed_tokens = Syncing()
    audit = SyncAudit(cpu_engine.device, roots=[HERE])
    pq = cpu_engine.prepare_query(DEFAULT_INSTRUCTION, Content(text="q"), 2048)
    try:
        with audit:
            cpu_engine.score([cpu_engine.prepare_pair(pq, Content(text="doc"))])
    finally:
        cpu_engine.release(pq)
        cpu_engine.lm.embed_tokens = original
    assert cpu_engine.lm.embed_tokens is original
    items = [v for v in audit.violations if v.kind == "item"]
    assert items, audit.summary()
    assert items[0].stack[0].line == _line_of("# plant: engine_item")
    assert any(f.file.endswith("qwen.py") for f in items[0].stack)  # and the engine frames above it


# ---------------------------------------------------------------- the engine, fake CUDA
@pytest.fixture(scope="module")
def dry3b(tiny_checkpoint: Path) -> Iterator[DryRun]:
    dry = DryRun("qwen2.5-vl-3b", tiny_checkpoint)
    yield dry
    dry.close()


@pytest.mark.parametrize("workload", ["packed", "c"])
def test_fake_cuda_score_has_no_sync_but_the_final_readback(dry3b: DryRun, workload: str) -> None:
    audit = SyncAudit("cuda")
    from lychee_server.engine.dryrun import workload_requests

    r = dry3b.score(workload, workload_requests(dry3b.engine, workload, 6, 2), audit=audit)
    assert r.failure is None, r.failure
    assert audit.violations == [], audit.summary()
    assert [v.kind for v in audit.allowed_events] == ["d2h"]


def test_fake_cuda_audit_sees_the_engine_copies(dry3b: DryRun) -> None:
    """Not xfail: host->device copies and the one readback are visible to the audit at all."""
    from lychee_server.engine.dryrun import workload_requests

    audit = SyncAudit("cuda")
    seen: list[Violation] = []
    r = dry3b.score("packed", workload_requests(dry3b.engine, "packed"), audit=audit)
    seen = [*audit.violations, *audit.allowed_events]
    assert r.failure is None, r.failure
    assert r.device_to_host == 1, audit.summary()
    assert audit.ops > 1000
    assert all(v.stack for v in seen), [str(v) for v in seen]  # each located in the engine
