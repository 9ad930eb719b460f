"""Find the host synchronisations and data-dependent shapes in a piece of engine code (issue 12).

Why: on a GPU the engine is fast only while the host can queue kernels ahead of the device. Any op
that makes the host wait for the device (``.item()``, ``tolist()``, a boolean mask whose result size
is only known on the device, a blocking host<->device copy) drains that queue, and one per layer or
per batch costs more than the kernels around it. Such ops are invisible in the code's output and
easy to add back by accident, so :class:`SyncAudit` records every one of them while ``score()`` (or
anything else) runs, with the engine source line that issued it.

It is a ``TorchDispatchMode``: it sees each ATen op after autograd, on real tensors (a CPU run of the
tiny engine) as well as on fake ones (``engine.dryrun``'s fake CUDA device), and only observes: ops
run unchanged. What it records (``Violation.kind``):

* ``nonzero``, ``masked_select``, ``unique``, ``bool_index`` (``x[mask]``, ``x[mask] = y``: index /
  index_put with a bool or uint8 index), ``repeat_interleave`` (tensor repeats without
  ``output_size``), ``bincount``: the output size is data-dependent, the host must read it back;
* ``item``: ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``tolist()`` of a fake
  tensor) and ``equal``, on a device tensor;
* ``h2d_blocking`` (a host->device copy without ``non_blocking=True``) and ``h2d_unpinned``
  (``non_blocking=True`` from pageable memory, which CUDA stages synchronously);
* ``implicit_h2d``: a device op with a (non-scalar) host tensor operand, e.g. ``cuda_x[cpu_index]``:
  a hidden blocking copy. 0-dim host tensors are not counted: kernels read them as host scalars;
* ``d2h``: a device->host copy. The one final readback of the scores is allowed in a narrow way:
  inside ``with audit.allowed("final readback"):`` or when a frame of the engine stack is a function
  named in ``allow_functions`` (default ``_readback``: the engine's one readback helper). Allowed
  copies go to :attr:`SyncAudit.allowed_events`, not to :attr:`SyncAudit.violations`; nothing but a
  ``d2h`` is ever allowed that way.

Host and device: with ``device`` a CUDA device, a CPU tensor is host memory (tokenizer ids, NumPy
arrays, pixels) and its own ops are host work, never recorded; copies are judged by their source and
destination devices. On a CPU run (``device`` cpu) every tensor is a device tensor and no copy
crosses devices, so only the data-dependent ops and ``item`` are found there; the copies need the
fake CUDA run. ``masked_scatter`` is deliberately not recorded: its CUDA kernel is a prefix sum over
the mask with no host read-back (it is the sync-free replacement for ``x[mask] = y``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Frame", "SyncAudit", "Violation", "engine_frames"]

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../lychee_server
_TORCH_DIR = Path(torch.__file__).resolve().parent
# Frames of these files are the audit machinery, never the code under audit.
_SELF_FILES = frozenset({str(Path(__file__).resolve()), str(_PACKAGE_DIR / "engine" / "dryrun.py")})

_DATA_DEPENDENT = {
    "aten::nonzero": "nonzero",
    "aten::argwhere": "nonzero",
    "aten::masked_select": "masked_select",
    "aten::unique": "unique",
    "aten::_unique": "unique",
    "aten::_unique2": "unique",
    "aten::unique_dim": "unique",
    "aten::unique_consecutive": "unique",
    "aten::unique_dim_consecutive": "unique",
    "aten::bincount": "bincount",
}
_SCALAR_READS = {
    "aten::_local_scalar_dense": "item",
    "aten::item": "item",
    "aten::is_nonzero": "item",
    "aten::equal": "equal",
}
_INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
# Copy ops: name -> (source argument, destination argument or None for a new tensor). Under
# ``inference_mode`` the composite ``aten::to`` overloads reach a dispatch mode undecomposed.
_COPY_OPS = {
    "aten::_to_copy": ("self", None),
    "aten::to": ("self", None),
    "aten::copy_": ("src", "self"),
    "aten::copy": ("src", "self"),
    "aten::_copy_from": ("self", "dst"),
    "aten::_copy_from_and_resize": ("self", "dst"),
}
_PIN_OPS = frozenset({"aten::_pin_memory", "aten::pin_memory"})


@dataclass(frozen=True)
class Frame:
    """One Python frame: ``file`` relative to the lychee_server package (or to a root), 1-based line."""

    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"


@dataclass(frozen=True)
class Violation:
    """One recorded op: what it was, why it synchronises, and who issued it.

    ``stack`` holds the frames of the audited code (the lychee_server package plus any ``roots``),
    innermost first; ``caller`` is the innermost frame outside torch and the audit whatever its file
    (so a planted test function is located too). ``region`` is the ``allowed`` region it ran in."""

    kind: str
    op: str
    detail: str
    stack: tuple[Frame, ...]
    caller: Frame | None
    region: str | None = None

    @property
    def where(self) -> str:
        """The innermost audited frame (``engine/qwen.py:486 in _embed``), else the caller."""
        if self.stack:
            return str(self.stack[0])
        return str(self.caller) if self.caller is not None else "?"

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} at {self.where} ({self.detail})"


def engine_frames(
    start: types.FrameType | None, roots: Iterable[Path] = (), limit: int = 64
) -> tuple[tuple[Frame, ...], Frame | None]:
    """The audited frames from ``start`` outwards (innermost first) and the innermost non-torch frame."""
    root_list = [_PACKAGE_DIR, *(Path(r).resolve() for r in roots)]
    out: list[Frame] = []
    caller: Frame | None = None
    frame = start
    depth = 0
    while frame is not None and depth < limit:
        depth += 1
        filename = frame.f_code.co_filename
        if filename in _SELF_FILES or filename.startswith(str(_TORCH_DIR)) or filename.startswith("<"):
            frame = frame.f_back
            continue
        path = Path(filename)
        name = frame.f_code.co_name
        rel: str | None = None
        for root in root_list:
            if filename.startswith(str(root) + os.sep):
                rel = str(path.relative_to(root))
                break
        if caller is None:
            caller = Frame(rel or path.name, frame.f_lineno, name)
        if rel is not None:
            out.append(Frame(rel, frame.f_lineno, name))
        frame = frame.f_back
    return tuple(out), caller


def _tensors(obj: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _named_args(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``args``/``kwargs`` of an op by the names of its schema (overloads order them differently)."""
    named = dict(kwargs)
    schema = getattr(func, "_schema", None)
    if schema is not None:
        for arg, value in zip(schema.arguments, args, strict=False):
            named[arg.name] = value
    return named


