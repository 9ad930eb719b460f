"""The real engine at the real 7B / 3B shapes on a fake CUDA device (``engine.dryrun``, issue 12):
every parameter and activation on the device in bf16 (FP32 only at the named sites), one score()
call per workload, and the peak device memory of workload (a) within its 20 GiB target.

The fake model has shapes and no data, so a 7B build takes seconds and no memory; the host side
(tokenizer, image decode processes, preprocessing) runs for real. Each check is shown able to fail
on a model broken on purpose (a parameter left on the CPU, one in float32, an FP32 activation)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lychee_server.engine.dryrun import DryRun, GiB, WorkloadResult, measure_peak, workload_requests

MiB = 2**20
# Workload (a) must fit this with the 7B weights (issue 12: 24 GiB cards with headroom).
TARGET_A_BYTES = 20 * GiB
SEVEN_B_WEIGHTS = (15.4 * GiB, 16.7 * GiB)  # bf16, 8.29e9 parameters


@pytest.fixture(scope="module")
def dry7b(tiny_checkpoint: Path) -> Iterator[DryRun]:
    torch.set_num_threads(2)
    dry = DryRun("qwen2.5-vl-7b", tiny_checkpoint)
    yield dry
    dry.close()


@pytest.fixture(scope="module")
def results7b(dry7b: DryRun) -> dict[str, WorkloadResult]:
    """Each workload once. (a) at its full count of 50 distinct 1080p images (the memory figure);
    (c) with 4 distinct images among its 50 documents (vision cache and chunking still exercised)."""
    out: dict[str, WorkloadResult] = {}
    for name, distinct in (("a", None), ("b", None), ("c", 4), ("packed", None)):
        out[name] = dry7b.run_workload(name, 50, distinct)
    return out


def _explain(r: WorkloadResult) -> str:
    return f"{r.name}: failure={r.failure} issues={[str(i) for i in r.issues][:8]}"


def test_7b_parameters_are_bf16_on_the_device(dry7b: DryRun) -> None:
    assert dry7b.param_issues() == []
    assert 8.2e9 < dry7b.parameters < 8.4e9
    assert SEVEN_B_WEIGHTS[0] < dry7b.weights_bytes < SEVEN_B_WEIGHTS[1]


@pytest.mark.parametrize("name", ["a", "b", "c", "packed"])
def test_7b_workload_runs_on_the_device_in_bf16(results7b: dict[str, WorkloadResult], name: str) -> None:
    r = results7b[name]
    assert r.failure is None, _explain(r)
    assert r.issues == [], _explain(r)
    assert r.scores == r.pairs > 0
    # The forward really ran on the fake device: thousands of ops, activations measured.
    assert r.ops > 1000
    assert r.memory.peak_activation_bytes > 10 * MiB
    # The score head and rotary angles are the FP32 sites every workload passes through.
    assert any(k.startswith("score head") for k in r.fp32_sites), r.fp32_sites
    assert any(k.startswith("rotary angles") for k in r.fp32_sites), r.fp32_sites


def test_7b_workload_a_fits_20_gib_with_the_weights(results7b: dict[str, WorkloadResult]) -> None:
    m = results7b["a"].memory
    assert results7b["a"].pairs == 50
    assert m.weights_bytes > SEVEN_B_WEIGHTS[0]
    assert m.peak_bytes == m.weights_bytes + m.resident_bytes + m.peak_activation_bytes
    assert m.peak_bytes <= TARGET_A_BYTES, m.gib()


def test_7b_text_workload_memory_is_activations_over_the_weights(
    results7b: dict[str, WorkloadResult],
) -> None:
    m = results7b["b"].memory
    # 100 passages of 256 tokens, batch budget 16384 tokens: at least one batch's MLP activations
    # (16384 x 18944 bf16 = 0.6 GiB), far below the weights.
    assert 0.5 * GiB < m.peak_activation_bytes < 8 * GiB, m.gib()


def test_packed_requests_share_one_score_call_through_packed_prefixes(
    dry7b: DryRun, monkeypatch: Any
) -> None:
    from lychee_server.engine import qwen

    kinds: list[str] = []
    original = dry7b.engine._batch_prefix

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        kinds.append(type(out).__name__)
        return out

    monkeypatch.setattr(dry7b.engine, "_batch_prefix", spy)
    r = dry7b.run_workload("packed", 50)
    assert r.requests > 1 and r.score_calls == 1
    assert r.failure is None and r.issues == [], _explain(r)
    assert qwen._PackedPrefix.__name__ in kinds, kinds


# ---------------------------------------------------------------- 3B
@pytest.fixture(scope="module")
def dry3b(tiny_checkpoint: Path) -> Iterator[DryRun]:
    dry = DryRun("qwen2.5-vl-3b", tiny_checkpoint)
    yield dry
    dry.close()


def test_3b_mixed_workload_runs_on_the_device_in_bf16(dry3b: DryRun) -> None:
    assert dry3b.param_issues() == []
    assert 3.6e9 < dry3b.parameters < 3.9e9
    r = dry3b.run_workload("c", 10, 3)
    assert r.failure is None and r.issues == [], _explain(r)
    assert r.scores == r.pairs == 10
    assert r.memory.peak_bytes < r.memory.weights_bytes + 8 * GiB


# ---------------------------------------------------------------- able to fail
def _layer0_mlp(model: Any) -> Any:
    inner = model.model
    lm = inner.language_model if hasattr(inner, "language_model") else inner
    return lm.layers[0].mlp


def _broken(tiny_checkpoint: Path, mutate: Any) -> tuple[DryRun, WorkloadResult]:
    dry = DryRun("qwen2.5-vl-3b", tiny_checkpoint, mutate=mutate)
    try:
        r = dry.score("broken", workload_requests(dry.engine, "packed")[:1])
    finally:
        dry.close()
    return dry, r


def test_a_parameter_left_on_the_cpu_is_reported(tiny_checkpoint: Path) -> None:
    def mutate(model: Any) -> None:
        mlp = _layer0_mlp(model)
        w = mlp.down_proj.weight
        mlp.down_proj.weight = torch.nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="cpu"), False)

    dry, r = _broken(tiny_checkpoint, mutate)
    names = {i.op for i in dry.param_issues() if i.kind == "param_device"}
    assert any(n.endswith("layers.0.mlp.down_proj.weight") for n in names), names
    assert not r.devices_ok


def test_a_parameter_left_in_float32_is_reported(tiny_checkpoint: Path) -> None:
    def mutate(model: Any) -> None:
        mlp = _layer0_mlp(model)
        w = mlp.up_proj.weight
        mlp.up_proj.weight = torch.nn.Parameter(
            torch.empty(w.shape, dtype=torch.float32, device=w.device), False
        )

    dry, r = _broken(tiny_checkpoint, mutate)
    kinds = {(i.kind, i.detail) for i in dry.param_issues()}
    assert ("param_dtype", "torch.float32") in kinds
    # At run time the engine may read its own packed copy of the MLP weights (engine.fused), cast
    # when it was made, so the forward itself need not see this parameter: the static check must.
    assert r.scores == r.pairs or not r.devices_ok


class _Fp32Silu(torch.nn.Module):
    """SiLU computed in float32 and left there: an FP32 activation outside any FP32 site."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x.float())


