"""Fused elementwise kernels for the decoder and the vision tower (issue 12), FP32 math inside.

The elementwise work between the matmuls (RMSNorm, rotary, SiLU * up, residual add) is a handful of
memory-bound passes per layer in eager PyTorch: transformers' RMSNorm alone is five kernels (upcast,
square-mean, rsqrt, scale, weight). Here each is written once as a pure function that
``torch.compile`` (inductor: Triton on CUDA, C++/OpenMP on CPU) turns into one kernel:

* ``rms_norm(x, weight, eps)`` / ``add_rms_norm(residual, x, weight, eps)``: FP32 statistics, and the
  rounding order of transformers' ``Qwen2RMSNorm`` / ``Qwen2_5_VLRMSNorm`` kept
  (``weight * hidden.to(input_dtype)``; ``emulate_precision_casts`` makes inductor round the
  intermediate cast exactly where eager does). In BF16 the result equals the module's bit for bit
  except where the FP32 sum of squares, accumulated in another order, moves a value across a BF16
  rounding boundary: then it is one BF16 ulp away (a few in a million elements).
* ``rotary(x, cos, sin)``: the decoder's ``x * cos + rotate_half(x) * sin`` with cos/sin in x's dtype
  (``QwenRerankEngine._rotate``), computed on the two halves without materialising
  ``rotate_half(x)``, in FP32, rounded once to x's dtype (eager BF16 rounds three times: after each
  product and after the sum; the fused value is the nearer one, within one ulp of eager).
* ``rotary_qk_f32(q, k, cos, sin)``: the vision tower's rotary (FP32 cos/sin, FP32 math, back to the
  dtype of q and k), both tensors in one kernel.
* ``silu_mul(gate, up)`` and ``mlp(module, x)`` = ``down(silu(gate(x)) * up(x))``: the product in FP32,
  rounded once (eager BF16 rounds ``silu(gate)`` first).

The token (and head) dims of every activation are marked *unbacked*, so one compiled kernel serves
every request size, 0 and 1 included (no 0/1 specialisation): a function compiles once per dtype
(and per rank of its inputs), never per request. ``FusedOps`` is the switch:

* ``mode='off'``: the eager recipes the engine used before this module, bit for bit
  (``torch.compile`` is never called);
* ``mode='on'``: compiled wherever it runs (CPU included, where inductor needs a C++ compiler);
* ``mode='auto'``: compiled on CUDA when Triton is importable; off on CPU (compiling costs tens of
  seconds there and buys little for serving).

Any failure of a compiled call that is not an out-of-memory (no compiler, Triton missing, an
inductor error at the first call) logs one warning and switches that ``FusedOps`` to the eager
recipes for good; the call that failed is answered by the eager recipe. ``active`` and ``reason``
say which path runs and why. Compiled functions are shared by every ``FusedOps`` of the process
(module-level cache), so several engines, or tests, compile once.

Call under the same autograd mode as serving (``torch.inference_mode()``): dynamo guards on it (and
on whether an activation is an inference tensor), so a warmup under ``no_grad`` would not cover
inference-mode calls. ``warmup`` runs under inference mode itself, with its weights made as normal
tensors like the model's; weights are passed to the kernels detached (a ``Parameter`` and a tensor
would otherwise be two compiles). Something that does recompile past dynamo's recompile limit
fails the call (``fullgraph=True``), which, like any compile failure, turns the object to eager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = [
    "FusedOps",
    "add_rms_norm_recipe",
    "eager_add_rms_norm",
    "eager_rms_norm",
    "eager_rotary",
    "eager_rotary_qk_f32",
    "eager_silu_mul",
    "rms_norm_recipe",
    "rotary_qk_f32_recipe",
    "rotary_recipe",
    "silu_mul_recipe",
]

log = logging.getLogger(__name__)

Mode = Literal["auto", "on", "off"]

# inductor: round explicit low-precision casts (and low-precision intermediates) where eager does.
COMPILE_OPTIONS: dict[str, Any] = {"emulate_precision_casts": True}


# ---------------------------------------------------------------------------------------------
# The pure recipes: what gets compiled (each one kernel). Also correct, if slower, run eagerly.
# ---------------------------------------------------------------------------------------------


def rms_norm_recipe(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2RMSNorm.forward, operation for operation (FP32 statistics)."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def add_rms_norm_recipe(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` (rounded to its dtype, as eager) and ``rms_norm(s)``."""
    s = residual + x
    return s, rms_norm_recipe(s, weight, eps)


