"""A dry run of the real engine at the real 7B / 3B shapes on a fake CUDA device (issue 12).

Why: the GPU fast path has properties a CPU test of the tiny model cannot show and a GPU is not
always at hand to show: every weight and activation on the device in bfloat16 (FP32 only where that
is meant), no host synchronisation inside ``score()``, and a peak device memory that fits the target
(workload (a), 50 1080p images, within 20 GiB with the 7B weights). Here the model is built under
``torch._subclasses.fake_tensor.FakeTensorMode`` on ``cuda``: its tensors carry shapes, dtypes and
devices but no data, so a 7B model costs no memory and a forward costs no FLOPs. Everything on the
host runs for real: the tokenizer, the chat template, the image decode worker processes, PIL and the
preprocessor, NumPy; the engine's own ``prepare_query`` / ``prepare_pair`` / ``score`` run unchanged.

What a fake device cannot do, and what this module does about it (``Report.patches`` lists each):

* ``pin_memory()`` / ``is_pinned()`` need a CUDA driver (and ``_pin_memory`` has no fake kernel): a
  dispatch mode emulates them (a copy, remembered as pinned);
* values cannot be read back: ``_local_scalar_dense`` of a fake tensor (the final ``tolist()``)
  returns 0, each such read recorded with its source line (the audit says whether it was allowed);
* the engine's start-up checks that compare real numbers: the image preprocessor's construction and
  bit-exactness check run with the fake mode suspended (real CPU tensors); a ``VarlenAttention``
  kernel check, where the engine has one, is assumed to pass as on the GPU (it is verified there);
* SDPA under a fake CUDA tensor falls back to the math path (FP32 scores materialised), which no
  GPU run takes: ``aten.scaled_dot_product_attention`` is routed to the fused kernel CUDA would pick
  (flash without a mask, memory-efficient with a boolean mask converted to an additive bias).

Memory: every op's output storages on the fake device are tracked (``StorageWeakRef`` by storage
``cdata``, pruned as they die); the peak of live bytes is taken after each op. That is exact for what
the engine holds; what it does not include is said in :class:`Memory`.
"""

from __future__ import annotations

import contextlib
import gc
import io
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from lychee_server.domain import DEFAULT_INSTRUCTION, Content, ImageInput, MediaType
from lychee_server.engine.audit import SyncAudit, engine_frames

__all__ = [
    "DEFAULT_FP32_SITES",
    "WORKLOADS",
    "DryRun",
    "Fp32Site",
    "Issue",
    "Memory",
    "Report",
    "StorageTracker",
    "WorkloadResult",
    "fake_cuda",
    "measure_peak",
    "run",
    "workload_requests",
]

GiB = 2**30
WORKLOADS = ("a", "b", "c", "packed")
_DEVICE = torch.device("cuda", 0)
_PACKAGE = str(Path(__file__).resolve().parent.parent).replace("\\", "/") + "/"
_DTYPE = torch.bfloat16


# ---------------------------------------------------------------- FP32 sites
@dataclass(frozen=True)
class Fp32Site:
    """A place where a float32 activation on the device is meant: a frame whose file ends with
    ``path`` and whose function is ``function`` (a regex on the qualified name for library code),
    optionally only on source lines matching ``line``."""

    path: str
    function: str
    reason: str
    line: str | None = None

    def matches(self, filename: str, qualname: str, source: str) -> bool:
        # A comprehension's own frame (Python < 3.12) belongs to the function around it.
        qualname = re.sub(r"\.<locals>\.<(listcomp|genexpr|dictcomp|setcomp)>$", "", qualname)
        if not filename.endswith(self.path) or re.fullmatch(self.function, qualname) is None:
            return False
        return self.line is None or re.search(self.line, source) is not None