def test_an_fp32_activation_is_reported_with_its_source_line(tiny_checkpoint: Path) -> None:
    def mutate(model: Any) -> None:
        _layer0_mlp(model).act_fn = _Fp32Silu()

    dry, r = _broken(tiny_checkpoint, mutate)
    assert dry.param_issues() == []  # the weights are fine: only the activation is wrong
    bad = [i for i in r.issues if i.kind == "output_dtype" and "float32" in i.detail]
    assert bad, _explain(r)


# ---------------------------------------------------------------- the tracker
def test_the_storage_tracker_measures_a_known_peak_exactly() -> None:
    def fn() -> torch.Tensor:
        x = torch.empty(1024, 1024, device="cuda", dtype=torch.bfloat16)  # 2 MiB
        y = torch.empty(2048, 1024, device="cuda", dtype=torch.bfloat16)  # 4 MiB: 6 MiB live (peak)
        view = y[:10]  # a view: no new bytes
        host = torch.empty(16 * MiB, dtype=torch.uint8)  # host memory: not device bytes
        del x  # 4 MiB live
        z = torch.empty(256, 1024, device="cuda", dtype=torch.bfloat16)  # 0.5 MiB
        w = z * 2  # 0.5 MiB: 5 MiB live
        assert view.shape[0] == 10 and host.numel() and w.numel()
        return y

    peak, held = measure_peak(fn)
    assert peak == 6 * MiB
    assert held == 4 * MiB  # only the returned tensor's storage outlives fn


def test_the_storage_tracker_counts_in_place_growth_once() -> None:
    def fn() -> torch.Tensor:
        a = torch.empty(0, device="cuda", dtype=torch.float32)
        a.resize_(MiB // 4)  # the same storage, now 1 MiB
        b = a.view(-1)  # the same storage again
        return b

    peak, held = measure_peak(fn)
    assert peak == MiB and held == MiB


def test_report_dict_has_the_figures_gpu_check_prints(results7b: dict[str, WorkloadResult]) -> None:
    d = results7b["a"].as_dict()
    assert set(d["memory_gib"]) >= {"weights_bytes", "peak_bytes", "peak_activation_bytes", "resident_bytes"}
    assert d["memory_gib"]["peak_bytes"] == pytest.approx(results7b["a"].memory.peak_bytes / GiB, abs=1e-3)


def test_the_dry_run_audits_score(results7b: dict[str, WorkloadResult]) -> None:
    # Exactly one device->host copy per score() call: the final readback (allowed or not yet).
    for r in results7b.values():
        assert r.device_to_host == 1, (r.name, r.allowed_readbacks, r.violations)