def _schema_name(func: Any) -> str:
    schema = getattr(func, "_schema", None)
    return str(schema.name) if schema is not None else str(func)


class SyncAudit(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Record host-synchronising and data-dependent ops (see the module docstring).

    ``device``: the engine's compute device (``engine.device``). ``allow_functions``: function names
    whose presence in the audited stack allows a device->host copy (the final readback).
    ``roots``: extra source directories whose frames count as audited code (tests planting ops).
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        allow_functions: Iterable[str] = ("_readback",),
        roots: Iterable[Path] = (),
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.device = torch.device(device)
        self.allow_functions = frozenset(allow_functions)
        self.roots = tuple(Path(r) for r in roots)
        self.violations: list[Violation] = []
        self.allowed_events: list[Violation] = []
        self.ops = 0
        self._regions: list[str] = []
        # Storages made by pin_memory() while auditing (fake tensors cannot say they are pinned).
        self._pinned: dict[int, StorageWeakRef] = {}

    # ------------------------------------------------------------------ regions
    @contextlib.contextmanager
    def allowed(self, name: str) -> Iterator[None]:
        """Allow the device->host copies issued inside this block (and nothing else)."""
        self._regions.append(name)
        try:
            yield
        finally:
            self._regions.pop()

    # ------------------------------------------------------------------ classification
    def _is_device(self, t: torch.Tensor) -> bool:
        if self.device.type == "cpu":
            return t.device.type != "meta"
        return t.device.type == self.device.type

    def _is_host(self, t: torch.Tensor) -> bool:
        return self.device.type != "cpu" and t.device.type == "cpu"

    def _pinned_source(self, t: torch.Tensor) -> bool:
        try:
            ref = StorageWeakRef(t.untyped_storage())  # type: ignore[no-untyped-call]
        except (RuntimeError, NotImplementedError):
            return False
        if ref.cdata in self._pinned and not self._pinned[ref.cdata].expired():  # type: ignore[no-untyped-call]
            return True
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(t, FakeTensor):
            return False
        try:
            return bool(t.is_pinned())
        except RuntimeError:  # no CUDA runtime: nothing on this machine is pinned
            return False

    def _classify(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, str]]:
        """(kind, detail) for each reason ``func(*args, **kwargs)`` synchronises; empty if none."""
        name = _schema_name(func)
        found: list[tuple[str, str]] = []
        flat = _tensors((args, kwargs))
        on_device = [t for t in flat if self._is_device(t)]
        if name in _DATA_DEPENDENT:
            if on_device:
                found.append((_DATA_DEPENDENT[name], "output size depends on device data"))
            return found
        if name in _SCALAR_READS:
            if on_device:
                found.append((_SCALAR_READS[name], "reads a device value on the host"))
            return found
        if name in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            for idx in indices or ():
                if isinstance(idx, torch.Tensor) and idx.dtype in (torch.bool, torch.uint8) and on_device:
                    found.append(("bool_index", f"{name} with a {idx.dtype} mask (nonzero inside)"))
                    break
        if name == "aten::repeat_interleave":
            overload = getattr(func, "_overloadname", "")
            repeats = args[0] if overload == "Tensor" else (args[1] if len(args) > 1 else None)
            if (
                isinstance(repeats, torch.Tensor)
                and self._is_device(repeats)
                and kwargs.get("output_size") is None
            ):
                found.append(("repeat_interleave", "tensor repeats without output_size"))
            return found
        if name in _COPY_OPS:
            named = _named_args(func, args, kwargs)
            src_name, dst_name = _COPY_OPS[name]
            src = named.get(src_name)
            if not isinstance(src, torch.Tensor):
                return found
            if dst_name is not None and isinstance(named.get(dst_name), torch.Tensor):
                dst_device = named[dst_name].device
            elif isinstance(named.get("other"), torch.Tensor):  # to.other
                dst_device = named["other"].device
            else:
                dst_device = torch.device(named.get("device") or src.device)
            non_blocking = bool(named.get("non_blocking", False))
            if self.device.type == "cpu" or src.device.type == dst_device.type:
                return found
            nbytes = src.numel() * src.element_size()
            if src.device.type == "cpu" and dst_device.type == self.device.type:
                if not non_blocking:
                    found.append(("h2d_blocking", f"{nbytes} B host->device without non_blocking=True"))
                elif not self._pinned_source(src):
                    found.append(("h2d_unpinned", f"{nbytes} B non_blocking from pageable host memory"))
            elif src.device.type == self.device.type and dst_device.type == "cpu":
                found.append(("d2h", f"{nbytes} B device->host"))
            return found
        if self.device.type != "cpu" and on_device and name not in _PIN_OPS:
            for t in flat:
                if self._is_host(t) and t.dim() > 0:
                    found.append(("implicit_h2d", f"{name} reads a host tensor {tuple(t.shape)} {t.dtype}"))
                    break
        return found

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        reasons = self._classify(func, args, kwargs)
        if reasons:
            stack, caller = engine_frames(sys._getframe(1), self.roots)
            region = self._regions[-1] if self._regions else None
            allowed_fn = any(f.function in self.allow_functions for f in stack)
            for kind, detail in reasons:
                v = Violation(kind, str(func), detail, stack, caller, region)
                if kind == "d2h" and (region is not None or allowed_fn):
                    self.allowed_events.append(v)
                else:
                    self.violations.append(v)
        out = func(*args, **kwargs)
        if _schema_name(func) in _PIN_OPS:
            for t in _tensors(out):
                ref = StorageWeakRef(t.untyped_storage())  # type: ignore[no-untyped-call]
                self._pinned[ref.cdata] = ref
        return out

    # ------------------------------------------------------------------ results
    def summary(self) -> list[str]:
        """One line per distinct (kind, op, innermost frame), with its count, for reports."""
        counts: dict[str, int] = {}
        for v in self.violations:
            line = str(v)
            counts[line] = counts.get(line, 0) + 1
        return [f"{n}x {line}" for line, n in sorted(counts.items())]

    def kinds(self) -> set[str]:
        return {v.kind for v in self.violations}