DEFAULT_FP32_SITES: tuple[Fp32Site, ...] = (
    Fp32Site("engine/qwen.py", r"(QwenRerankEngine\.)?_rope", "rotary angles"),
    Fp32Site("engine/qwen.py", r"(QwenRerankEngine\.)?_score_head", "score head"),
    Fp32Site("engine/qwen.py", r"(QwenRerankEngine\.)?_readback", "score readback"),
    Fp32Site("engine/qwen.py", r"(QwenRerankEngine\.)?_score", "the scores of all batches", r"diffs"),
    Fp32Site(
        "engine/qwen.py",
        r"(QwenRerankEngine\.)?_forward(_steps)?",
        "score head (inline)",
        r"logits|\.float\(\)",
    ),
    Fp32Site("engine/vision.py", r"(VisionTower\.)?_rotary", "vision rotary angles"),
    Fp32Site("engine/vision.py", r"_rotate_half", "vision rotary (FP32 like transformers)"),
    Fp32Site(
        "engine/vision.py",
        r"(VisionTower\.)?_attention",
        "vision rotary (FP32 like transformers)",
        r"\b[qk]f\b",
    ),
    Fp32Site("engine/attention.py", r"(VarlenAttention\.)?_kernel", "varlen kernel log-sum-exp", r"lse"),
    Fp32Site(
        "engine/attention.py", r"merge", "varlen merge of two partial softmaxes (FP32 inside by design)"
    ),
    Fp32Site(
        "engine/qwen.py",
        r"(QwenRerankEngine\.)?_to_device",
        "pixel patches uploaded in FP32 (the ViT casts on the device)",
    ),
    Fp32Site(".py", r".*RMSNorm\.forward", "RMSNorm's internal FP32 upcast (transformers)"),
    Fp32Site("engine/fused.py", r"\w*rms_norm\w*", "RMSNorm's internal FP32 upcast (engine.fused)"),
    Fp32Site("engine/fused.py", r"\w*rota\w*", "rotary in FP32 (engine.fused)"),
)


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class Issue:
    """A device or dtype problem: a parameter, or an op's output, where it should not be."""

    kind: str  # param_device, param_dtype, output_device, output_dtype, host_operand, failed
    op: str
    detail: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} at {self.where} ({self.detail})"


@dataclass
class Memory:
    """Device bytes of one ``score()`` call, exact storage sizes of what the engine holds.

    ``peak_bytes`` = ``weights_bytes`` + ``resident_bytes`` + ``peak_activation_bytes``: the model's
    parameters and buffers, the other device tensors alive when the call started (engine constants,
    cached vision outputs, prefix states), and the most bytes the call itself held at once.
    Not included: the CUDA context (~0.5 GiB), the caching allocator's rounding and fragmentation
    (``max_memory_reserved`` - ``max_memory_allocated``), library workspaces (cuBLAS, attention
    kernels' scratch) and transients inside one composite op that a dispatch mode does not see.
    """

    weights_bytes: int = 0
    resident_bytes: int = 0
    peak_activation_bytes: int = 0
    peak_bytes: int = 0
    retained_bytes: int = 0  # new device bytes still alive when the call returned (caches, prefixes)
    peak_op: str = ""  # the op after which the peak was reached, and where

    def gib(self) -> dict[str, float]:
        return {
            k: round(v / GiB, 3)
            for k, v in asdict(self).items()
            if isinstance(v, int) and k.endswith("bytes")
        }


@dataclass
class WorkloadResult:
    name: str
    requests: int
    pairs: int
    score_calls: int
    prepare_s: float
    score_s: float
    memory: Memory
    scores: int  # how many numbers score() returned
    issues: list[Issue] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # SyncAudit.summary()
    allowed_readbacks: list[str] = field(default_factory=list)
    scalar_reads: list[str] = field(default_factory=list)  # fake values read back (returned 0)
    fp32_sites: dict[str, int] = field(default_factory=dict)
    ops: int = 0
    device_to_host: int = 0  # device->host copies seen by the audit (the final readback: 1)
    failure: str | None = None

    @property
    def devices_ok(self) -> bool:
        return self.failure is None and not self.issues

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory_gib"] = self.memory.gib()
        d["issues"] = [str(i) for i in self.issues]
        return d


@dataclass
class Report:
    shape: str
    parameters: int
    weights_bytes: int
    build_s: float
    attention_backend: str
    torch_version: str
    patches: list[str]
    param_issues: list[Issue]
    workloads: list[WorkloadResult]

    def as_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "parameters": self.parameters,
            "weights_gib": round(self.weights_bytes / GiB, 3),
            "build_s": round(self.build_s, 2),
            "attention_backend": self.attention_backend,
            "torch": self.torch_version,
            "patches": list(self.patches),
            "param_issues": [str(i) for i in self.param_issues],
            "workloads": [w.as_dict() for w in self.workloads],
        }