def rotary_recipe(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` over the two halves, FP32 inside, in x's dtype."""
    half = x.shape[-1] // 2
    xf, c, s = x.float(), cos.float(), sin.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    lo = x1 * c[..., :half] - x2 * s[..., :half]
    hi = x2 * c[..., half:] + x1 * s[..., half:]
    return torch.cat([lo, hi], dim=-1).to(x.dtype)


def rotary_qk_f32_recipe(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's rotary of q and k (FP32 math, back to their dtypes)."""
    return rotary_recipe(q, cos, sin), rotary_recipe(k, cos, sin)


def silu_mul_recipe(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in FP32, rounded once to the promoted dtype of the inputs."""
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    return (F.silu(gate.float()) * up.float()).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# The eager recipes: what the engine computed before this module ('off' and the fallback).
# ---------------------------------------------------------------------------------------------


def eager_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm`` in FP32 (one kernel, the same arithmetic), else the module's recipe."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return rms_norm_recipe(x, weight, eps)


def eager_add_rms_norm(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    s = residual + x
    return s, eager_rms_norm(s, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def eager_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``QwenRerankEngine._rotate``: in x's dtype (cos/sin already in it)."""
    return x * cos + _rotate_half(x) * sin


def eager_rotary_qk_f32(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``VisionTower._attention``'s rotary: FP32, then back to the dtype of q and k."""
    qf, kf = q.float(), k.float()
    return (qf * cos + _rotate_half(qf) * sin).to(q.dtype), (kf * cos + _rotate_half(kf) * sin).to(k.dtype)


def eager_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``Qwen2MLP``'s ``act_fn(gate) * up`` (SiLU)."""
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------
# Compiled functions: one torch.compile wrapper per recipe for the whole process.
# ---------------------------------------------------------------------------------------------

_RECIPES: dict[str, Callable[..., Any]] = {
    "rms_norm": rms_norm_recipe,
    "add_rms_norm": add_rms_norm_recipe,
    "rotary": rotary_recipe,
    "rotary_qk_f32": rotary_qk_f32_recipe,
    "silu_mul": silu_mul_recipe,
}
_EAGER: dict[str, Callable[..., Any]] = {
    "rms_norm": eager_rms_norm,
    "add_rms_norm": eager_add_rms_norm,
    "rotary": eager_rotary,
    "rotary_qk_f32": eager_rotary_qk_f32,
    "silu_mul": eager_silu_mul,
}
# Per op: how many leading arguments are activations (every dim but the last marked unbacked), then
# how many follow that broadcast against the first (cos/sin: dim 0 marked where it matches).
_ARGS = {
    "rms_norm": (1, 0),
    "add_rms_norm": (2, 0),
    "rotary": (1, 2),
    "rotary_qk_f32": (2, 2),
    "silu_mul": (2, 0),
}

_CACHE: dict[str, Callable[..., Any]] = {}
_CACHE_LOCK = threading.Lock()


def _compiled(name: str) -> Callable[..., Any]:
    """The process-wide compiled version of recipe ``name`` (created on first use; compiling itself
    happens at the first call per dtype)."""
    with _CACHE_LOCK:
        fn = _CACHE.get(name)
        if fn is None:
            fn = torch.compile(_RECIPES[name], dynamic=True, fullgraph=True, options=dict(COMPILE_OPTIONS))
            _CACHE[name] = fn
        return fn


def _mark_dynamic(args: tuple[Any, ...], activations: int, broadcast: int) -> None:
    """Mark the token and head dims unbacked: no specialisation on request size, 0 and 1 included.

    Every dim but the last of the activation arguments; dim 0 of the broadcast ones (cos/sin) where
    it equals the first activation's (a size-1 broadcast dim stays static, as does the feature dim).
    """
    mark = torch._dynamo.decorators.mark_unbacked
    for t in args[:activations]:
        for d in range(t.dim() - 1):
            mark(t, d)
    n = args[0].shape[0]
    for t in args[activations : activations + broadcast]:
        if t.dim() > 1 and t.shape[0] == n:
            mark(t, 0)


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:
        return False


def _is_silu(act: Any) -> bool:
    return act is F.silu or type(act).__name__ in ("SiLU", "SiLUActivation")


class FusedOps:
    """The fused elementwise ops of one engine (``Settings.fused_kernels``) on ``device``.

    Every op takes and returns tensors on ``device``; inputs are not modified. ``active``: the
    compiled kernels run (it turns False for good after a compiled call fails); ``reason``: why.
    """

    def __init__(self, mode: Mode = "auto", device: torch.device | str = "cpu") -> None:
        self.mode: Mode = mode
        self.device = torch.device(device)
        kind = self.device.type
        if mode == "off":
            self.active, self.reason = False, "fused_kernels=off: eager kernels"
        elif mode == "auto" and kind != "cuda":
            self.active, self.reason = False, f"fused_kernels=auto: eager on {kind} (compiling not worth it)"
        elif kind == "cuda" and not _has_triton():
            self.active, self.reason = False, f"fused_kernels={mode}: eager, Triton is not available"
            if mode == "on":
                log.warning("fused kernels unavailable (%s)", self.reason)
        elif mode in ("auto", "on"):
            self.active, self.reason = True, f"fused_kernels={mode}: torch.compile (inductor) on {kind}"
        else:
            raise ValueError(f"fused_kernels must be 'auto', 'on' or 'off', not {mode!r}")
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FusedOps({self.mode!r}, {self.device}, active={self.active}, reason={self.reason!r})"

    # -- dispatch ------------------------------------------------------------------------------

    def _disable(self, name: str, error: BaseException) -> None:
        with self._lock:
            if not self.active:
                return
            self.active = False
            self.reason = (
                f"fused_kernels={self.mode}: eager after a compile failure in {name}: "
                + (f"{type(error).__name__}: {error}".splitlines()[0][:300])
            )
        log.warning("fused kernels disabled, eager from now on (%s)", self.reason)

    def _run(self, name: str, *args: Any) -> Any:
        if self.active:
            try:
                _mark_dynamic(args, *_ARGS[name])
                return _compiled(name)(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # compiler missing, Triton missing, inductor/dynamo errors
                self._disable(name, error)
        return _EAGER[name](*args)

    # -- ops -----------------------------------------------------------------------------------

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dim (transformers' Qwen2RMSNorm / Qwen2_5_VLRMSNorm)."""
        out: torch.Tensor = self._run("rms_norm", x, weight.detach(), float(eps))
        return out

    def norm(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` for an RMSNorm module (``.weight``, ``.variance_epsilon``)."""
        return self.rms_norm(x, module.weight, module.variance_epsilon)

    def add_rms_norm(
        self, residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, rms_norm(s))`` with ``s = residual + x``, in one kernel."""
        out: tuple[torch.Tensor, torch.Tensor] = self._run(
            "add_rms_norm", residual, x, weight.detach(), float(eps)
        )
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The decoder's rotary: ``x * cos + rotate_half(x) * sin``, cos/sin broadcast against x."""
        out: torch.Tensor = self._run("rotary", x, cos, sin)
        return out

    def rotary_qk_f32(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The vision tower's rotary of q and k: FP32 cos/sin and math, back to their dtypes."""
        out: tuple[torch.Tensor, torch.Tensor] = self._run("rotary_qk_f32", q, k, cos, sin)
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up``."""
        out: torch.Tensor = self._run("silu_mul", gate, up)
        return out

    def mlp(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` for a gated SiLU MLP (Qwen2MLP, Qwen2_5_VLMLP: gate/up/down projections,
        biases or not), the elementwise part fused. Another activation runs the module itself."""
        if not _is_silu(getattr(module, "act_fn", None)):
            plain: torch.Tensor = module(x)
            return plain
        out: torch.Tensor = module.down_proj(self.silu_mul(module.gate_proj(x), module.up_proj(x)))
        return out

    # -- warmup --------------------------------------------------------------------------------

    def warmup(
        self,
        dtypes: Iterable[torch.dtype],
        hidden_sizes: Iterable[int] = (128,),
        *,
        head_dim: int = 128,
        eps: float = 1e-6,
        vision: bool = True,
    ) -> float:
        """Compile every op ahead for ``dtypes`` (under ``torch.inference_mode``, like serving);
        returns the seconds spent. Shapes are symbolic, so one size per rank is enough; the hidden
        sizes given are the ones used (the norms and the MLP product run at each). A failure turns
        this object to eager (see ``active``). Nothing happens when inactive."""
        start = time.perf_counter()
        if not self.active:
            return 0.0
        dev = self.device
        with torch.inference_mode():
            for dtype in dtypes:
                for hidden in hidden_sizes:
                    # Distinct tensors everywhere: dynamo compiles aliased arguments separately.
                    x, y = (torch.randn(3, hidden, device=dev).to(dtype) for _ in range(2))
                    with torch.inference_mode(False):  # a weight: a normal tensor, like the model's
                        w = torch.randn(hidden, device=dev).to(dtype)
                    self.rms_norm(x, w, eps)
                    self.add_rms_norm(x, y, w, eps)
                    self.silu_mul(x, y)
                # Decoder rotary: (N, heads, D) with (N, 1, D); final layer (B, heads, 1, D).
                d = head_dim
                for shape, cshape in (((3, 2, d), (3, 1, d)), ((3, 2, 1, d), (3, 1, 1, d))):
                    t = torch.randn(shape, device=dev).to(dtype)
                    c, sn = (torch.randn(cshape, device=dev).to(dtype) for _ in range(2))
                    self.rotary(t, c, sn)
                if vision:
                    # The tower's q/k are views of one (N, 3, heads, D) qkv projection; FP32 cos/sin.
                    qkv = torch.randn(3, 3, 2, head_dim, device=dev).to(dtype)
                    q, k, _ = qkv.unbind(1)
                    c, sn = (torch.randn(3, 1, head_dim, device=dev) for _ in range(2))
                    self.rotary_qk_f32(q, k, c, sn)
                if not self.active:
                    break
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start
