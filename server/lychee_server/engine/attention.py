"""Attention over packed tokens (no padding): one contract, torch's varlen flash kernel behind it on
CUDA, and an exact reference of the same contract everywhere else.

Why packed tokens: a batch of documents after a shared prefix is ragged (a 300-token passage next to
four 20-token ones). Padding it to (B, S) makes every attention call pay for the longest row, expands
GQA's key/value heads to the query heads, and copies the prefix K/V once per document per layer.
Here attention is two varlen calls per layer, merged exactly:

* the documents' own keys, causal within each document (``cu_q == cu_k``);
* the prefix keys, all visible, read once per *request* (documents of one request form one query
  segment against their request's prefix; several requests in one batch are several segments);

and the two partial softmaxes are combined with their log-sum-exp values (:func:`merge`), which is
the same function as one softmax over ``[prefix; document]`` keys, up to float summation order.

The contract (:func:`attend`): ``q`` (Tq, Hq, D), ``k``/``v`` (Tk, KV, D) with Hq a multiple of KV
(GQA inside, never expanded), segments given by cumulative offsets; returns the output (Tq, Hq, D)
in q's dtype and the log-sum-exp (Tq, Hq) in float32. ``causal`` aligns the mask bottom-right (only
used here with equal query and key lengths). The reference computes each segment in float32 with
one matmul-softmax-matmul; it is the CPU path of the ``varlen`` backend and the yardstick the CUDA
kernel is checked against at start-up (:func:`self_check`) — the kernel is used only when it agrees.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Segments", "VarlenAttention", "attend_reference", "merge"]


@dataclass(frozen=True, eq=False)
class Segments:
    """Cumulative query / key offsets of ``n`` segments: host lists (the reference, max lengths) and,
    for the kernel, int32 device tensors copied without a host sync."""

    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    dev_q: torch.Tensor | None = None
    dev_k: torch.Tensor | None = None

    @property
    def max_q(self) -> int:
        return max((b - a for a, b in zip(self.cu_q, self.cu_q[1:], strict=False)), default=0)

    @property
    def max_k(self) -> int:
        return max((b - a for a, b in zip(self.cu_k, self.cu_k[1:], strict=False)), default=0)

    @staticmethod
    def cumulative(lengths: Sequence[int]) -> tuple[int, ...]:
        out = [0]
        for n in lengths:
            out.append(out[-1] + int(n))
        return tuple(out)


def attend_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, *, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract, computed per segment in float32 (exact up to summation order)."""
    tq, hq, d = q.shape
    kv = k.shape[1]
    rep = hq // kv
    out = q.new_zeros(tq, hq, d)
    lse = torch.full((tq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(len(seg.cu_q) - 1):
        qa, qb = seg.cu_q[i], seg.cu_q[i + 1]
        ka, kb = seg.cu_k[i], seg.cu_k[i + 1]
        lq, lk = qb - qa, kb - ka
        if lq == 0 or lk == 0:
            continue
        qs = q[qa:qb].float().view(lq, kv, rep, d).permute(1, 2, 0, 3)  # (KV, rep, Lq, D)
        ks = k[ka:kb].float().permute(1, 0, 2)[:, None]  # (KV, 1, Lk, D)
        vs = v[ka:kb].float().permute(1, 0, 2)[:, None]
        s = (qs @ ks.transpose(-1, -2)) * scale  # (KV, rep, Lq, Lk)
        if causal:
            qi = torch.arange(lq, device=q.device)[:, None]
            kj = torch.arange(lk, device=q.device)[None, :]
            s = s.masked_fill(kj > qi + (lk - lq), float("-inf"))
        m = torch.logsumexp(s, dim=-1)  # (KV, rep, Lq)
        o = torch.exp(s - m[..., None]) @ vs  # (KV, rep, Lq, D)
        out[qa:qb] = o.permute(2, 0, 1, 3).reshape(lq, hq, d).to(q.dtype)
        lse[qa:qb] = m.permute(2, 0, 1).reshape(lq, hq)
    return out, lse


def merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Softmax over the union of two key sets from the two partial results.

    The weights come from the log-sum-exps in float32; in float32 the combination is exact up to
    rounding. In a 16-bit dtype the two outputs are combined in that dtype with the float32-derived
    weights (rounded once): the outputs are 16-bit already, and no (T, H, D) float32 copy of them is
    made per layer."""
    m = torch.maximum(l1, l2)
    a = torch.exp(l1 - m)
    b = torch.exp(l2 - m)
    w1 = (a / (a + b))[..., None]
    if o1.dtype == torch.float32:
        return o1 * w1 + o2 * (1.0 - w1)
    return o1 * w1.to(o1.dtype) + o2 * (1.0 - w1).to(o2.dtype)


class VarlenAttention:
    """:func:`attend_reference`'s contract on the best kernel that computes it here.

    On CUDA: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9; its keyword set differs between
    releases, so it is read from the signature), used only when :meth:`self_check` agrees with the
    reference; elsewhere (or when the check fails): the reference. ``kernel`` says which runs.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, use_kernel: bool) -> None:
        self.device = device
        self.dtype = dtype
        self._fn: Any = None
        self._params: frozenset[str] = frozenset()
        self._aux: Any = None
        self.note = "reference (no varlen kernel on this device)"
        if use_kernel and device.type == "cuda":
            self._load_kernel()

    @property
    def kernel(self) -> bool:
        return self._fn is not None

    def _load_kernel(self) -> None:
        try:
            from torch.nn.attention import varlen
        except ImportError as exc:
            self.note = f"reference (torch.nn.attention.varlen unavailable: {exc})"
            return
        self._fn = varlen.varlen_attn
        self._params = frozenset(inspect.signature(self._fn).parameters)
        self._aux = varlen.AuxRequest(lse=True)
        ok, why = self.self_check()
        if ok:
            self.note = "torch varlen flash kernel"
        else:
            self._fn = None
            self.note = f"reference (varlen kernel disagrees or fails: {why})"

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fn is None:
            return attend_reference(q, k, v, seg, causal=causal, scale=scale)
        return self._kernel(q, k, v, seg, causal=causal, scale=scale)

    def segments(self, cu_q: Sequence[int], cu_k: Sequence[int]) -> Segments:
        """Segments whose device copies are made only when the kernel needs them (pinned, async)."""
        hq, hk = tuple(int(x) for x in cu_q), tuple(int(x) for x in cu_k)
        if self._fn is None:
            return Segments(hq, hk)

        def dev(xs: tuple[int, ...]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int32).pin_memory().to(self.device, non_blocking=True)

        return Segments(hq, hk, dev(hq), dev(hk))

    def _kernel(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs: dict[str, Any] = {"return_aux": self._aux}
        if "scale" in self._params:
            kwargs["scale"] = scale
        if "window_size" in self._params:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        elif "is_causal" in self._params:
            kwargs["is_causal"] = causal
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in self._params:
                kwargs["enable_gqa"] = True
            else:  # an older kernel without GQA: expand (correct, more bytes)
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out, lse = self._fn(q, k, v, seg.dev_q, seg.dev_k, seg.max_q, seg.max_k, **kwargs)
        lse = lse.float()
        if lse.shape != (q.shape[0], q.shape[1]):  # the flash convention: (H, T)
            lse = lse.transpose(0, 1)
        return out, lse

    def self_check(self) -> tuple[bool, str]:
        """The kernel against the reference on random ragged GQA segments (causal and not)."""
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            hq, kv, d = 8, 2, 64
            lengths_q = [5, 1, 17]
            lengths_k = [9, 3, 17]
            tol = 1e-4 if self.dtype == torch.float32 else 3e-2
            for causal, lk in ((True, lengths_q), (False, lengths_k)):
                seg = self.segments(Segments.cumulative(lengths_q), Segments.cumulative(lk))
                tq, tk = sum(lengths_q), sum(lk)
                q, k, v = (
                    torch.randn(n, h, d, generator=gen).to(self.device, self.dtype)
                    for n, h in ((tq, hq), (tk, kv), (tk, kv))
                )
                got, got_lse = self._kernel(q, k, v, seg, causal=causal, scale=d**-0.5)
                want, want_lse = attend_reference(q, k, v, seg, causal=causal, scale=d**-0.5)
                err = float((got.float() - want.float()).norm() / want.float().norm())
                lerr = float((got_lse - want_lse).abs().max())
                if not (err < tol and lerr < tol * 10):
                    return False, f"causal={causal}: relative error {err:.2e}, lse error {lerr:.2e}"
        except Exception as exc:  # a kernel that cannot run here: the reference serves
            return False, f"{type(exc).__name__}: {str(exc)[:200]}"
        return True, ""
