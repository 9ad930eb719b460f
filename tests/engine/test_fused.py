"""engine.fused: compiled kernels vs the eager recipes vs transformers' own modules, compiles, fallback.

Everything runs under ``torch.inference_mode()`` like serving (dynamo guards on the autograd mode),
with fresh random data per test (never zeros). The compiled functions are process-wide, so the
module's ``ops`` fixture compiles each (op, dtype, rank) once, by ``FusedOps.warmup``, and every
test then reuses them: compile time on a small CPU is paid once per file (inductor's disk cache
makes later runs faster still).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, apply_rotary_pos_emb
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLMLP,
    Qwen2_5_VLRMSNorm,
    apply_rotary_pos_emb_vision,
)

from lychee_server.engine import fused
from lychee_server.engine.fused import FusedOps

BF16, FP32 = torch.bfloat16, torch.float32
EPS = 1e-6
_WARMUP: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _inference_mode() -> Iterator[None]:
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def ops() -> FusedOps:
    """The compiled ops ('on' on CPU), every kernel compiled ahead by warmup."""
    on = FusedOps("on", "cpu")
    assert on.active, on.reason
    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    with torch.inference_mode():
        on.warmup([FP32, BF16], [64])
    _WARMUP["seconds"] = time.perf_counter() - start
    _WARMUP["graphs"] = counters["stats"]["unique_graphs"] - graphs
    assert on.active, on.reason
    return on


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale + shift


def _weight(g: torch.Generator, n: int) -> torch.Tensor:
    """An RMSNorm weight like a trained one: around 1, no zeros."""
    with torch.inference_mode(False):
        return _randn(g, n, scale=0.3, shift=1.0)


def _close(
    actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6, *, elementwise: bool = True
) -> None:
    """``|a - b| <= rel * |b|`` per element, or relative to ``max |b|`` (sums with cancellation)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert bool(torch.isfinite(actual).all())
    diff = (actual.double() - expected.double()).abs()
    bound = expected.double().abs() if elementwise else expected.double().abs().max()
    worst = float((diff - rel * bound).max()) if diff.numel() else 0.0
    assert worst <= 0.0, f"max |diff| {float(diff.max()):.3g} over {rel:g} relative (by {worst:.3g})"


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BF16 ulp distance element by element (the bit patterns mapped onto ordered integers)."""
    assert a.dtype == b.dtype == BF16

    def key(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -(i + 32768), i)

    return (key(a) - key(b)).abs()


def _entries(fn: Any) -> int:
    return len(_debug_get_cache_entry_list(fn.__code__))


# --- modes ------------------------------------------------------------------------------------


def test_modes_and_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    off = FusedOps("off", "cpu")
    assert not off.active and "off" in off.reason
    auto_cpu = FusedOps("auto", "cpu")
    assert not auto_cpu.active and "cpu" in auto_cpu.reason
    on = FusedOps("on", "cpu")
    assert on.active and "torch.compile" in on.reason
    monkeypatch.setattr(fused, "_has_triton", lambda: True)
    assert FusedOps("auto", "cuda").active  # nothing compiles or touches CUDA at construction
    monkeypatch.setattr(fused, "_has_triton", lambda: False)
    no_triton = FusedOps("auto", "cuda")
    assert not no_triton.active and "Triton" in no_triton.reason
    assert not FusedOps("on", "cuda").active
    with pytest.raises(ValueError):
        FusedOps("yes", "cpu")  # type: ignore[arg-type]


# --- FP32: compiled == eager == transformers' modules within 1e-6 relative ----------------------


@pytest.mark.parametrize(("n", "hidden"), [(7, 64), (300, 1280), (1, 3584), (1111, 96)])
def test_fp32_rms_norm_matches_modules(ops: FusedOps, n: int, hidden: int) -> None:
    g = _gen(1000 + n)
    off = FusedOps("off", "cpu")
    for cls in (Qwen2RMSNorm, Qwen2_5_VLRMSNorm):
        with torch.inference_mode(False):
            module = cls(hidden, eps=EPS)
            module.weight.data = _weight(g, hidden)
            module.requires_grad_(False)
        x = _randn(g, n, hidden, scale=3.0, shift=0.5)
        expected = module(x)
        _close(ops.norm(module, x), expected)
        _close(off.norm(module, x), expected)
        _close(ops.rms_norm(x, module.weight, EPS), off.rms_norm(x, module.weight, EPS))


@pytest.mark.parametrize(("n", "hidden"), [(7, 64), (300, 1280), (1, 3584)])
def test_fp32_add_rms_norm(ops: FusedOps, n: int, hidden: int) -> None:
    g = _gen(2000 + n)
    w = _weight(g, hidden)
    r, x = _randn(g, n, hidden, scale=4.0), _randn(g, n, hidden)
    s, y = ops.add_rms_norm(r, x, w, EPS)
    with torch.inference_mode(False):
        module = Qwen2RMSNorm(hidden, eps=EPS)
        module.weight.data = w
    assert torch.equal(s, r + x)
    _close(y, module(r + x))
    s2, y2 = FusedOps("off", "cpu").add_rms_norm(r, x, w, EPS)
    assert torch.equal(s2, r + x)
    _close(y, y2)


def _angles(
    g: torch.Generator, n: int, d: int, lead: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (n, *lead, d) of random positions, halves repeated like the model's ``cat([f, f])``."""
    f = _randn(g, n, *lead, d // 2, scale=50.0)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize(("n", "heads", "d"), [(7, 4, 128), (300, 2, 128), (1, 28, 128), (1111, 1, 80)])
def test_fp32_rotary_matches_transformers(ops: FusedOps, n: int, heads: int, d: int) -> None:
    g = _gen(3000 + n)
    q, k = _randn(g, n, heads, d), _randn(g, n, max(1, heads // 2), d)
    cos, sin = _angles(g, n, d)  # (n, d)
    # transformers' text rotary with the heads axis after the tokens: unsqueeze_dim=1.
    eq, ek = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    off = FusedOps("off", "cpu")
    for x, expected in ((q, eq), (k, ek)):
        _close(ops.rotary(x, cos[:, None], sin[:, None]), expected, elementwise=False)
        assert torch.equal(off.rotary(x, cos[:, None], sin[:, None]), expected)
    # The final layer's layout: (B, heads, 1, d) with (B, 1, 1, d).
    q4 = q[:, :, None]
    c4, s4 = cos[:, None, None], sin[:, None, None]
    _close(ops.rotary(q4, c4, s4), eq[:, :, None], elementwise=False)


@pytest.mark.parametrize(("n", "heads", "d"), [(16, 16, 80), (300, 2, 64), (1, 4, 80)])
def test_fp32_vision_rotary_matches_transformers(ops: FusedOps, n: int, heads: int, d: int) -> None:
    g = _gen(4000 + n)
    qkv = _randn(g, n, 3, heads, d, scale=2.0)
    q, k, _ = qkv.unbind(1)  # views, as in VisionTower._attention
    cos, sin = _angles(g, n, d)
    eq, ek = apply_rotary_pos_emb_vision(q, k, cos, sin)
    fq, fk = ops.rotary_qk_f32(q, k, cos[:, None], sin[:, None])
    _close(fq, eq, elementwise=False)
    _close(fk, ek, elementwise=False)
    oq, ok = FusedOps("off", "cpu").rotary_qk_f32(q, k, cos[:, None], sin[:, None])
    assert torch.equal(oq, eq) and torch.equal(ok, ek)


def _mlp(cls: type, hidden: int, inter: int, g: torch.Generator, **kw: Any) -> Any:
    with torch.inference_mode(False):
        cfg = SimpleNamespace(hidden_size=hidden, intermediate_size=inter, hidden_act="silu")
        module = cls(cfg, **kw)
        for p in module.parameters():
            p.data = _randn(g, *p.shape, scale=1.0 / math.sqrt(p.shape[-1]))
        return module.requires_grad_(False)


@pytest.mark.parametrize(("n", "hidden", "inter"), [(7, 64, 160), (300, 128, 344), (1, 80, 3420)])
def test_fp32_mlp_matches_modules(ops: FusedOps, n: int, hidden: int, inter: int) -> None:
    g = _gen(5000 + n)
    off = FusedOps("off", "cpu")
    for module in (_mlp(Qwen2MLP, hidden, inter, g), _mlp(Qwen2_5_VLMLP, hidden, inter, g, bias=True)):
        x = _randn(g, n, hidden, scale=2.0)
        expected = module(x)
        _close(ops.mlp(module, x), expected, elementwise=False)
        assert torch.equal(off.mlp(module, x), expected)
    gate, up = _randn(g, n, inter, scale=3.0), _randn(g, n, inter)
    _close(ops.silu_mul(gate, up), F.silu(gate) * up)


def test_mlp_other_activation_runs_the_module(ops: FusedOps) -> None:
    g = _gen(6)
    module = _mlp(Qwen2MLP, 32, 48, g)
    module.act_fn = torch.nn.GELU()
    x = _randn(g, 5, 32)
    assert torch.equal(ops.mlp(module, x), module(x))


# --- BF16 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "hidden"), [(300, 1280), (1111, 3584), (1, 64)])
def test_bf16_rms_norm_module_exact_or_one_ulp_inside(ops: FusedOps, n: int, hidden: int) -> None:
    """Fused == module bit for bit (>= 99.9% of elements), except where the FP32 sum of squares,
    accumulated in another order, moves the normalised value across a BF16 rounding boundary: then
    the output is exactly the module's with that value one BF16 ulp away (``weight *`` it, rounded),
    i.e. 1 or 2 ulps of the output. 'off' is the module exactly."""
    g = _gen(7000 + n)
    with torch.inference_mode(False):
        module = Qwen2RMSNorm(hidden, eps=EPS).to(BF16)
        module.weight.data = _weight(g, hidden).to(BF16)
    x = _randn(g, n, hidden, scale=3.0, shift=0.25).to(BF16)
    expected = module(x)
    got = ops.norm(module, x)
    assert got.dtype == BF16
    assert torch.equal(FusedOps("off", "cpu").norm(module, x), expected)

    def explained(out: torch.Tensor, inp: torch.Tensor, reference: torch.Tensor) -> None:
        same = out == reference
        assert float(same.float().mean()) >= 0.999, f"{int((~same).sum())} of {same.numel()} differ"
        h = inp.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(BF16)  # the module's value
        inf = torch.full_like(h, math.inf)
        w = module.weight
        one_off = (out == w * torch.nextafter(h, inf)) | (out == w * torch.nextafter(h, -inf))
        assert bool((same | one_off).all())
        assert int(_ulps(out, reference).max()) <= 2

    explained(got, x, expected)
    # add_rms_norm: the BF16 sum rounded as eager, then the same norm.
    r = _randn(g, n, hidden, scale=3.0).to(BF16)
    s, y = ops.add_rms_norm(r, x, module.weight, EPS)
    assert torch.equal(s, r + x)
    explained(y, r + x, module(r + x))


def _check_bf16_fp32_inside(fused_out: torch.Tensor, eager_out: torch.Tensor, truth: torch.Tensor) -> None:
    """FP32 math, one rounding: within 1 ulp of the correctly rounded value, and at least as close
    to the exact result as eager BF16 (which rounds after every op)."""
    assert fused_out.dtype == BF16
    assert int(_ulps(fused_out, truth.to(BF16)).max()) <= 1
    fused_err = float((fused_out.double() - truth).abs().max())
    eager_err = float((eager_out.double() - truth).abs().max())
    assert fused_err <= eager_err


@pytest.mark.parametrize(("n", "heads"), [(300, 4), (1, 28)])
def test_bf16_rotary_fp32_inside(ops: FusedOps, n: int, heads: int) -> None:
    g = _gen(8000 + n)
    x = _randn(g, n, heads, 128, scale=2.0).to(BF16)
    cos, sin = (t.to(BF16) for t in _angles(g, n, 128, (1,)))
    xd, cd, sd = x.double(), cos.double(), sin.double()
    truth = xd * cd + torch.cat([-xd[..., 64:], xd[..., :64]], -1) * sd
    _check_bf16_fp32_inside(ops.rotary(x, cos, sin), FusedOps("off", "cpu").rotary(x, cos, sin), truth)


def test_bf16_vision_rotary(ops: FusedOps) -> None:
    """Both paths compute in FP32 and round once: equal, or 1 ulp where FP32 contraction differs."""
    g = _gen(9)
    q, k, _ = _randn(g, 640, 3, 16, 80, scale=2.0).to(BF16).unbind(1)
    cos, sin = _angles(g, 640, 80)
    eq, ek = apply_rotary_pos_emb_vision(q, k, cos, sin)
    fq, fk = ops.rotary_qk_f32(q, k, cos[:, None], sin[:, None])
    assert fq.dtype == fk.dtype == BF16
    assert int(_ulps(fq, eq).max()) <= 1 and int(_ulps(fk, ek).max()) <= 1


def test_bf16_silu_mul_fp32_inside(ops: FusedOps) -> None:
    g = _gen(10)
    gate, up = _randn(g, 300, 3420, scale=3.0).to(BF16), _randn(g, 300, 3420).to(BF16)
    truth = F.silu(gate.double()) * up.double()
    _check_bf16_fp32_inside(ops.silu_mul(gate, up), F.silu(gate) * up, truth)


# --- compiles: once per (op, dtype, rank), never per request size --------------------------------


def test_request_sizes_never_recompile(ops: FusedOps) -> None:
    assert _WARMUP["graphs"] <= 12  # 6 kernels (rotary: 2 ranks) x 2 dtypes, fewer if already compiled
    graphs = counters["stats"]["unique_graphs"]
    g = _gen(11)
    for dtype in (FP32, BF16):
        with torch.inference_mode(False):  # model weights: parameters made outside inference mode
            weights = {
                h: torch.nn.Parameter(_weight(g, h).to(dtype), requires_grad=False) for h in (64, 1280, 3584)
            }
        for n in (7, 300, 1111, 1, 0):
            for hidden, w in weights.items():
                x, y = _randn(g, n, hidden).to(dtype), _randn(g, n, hidden).to(dtype)
                ops.rms_norm(x, w, EPS)
                ops.add_rms_norm(x, y, w, EPS)
                ops.silu_mul(x, y)
            for heads, d in ((4, 128), (1, 128), (16, 80)):
                cos, sin = (t.to(dtype) for t in _angles(g, n, d, (1,)))
                ops.rotary(_randn(g, n, heads, d).to(dtype), cos, sin)
                ops.rotary(_randn(g, n, heads, 1, d).to(dtype), cos[:, None], sin[:, None])
                q, k, _ = _randn(g, n, 3, heads, d).to(dtype).unbind(1)
                fc, fs = _angles(g, n, d, (1,))
                ops.rotary_qk_f32(q, k, fc, fs)
    assert ops.active, ops.reason
    assert counters["stats"]["unique_graphs"] == graphs, (
        "a request size, hidden size or head count recompiled"
    )
    # One compiled entry per dtype (and per rank for the decoder rotary), for the whole file.
    assert _entries(fused.rms_norm_recipe) == 2
    assert _entries(fused.add_rms_norm_recipe) == 2
    assert _entries(fused.silu_mul_recipe) == 2
    assert _entries(fused.rotary_recipe) == 4
    assert _entries(fused.rotary_qk_f32_recipe) == 2


# --- fallback and 'off' -------------------------------------------------------------------------


def _inputs(g: torch.Generator) -> dict[str, tuple[Any, ...]]:
    x = _randn(g, 5, 64).to(BF16)
    w = _weight(g, 64).to(BF16)
    cos, sin = (t.to(BF16) for t in _angles(g, 5, 64, (1,)))
    q, k, _ = _randn(g, 5, 3, 2, 64).to(BF16).unbind(1)
    fc, fs = _angles(g, 5, 64, (1,))
    return {
        "rms_norm": (x, w, EPS),
        "add_rms_norm": (x, x * 2, w, EPS),
        "rotary": (_randn(g, 5, 2, 64).to(BF16), cos, sin),
        "rotary_qk_f32": (q, k, fc, fs),
        "silu_mul": (x, x * 3),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def test_compile_failure_falls_back_to_eager_for_good(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def broken(name: str) -> Any:
        def run(*args: Any) -> Any:
            calls.append(name)
            raise RuntimeError("simulated: InductorError: CppCompileError: no C++ compiler\nmore")

        return run

    monkeypatch.setattr(fused, "_compiled", broken)
    ops = FusedOps("on", "cpu")
    inputs = _inputs(_gen(12))
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        for _ in range(2):
            for name, args in inputs.items():
                assert _same(getattr(ops, name)(*args), fused._EAGER[name](*args)), name
    assert calls == ["rms_norm"]  # the first failure switches every op to eager, once
    assert not ops.active and "simulated" in ops.reason and "\n" not in ops.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "disabled" in warnings[0].getMessage()
    assert ops.warmup([BF16]) == 0.0


def test_torch_compile_raising_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_compile(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated: Dynamo is not supported here")

    monkeypatch.setattr(fused, "_CACHE", {})
    monkeypatch.setattr(torch, "compile", no_compile)
    ops = FusedOps("on", "cpu")
    x, w, eps = _inputs(_gen(13))["rms_norm"]
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        ops.warmup([BF16], [64])
        assert torch.equal(ops.rms_norm(x, w, eps), fused.eager_rms_norm(x, w, eps))
    assert not ops.active and "Dynamo is not supported" in ops.reason
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_out_of_memory_is_raised_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(name: str) -> Any:
        def run(*args: Any) -> Any:
            raise torch.OutOfMemoryError("simulated")

        return run

    monkeypatch.setattr(fused, "_compiled", oom)
    ops = FusedOps("on", "cpu")
    x, w, eps = _inputs(_gen(14))["rms_norm"]
    with pytest.raises(torch.OutOfMemoryError):
        ops.rms_norm(x, w, eps)
    assert ops.active


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_off_never_compiles(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    compiled: list[object] = []
    monkeypatch.setattr(fused, "_CACHE", {})
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled.append(a))
    monkeypatch.setattr(fused, "_compiled", lambda name: compiled.append(name))
    ops = FusedOps(mode, "cpu")  # type: ignore[arg-type]
    assert not ops.active
    assert ops.warmup([FP32, BF16]) == 0.0
    for name, args in _inputs(_gen(15)).items():
        assert _same(getattr(ops, name)(*args), fused._EAGER[name](*args))
    assert compiled == [] and fused._CACHE == {}
