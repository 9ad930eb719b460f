"""The score head runs in float32 whatever the model dtype (issue 12): BF16 scores of many near-equal
documents are not quantised into ties.

In BF16 a logit near 2 has a spacing of 2**-6; a 2-row head applied after the module's BF16 norm
lands hundreds of distinct documents on few values (issue 12 measured 136 exact ties among 300
documents at the 7B shape; this test measures 190 with the BF16 head and 0 with the FP32 one on the
tiny model, 2-core CPU). The FP32 head (final RMSNorm and the yes/no rows in float32) keeps them apart.
The test also runs the BF16 head on the same hidden states, so it shows the tie count it guards
against (and would fail if the engine went back to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lychee_server.domain import Content
from lychee_server.engine.qwen import QwenRerankEngine, _is_oom
from lychee_server.errors import DeviceOutOfMemory
from lychee_server.settings import Settings

N_DOCS = 300
MAX_TIES = 3  # exact duplicates allowed among N_DOCS distinct documents with the FP32 head


def _ties(scores: list[float]) -> int:
    return len(scores) - len(set(scores))


@pytest.fixture(scope="module")
def bf16_engine(tiny_checkpoint: Path) -> Any:
    engine = QwenRerankEngine.from_settings(
        Settings(model=str(tiny_checkpoint), device="cpu", dtype="bfloat16", warmup=False)
    )
    yield engine
    engine.close()


def _score(engine: QwenRerankEngine) -> list[float]:
    pq = engine.prepare_query("Given a question, find the passage", Content(text="travel refund"), 512)
    try:
        docs = [Content(text=f"travel refund policy, clause {i} of {N_DOCS + i * 7}") for i in range(N_DOCS)]
        return engine.score([engine.prepare_pair(pq, d) for d in docs])
    finally:
        engine.release(pq)


def test_bf16_scores_are_not_quantised_into_ties(
    bf16_engine: QwenRerankEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32_head = _score(bf16_engine)

    def bf16_head(hl: torch.Tensor) -> torch.Tensor:  # what the head did before: module norm, BF16 rows
        hn = bf16_engine.lm.norm(hl)
        logits = hn @ bf16_engine.w_no_yes.to(hn.dtype).t()
        return (logits[:, 1] - logits[:, 0]).float()

    monkeypatch.setattr(bf16_engine, "_score_head", bf16_head)
    old = _score(bf16_engine)
    print(f"{N_DOCS} documents, BF16 model: {_ties(fp32_head)} ties (FP32 head), {_ties(old)} (BF16 head)")
    assert _ties(fp32_head) <= MAX_TIES
    assert _ties(old) > 10 * MAX_TIES  # the failure this test exists for is real on this model


def test_score_head_is_float32_in_a_bf16_model(bf16_engine: QwenRerankEngine) -> None:
    assert bf16_engine.w_no_yes.dtype == torch.float32
    assert bf16_engine.norm_w.dtype == torch.float32
    hl = torch.randn(4, bf16_engine.norm_w.shape[0], dtype=torch.bfloat16)
    out = bf16_engine._score_head(hl)
    assert out.dtype == torch.float32
    # By hand: RMSNorm in float64 and the row difference, from the model's own weights.
    x = hl.double()
    hn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + bf16_engine.norm_eps) * bf16_engine.norm_w.double()
    want = hn @ (bf16_engine.w_no_yes[1].double() - bf16_engine.w_no_yes[0].double())
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    ],
)
def test_every_form_of_device_oom_splits_the_batch(
    tiny_engine: QwenRerankEngine, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    assert _is_oom(exc)

    def fail(pairs: Any) -> list[float]:
        raise exc

    monkeypatch.setattr(tiny_engine, "_score", fail)
    with pytest.raises(DeviceOutOfMemory):
        tiny_engine.score([])


def test_other_runtime_errors_are_not_oom() -> None:
    assert not _is_oom(RuntimeError("shape mismatch"))
    assert not _is_oom(ValueError("out of memory"))  # only the device's own errors count