# ---------------------------------------------------------------- storage tracking
def _storage_ref(t: torch.Tensor) -> StorageWeakRef | None:
    try:
        return StorageWeakRef(t.untyped_storage())  # type: ignore[no-untyped-call]
    except (RuntimeError, NotImplementedError):
        return None


class StorageTracker:
    """Live bytes of device storages: ``add`` each tensor an op produced, ``total`` after pruning.

    Storages, not tensors, because views share one allocation (counted once) and a storage lives as
    long as any view of it. ``baseline`` storages (weights, resident state) are counted apart and not
    re-checked per op, which keeps the per-op cost proportional to the live activations."""

    def __init__(self, device_type: str = "cuda") -> None:
        self.device_type = device_type
        self._base: dict[int, tuple[StorageWeakRef, int]] = {}
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.base_bytes = 0
        self.live_bytes = 0
        self.peak_live_bytes = 0
        self.peak_where = ""

    def set_baseline(self, tensors: Iterable[torch.Tensor]) -> int:
        self._base.clear()
        for t in tensors:
            ref = _storage_ref(t)
            if ref is not None and ref.cdata not in self._base:
                self._base[ref.cdata] = (ref, t.untyped_storage().nbytes())
        self.base_bytes = sum(n for _, n in self._base.values())
        return self.base_bytes

    def prune(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]  # type: ignore[no-untyped-call]
        for k in dead:
            self.live_bytes -= self._live.pop(k)[1]

    def add(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type:
            return
        ref = _storage_ref(t)
        if ref is None or ref.cdata in self._base:
            return
        nbytes = t.untyped_storage().nbytes()
        old = self._live.get(ref.cdata)
        if old is not None and not old[0].expired():  # type: ignore[no-untyped-call]
            self.live_bytes += nbytes - old[1]
        else:
            if old is not None:
                self.live_bytes -= old[1]
            self.live_bytes += nbytes
        self._live[ref.cdata] = (ref, nbytes)

    def mark(self, where: str | Callable[[], str], transient: int = 0) -> None:
        """Update the peak with the live bytes now (plus ``transient`` bytes alive only inside an op);
        ``where`` (or its result, computed only at a new peak) says which op and line reached it."""
        now = self.live_bytes + transient
        if now > self.peak_live_bytes:
            self.peak_live_bytes = now
            self.peak_where = where if isinstance(where, str) else where()

    def reset_peak(self) -> None:
        self.prune()
        self.peak_live_bytes = self.live_bytes
        self.peak_where = ""


# ---------------------------------------------------------------- dispatch modes
class _PinRegistry:
    """Host storages the emulated ``pin_memory()`` produced (shared by every thread's shim)."""

    def __init__(self) -> None:
        self._refs: dict[int, StorageWeakRef] = {}

    def add(self, t: torch.Tensor) -> None:
        ref = _storage_ref(t)
        if ref is not None:
            self._refs[ref.cdata] = ref
            if len(self._refs) > 4096:
                self._refs = {k: r for k, r in self._refs.items() if not r.expired()}  # type: ignore[no-untyped-call]

    def __contains__(self, t: object) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = _storage_ref(t)
        return ref is not None and ref.cdata in self._refs and not self._refs[ref.cdata].expired()  # type: ignore[no-untyped-call]


def _pin_emulation(
    registry: _PinRegistry, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bool, Any]:
    name = func._schema.name
    if name in ("aten::_pin_memory", "aten::pin_memory"):
        out = args[0].clone()
        registry.add(out)
        return True, out
    if name == "aten::is_pinned":
        return True, args[0] in registry
    return False, None


class _HostShim(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """For host-side engine code (prepare_*): emulate pinned memory, run everything else unchanged."""

    def __init__(self, registry: _PinRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        handled, out = _pin_emulation(self.registry, func, args, kwargs)
        return out if handled else func(*args, **kwargs)


def _fake(t: object) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _origin(exc: BaseException) -> str:
    """ " at file:line" of the innermost audited frame of ``exc`` (or its cause), for reports."""
    import traceback

    while exc.__cause__ is not None:
        exc = exc.__cause__
    tb = traceback.extract_tb(exc.__traceback__)
    pkg = str(Path(__file__).resolve().parent.parent)
    mine = [f for f in tb if f.filename.startswith(pkg) and not f.filename.endswith("dryrun.py")]
    last = mine[-1] if mine else (tb[-1] if tb else None)
    if last is None:
        return ""
    return f" at {Path(last.filename).name}:{last.lineno} in {last.name}"


def _zero_of(t: torch.Tensor) -> bool | int | float:
    if t.dtype == torch.bool:
        return False
    return 0.0 if t.is_floating_point() else 0


class _DeviceModel(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """For ``score()`` on the fake device: the emulations (pinning, readback, fused SDPA), the device
    and dtype checks of every op's outputs, and the storage tracker."""

    def __init__(
        self,
        registry: _PinRegistry,
        tracker: StorageTracker,
        fp32_sites: Sequence[Fp32Site],
        roots: Sequence[Path] = (),
        fake_mode: Any = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.fake_mode = fake_mode
        self.registry = registry
        self.tracker = tracker
        self.fp32_sites = tuple(fp32_sites)
        self.roots = tuple(roots)
        self.issue_counts: dict[Issue, int] = {}
        self.fp32: dict[str, int] = {}
        self.scalar_reads: list[str] = []
        self.ops = 0

    def _site(self) -> tuple[Fp32Site | None, str]:
        """The FP32 site that allows the current op (None if none), and the audited frame it is at."""
        frame = sys._getframe(2)
        stack, caller = engine_frames(frame, self.roots)
        where = str(stack[0]) if stack else str(caller) if caller is not None else "?"
        import linecache

        # Library frames between the op and the engine (an RMSNorm module), then the innermost
        # engine frame itself: only those decide. An outer engine frame (the caller of the caller)
        # never does, or every op inside ``_score`` would pass as "the scores".
        f: Any = frame
        depth = 0
        while f is not None and depth < 64:
            depth += 1
            code = f.f_code
            filename = code.co_filename.replace("\\", "/")
            qualname = getattr(code, "co_qualname", code.co_name)
            source = linecache.getline(code.co_filename, f.f_lineno)
            for site in self.fp32_sites:
                if site.matches(filename, qualname, source):
                    return site, where
            if filename.startswith(_PACKAGE) and not filename.endswith(("/dryrun.py", "/audit.py")):
                break
            f = f.f_back
        return None, where

    def _where(self) -> str:
        stack, caller = engine_frames(sys._getframe(2), self.roots)
        return str(stack[0]) if stack else str(caller) if caller is not None else "?"

    @property
    def issues(self) -> list[Issue]:
        return list(self.issue_counts)

    def _issue(self, issue: Issue) -> None:
        self.issue_counts[issue] = self.issue_counts.get(issue, 0) + 1

    def _lift(self, t: torch.Tensor) -> torch.Tensor:
        if _fake(t) or self.fake_mode is None:
            return t
        return self.fake_mode.from_tensor(t)  # type: ignore[no-any-return]

    def _sdpa(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The fused kernel CUDA picks for bf16: flash without a mask, memory-efficient with one
        (a boolean mask becomes an additive bias in q's dtype, its last dim padded to 16 as torch
        does). Returns the output and the transient bytes the kernel call held (the bias)."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, args, strict=False))
        a.update(kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        mask, causal, scale = a.get("attn_mask"), bool(a.get("is_causal", False)), a.get("scale")
        aten = torch.ops.aten
        if mask is None:
            out = aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, causal, False, scale=scale)
            return out[0], 0
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                mask.logical_not(), float("-inf")
            )
        else:
            bias = mask.to(q.dtype)
        s = bias.shape[-1]
        if s % 16:
            padded = torch.nn.functional.pad(bias, (0, 16 - s % 16))
            bias = padded[..., :s]
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = aten._scaled_dot_product_efficient_attention.default(
            q, k, v, bias.expand(full), False, 0.0, causal, scale=scale
        )
        return out[0], bias.untyped_storage().nbytes()

    def _check(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[torch.Tensor]
    ) -> None:
        name = func._schema.name
        inputs = tree_flatten((args, kwargs))[0]
        ins = [t for t in inputs if isinstance(t, torch.Tensor)]
        dev_in = any(t.device.type == "cuda" for t in ins)
        copy = name in ("aten::_to_copy", "aten::to", "aten::copy_", "aten::copy", "aten::_copy_from")
        if dev_in and not copy and name not in ("aten::_pin_memory", "aten::pin_memory", "aten::is_pinned"):
            for t in ins:
                if t.device.type == "cpu" and t.dim() > 0:
                    self._issue(Issue("host_operand", str(func), f"host tensor {t.dtype}", self._where()))
                    break
        for i, t in enumerate(outs):
            if t.device.type == "cpu":
                if dev_in and not copy:
                    self._issue(
                        Issue("output_device", str(func), "device op wrote a host tensor", self._where())
                    )
                continue
            if not t.is_floating_point() or t.dtype == _DTYPE:
                continue
            if i > 0 and "scaled_dot_product" in name:
                continue  # the kernels' log-sum-exp statistics are FP32 by design
            if t.dtype == torch.float32:
                site, where = self._site()
                if site is not None:
                    key = f"{site.reason} ({where})"
                    self.fp32[key] = self.fp32.get(key, 0) + 1
                    continue
                self._issue(Issue("output_dtype", str(func), str(t.dtype), where))
            else:
                self._issue(Issue("output_dtype", str(func), str(t.dtype), self._where()))

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        handled, out = _pin_emulation(self.registry, func, args, kwargs)
        if handled:
            return out
        name = func._schema.name
        if name in ("aten::_local_scalar_dense", "aten::item") and _fake(args[0]):
            self.scalar_reads.append(f"{func} at {self._where()}")
            return _zero_of(args[0])
        if self.fake_mode is not None:
            # Host tensors made outside the fake mode (prepared pixels, pinned copies) enter it here:
            # left real, an op with no fake input would run for real (and a ``.to("cuda")`` fail).
            args, kwargs = tree_map_only(torch.Tensor, self._lift, (args, kwargs))
        self.tracker.prune()
        transient = 0
        if name == "aten::scaled_dot_product_attention" and _fake(args[0]) and args[0].device.type == "cuda":
            out, transient = self._sdpa(args, kwargs)
        else:
            out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self._check(func, args, kwargs, outs)
        for t in outs:
            self.tracker.add(t)
        self.tracker.mark(lambda: f"{func} at {self._where()}", transient)
        return out


@contextlib.contextmanager
def fake_cuda(
    fp32_sites: Sequence[Fp32Site] = DEFAULT_FP32_SITES, roots: Sequence[Path] = ()
) -> Iterator[_DeviceModel]:
    """A fresh fake CUDA device for small checks: ``FakeTensorMode`` plus the device model (pinning
    emulated, outputs checked, storages tracked in ``.tracker``). Tensors made inside belong to it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _DeviceModel(_PinRegistry(), StorageTracker(), fp32_sites, roots, mode)
    with mode, model:
        yield model


def measure_peak(fn: Callable[[], Any]) -> tuple[int, int]:
    """(peak live device bytes while ``fn`` ran, device bytes still held by its result) on a fresh
    fake CUDA device: the tracker :meth:`DryRun.score` uses, on code whose answer is known."""
    with fake_cuda() as dev:
        result = fn()
        dev.tracker.prune()
        held = dev.tracker.live_bytes
        peak = dev.tracker.peak_live_bytes
        del result
    return peak, held


# ---------------------------------------------------------------- inputs
def _jpeg(seed: int, w: int = 1920, h: int = 1080) -> bytes:
    """A photo-like JPEG (gradients + blocky noise, so it does not compress to nothing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx // 3 + seed * 37) % 256, (yy // 2 + seed * 11) % 256, ((xx + yy) // 4) % 256], -1)
    noise = rng.integers(0, 24, size=(h // 8 + 1, w // 8 + 1, 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(((base + noise) % 256).astype("uint8"), "RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


_WORDS = tuple(
    [
        "retrieval",
        "ranking",
        "passage",
        "model",
        "query",
        "answer",
        "capital",
        "France",
        "river",
        "mountain",
        "data",
        "system",
        "learning",
        "network",
        "image",
        "photo",
        "city",
        "history",
        "science",
        "music",
        "art",
    ]
)


def _passage(engine: Any, i: int, tokens: int) -> str:
    """A distinct text of about ``tokens`` tokens with the engine's tokenizer (one encode, one decode)."""
    words = [_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(tokens)]
    ids = engine._encode(f"passage {i}: " + " ".join(words))[:tokens]
    return str(engine._tokenizer.decode(ids.tolist()))


Request = tuple[Content, list[Content]]


def workload_requests(engine: Any, name: str, images: int = 50, distinct: int | None = None) -> list[Request]:
    """The requests of a named workload; ``distinct`` < ``images`` reuses images (fewer decodes)."""
    distinct = images if distinct is None else max(1, min(distinct, images))
    pics = [ImageInput(_jpeg(i), MediaType.JPEG) for i in range(distinct)] if name in ("a", "c") else []
    if name == "a":
        return [
            (
                Content(text="Find a picture of a city skyline at sunset near a river"),
                [Content(image=pics[i % distinct]) for i in range(images)],
            )
        ]
    if name == "b":
        return [
            (
                Content(text="what is the capital of France"),
                [Content(text=_passage(engine, i, 256)) for i in range(100)],
            )
        ]
    if name == "c":
        query = Content(text="a red tram in the old town", image=ImageInput(_jpeg(999), MediaType.JPEG))
        docs = [
            Content(image=pics[i % distinct]) if i % 2 else Content(text=_passage(engine, i, 96))
            for i in range(images)
        ]
        for i in range(0, images, 5):
            docs[i] = Content(text=_passage(engine, i, 32), image=pics[i % distinct])
        return [(query, docs)]
    if name == "packed":
        small = ImageInput(_jpeg(500, 640, 480), MediaType.JPEG)
        return [
            (Content(text="capital of France"), [Content(text=_passage(engine, i, 40)) for i in range(3)]),
            (Content(text="a dog on a beach"), [Content(image=small), Content(text="a dog running on sand")]),
            (Content(image=small), [Content(text="a photo of a beach"), Content(text="x", image=small)]),
            (Content(text="history of music"), [Content(text=_passage(engine, i, 120)) for i in range(4)]),
        ]
    raise ValueError(f"unknown workload {name!r}; known: {WORKLOADS}")


# ---------------------------------------------------------------- the dry run
class DryRun:
    """The real engine on a fake-CUDA model of a built-in shape. ``mutate(model)`` runs after the
    build (tests break the model on purpose with it); ``overrides`` go into ``Settings``."""

    def __init__(
        self,
        shape: str = "qwen2.5-vl-7b",
        checkpoint: Path | None = None,
        *,
        mutate: Callable[[Any], None] | None = None,
        overrides: dict[str, Any] | None = None,
        fp32_sites: Sequence[Fp32Site] = DEFAULT_FP32_SITES,
        roots: Sequence[Path] = (),
    ) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from lychee_server.engine import vision
        from lychee_server.engine.loading import (
            BUILTIN_SHAPES,
            LoadedModel,
            _set_pixel_bounds,
            _special_token_ids,
        )
        from lychee_server.engine.preprocess import FastImagePreprocessor
        from lychee_server.engine.qwen import QwenRerankEngine
        from lychee_server.settings import Settings

        t0 = time.perf_counter()
        self.shape = shape
        self.fp32_sites = tuple(fp32_sites)
        self.roots = tuple(roots)
        self.patches: list[str] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if checkpoint is None:
            from lychee_server.engine.checkpoint import build_tiny_checkpoint

            self._tmp = tempfile.TemporaryDirectory(prefix="lychee-dryrun-")
            checkpoint = build_tiny_checkpoint(Path(self._tmp.name) / "ckpt", seed=0)
        if shape not in BUILTIN_SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(BUILTIN_SHAPES)}")
        opts: dict[str, Any] = {
            "warmup": False,
            "random_weights": True,
            "device": "cuda",
            "dtype": "bfloat16",
        }
        opts.update(overrides or {})
        self.settings = Settings(model=str(checkpoint), **opts)
        processor = AutoProcessor.from_pretrained(str(checkpoint))  # type: ignore[no-untyped-call]
        _set_pixel_bounds(processor, self.settings.min_pixels, self.settings.max_pixels)
        cfg = dict(BUILTIN_SHAPES[shape])
        cfg.update(_special_token_ids(processor.tokenizer))
        config = Qwen2_5_VLConfig(**cfg)
        for sub in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
            if sub is not None:
                sub._attn_implementation = "sdpa"
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.registry = _PinRegistry()
        vision._cached_plan.cache_clear()  # plans hold device tensors of whichever mode made them
        with self.fake_mode, torch.device(_DEVICE):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(_DTYPE)
            try:
                model = Qwen2_5_VLForConditionalGeneration(config)
            finally:
                torch.set_default_dtype(prev)
        model.eval()  # type: ignore[no-untyped-call]
        model.requires_grad_(False)
        if mutate is not None:
            with self.fake_mode:
                mutate(model)
        self.model = model
        loaded = LoadedModel(
            model=model,
            processor=processor,
            device=_DEVICE,
            dtype=_DTYPE,
            attn_implementation="sdpa",
            model_id=f"random:{shape}",
            revision="",
            random_weights=True,
            random_weights_evidence="fake-CUDA dry run",
        )
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        real_init = FastImagePreprocessor.__init__
        real_check = FastImagePreprocessor.self_check

        def init(pre: Any, proc: Any) -> None:
            with unset_fake_temporarily():
                real_init(pre, proc)

        def check(pre: Any, proc: Any) -> bool:
            with unset_fake_temporarily():
                return bool(real_check(pre, proc))

        stack = contextlib.ExitStack()
        with stack:
            stack.enter_context(mock.patch.object(FastImagePreprocessor, "__init__", init))
            stack.enter_context(mock.patch.object(FastImagePreprocessor, "self_check", check))
            self.patches.append("FastImagePreprocessor construction and self_check run on real CPU tensors")
            try:
                from lychee_server.engine import attention

                if hasattr(attention, "VarlenAttention") and hasattr(attention.VarlenAttention, "self_check"):
                    stack.enter_context(
                        mock.patch.object(attention.VarlenAttention, "self_check", lambda _self: (True, ""))
                    )
                    self.patches.append("VarlenAttention.self_check assumed to pass (verified on the GPU)")
            except ImportError:
                pass
            with (
                self.fake_mode,
                _DeviceModel(self.registry, StorageTracker(), self.fp32_sites, self.roots, self.fake_mode),
            ):
                self.engine = QwenRerankEngine(loaded, self.settings)
        self.patches.append("pin_memory()/is_pinned() emulated (a copy remembered as pinned)")
        self.patches.append("reads of fake values (_local_scalar_dense: the final tolist) return 0")
        self.patches.append(
            "aten.scaled_dot_product_attention routed to the fused CUDA kernels (flash / mem-efficient)"
        )
        self.build_s = time.perf_counter() - t0
        self.attention_backend = str(getattr(self.engine, "attention_backend", "sdpa (padded batches)"))
        weights = self._weight_tensors()
        self.parameters = sum(p.numel() for p in model.parameters())
        self.weights_bytes = StorageTracker().set_baseline(weights)

    # ------------------------------------------------------------------ static checks
    def _weight_tensors(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.model.buffers()]

    def param_issues(self) -> list[Issue]:
        """Parameters/buffers not on the device or not bf16 (FP32 rotary ``inv_freq`` buffers allowed)."""
        out: list[Issue] = []
        for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if t.device.type != "cuda":
                out.append(Issue("param_device", name, f"on {t.device}", "model"))
            fp32_ok = name.endswith("inv_freq") and t.dtype == torch.float32
            if t.is_floating_point() and t.dtype != _DTYPE and not fp32_ok:
                out.append(Issue("param_dtype", name, f"{t.dtype}", "model"))
        return out

    def _resident(self) -> list[torch.Tensor]:
        """Every device tensor of this dry run alive now (weights, engine constants, caches, prefix
        states); another dry run's model in the same process is not counted."""
        import warnings

        from torch._subclasses.fake_tensor import FakeTensor

        with warnings.catch_warnings():  # isinstance() on some lazy torch modules warns
            warnings.simplefilter("ignore")
            return [
                o
                for o in gc.get_objects()
                if isinstance(o, FakeTensor) and o.fake_mode is self.fake_mode and o.device.type == "cuda"
            ]

    # ------------------------------------------------------------------ running
    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """Host-side engine code (prepare_*): real tensors, pinned memory emulated."""
        with _HostShim(self.registry):
            yield

    def prepare(
        self, requests: Sequence[Request], instruction: str = DEFAULT_INSTRUCTION
    ) -> tuple[list[Any], list[Any]]:
        """Prepared queries and pairs (in request order), through the engine's own prepare_* calls."""
        eng = self.engine

        def query(q: Content) -> Any:
            with self.host():
                return eng.prepare_query(instruction, q, 4096)

        queries = [query(q) for q, _ in requests]

        def pair(job: tuple[Any, Content]) -> Any:
            with self.host():
                return eng.prepare_pair(*job)

        jobs = [(pq, d) for pq, (_, docs) in zip(queries, requests, strict=True) for d in docs]
        with ThreadPoolExecutor(2) as pool:
            pairs = list(pool.map(pair, jobs))
        return queries, pairs

    def score(
        self, name: str, requests: Sequence[Request], *, audit: SyncAudit | None = None
    ) -> WorkloadResult:
        """Prepare and score ``requests`` in ONE ``score()`` call, checking and measuring it."""
        eng = self.engine
        eng.vision_cache.clear()
        t0 = time.perf_counter()
        queries, pairs = self.prepare(requests)
        prep = time.perf_counter() - t0
        gc.collect()
        tracker = StorageTracker()
        weights = StorageTracker().set_baseline(self._weight_tensors())
        total = tracker.set_baseline(self._resident())
        model = _DeviceModel(self.registry, tracker, self.fp32_sites, self.roots, self.fake_mode)
        failure: str | None = None
        scores: list[float] = []
        t1 = time.perf_counter()
        try:
            with self.fake_mode, model, audit if audit is not None else contextlib.nullcontext():
                scores = eng.score(pairs)
        except Exception as exc:  # a broken model fails inside the forward: reported, not raised
            failure = f"{type(exc).__name__}: {str(exc)[:400]}{_origin(exc)}"
        dt = time.perf_counter() - t1
        tracker.prune()
        mem = Memory(
            weights_bytes=weights,
            resident_bytes=total - weights,
            peak_activation_bytes=tracker.peak_live_bytes,
            peak_bytes=total + tracker.peak_live_bytes,
            retained_bytes=tracker.live_bytes,
            peak_op=tracker.peak_where,
        )
        for pq in queries:
            eng.release(pq)
        eng.vision_cache.clear()
        return WorkloadResult(
            name=name,
            requests=len(requests),
            pairs=len(pairs),
            score_calls=1,
            prepare_s=round(prep, 2),
            score_s=round(dt, 2),
            memory=mem,
            scores=len(scores),
            issues=list(model.issues),
            violations=audit.summary() if audit is not None else [],
            allowed_readbacks=[str(v) for v in audit.allowed_events] if audit is not None else [],
            scalar_reads=sorted(set(model.scalar_reads)),
            fp32_sites=dict(model.fp32),
            ops=model.ops,
            device_to_host=(
                len(audit.allowed_events) + sum(v.kind == "d2h" for v in audit.violations)
                if audit is not None
                else 0
            ),
            failure=failure,
        )

    def run_workload(self, name: str, images: int = 50, distinct: int | None = None) -> WorkloadResult:
        audit = SyncAudit(_DEVICE, roots=self.roots)
        return self.score(name, workload_requests(self.engine, name, images, distinct), audit=audit)

    def close(self) -> None:
        from lychee_server.engine import vision

        self.engine.close()
        vision._cached_plan.cache_clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def run(
    shape: str = "qwen2.5-vl-7b",
    workloads: Sequence[str] = WORKLOADS,
    *,
    checkpoint: Path | None = None,
    images: int = 50,
    distinct: int | None = None,
) -> Report:
    """Dry-run ``workloads`` on a fake-CUDA ``shape`` model; no GPU, no weights needed."""
    dry = DryRun(shape, checkpoint)
    try:
        results = [dry.run_workload(w, images, distinct) for w in workloads]
        return Report(
            shape=shape,
            parameters=dry.parameters,
            weights_bytes=dry.weights_bytes,
            build_s=dry.build_s,
            attention_backend=dry.attention_backend,
            torch_version=torch.__version__,
            patches=list(dry.patches),
            param_issues=dry.param_issues(),
            workloads=results,
        )
    finally:
        dry.close()
