"""The Qwen2.5-VL vision tower run over its own weight modules, with batched window attention.

Why not ``model.visual(pixels, grid_thw)``: with SDPA (no flash-attn varlen kernel) transformers runs
window attention as a Python loop of one attention call per window per layer (~80 windows for one
1080p image, x28 windowed layers on the 7B tower: thousands of tiny kernel launches per image).
Here the merge units are *reordered* so that windows of equal size are contiguous: then one layer is
at most nine attention calls (a window holds 1..4 x 1..4 merge units, so few distinct sizes exist)
whatever the number of images, each a plain batched SDPA call on a view, with no mask and no padding.
Full-attention layers attend within each image; images of equal size are batched into one call.
Attention does not depend on token order within a segment (no causal mask), and the merger output is
put back into the processor's order, so the result equals transformers' up to float summation order
(checked by ``tests/engine/test_vision.py`` and the golden tests).

Input patches come without the temporal duplicate the processor writes for still images (see
``engine.preprocess``): the two temporal slices of the Conv3d patch kernel are summed once, and the
patch embedding becomes one matmul.
"""

from __future__ import annotations

import functools
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lychee_server.engine.fused import FusedOps
from lychee_server.engine.interface import run_steps

__all__ = ["VisionPlan", "VisionTower"]


@dataclass(frozen=True)
class VisionPlan:
    """Token layout of one vision-tower call over several images (all index tensors on the device)."""

    patch_order: torch.Tensor  # (N,) processor patch index of each position in the run order
    unit_inverse: torch.Tensor  # (N / unit,) run-order unit of each processor-order unit
    window_groups: tuple[tuple[int, int, int], ...]  # (start, count, length) in patches, contiguous
    full_groups: tuple[torch.Tensor | None, ...]  # (count, length) run-order indices; None = all tokens
    positions: torch.Tensor  # (N, 2) (row, col) rotary positions in run order


@functools.lru_cache(maxsize=16)
def _cached_plan(
    grids: tuple[tuple[int, int, int], ...], merge: int, window: int, device: torch.device
) -> VisionPlan:
    return build_plan(grids, merge, window, device)


@dataclass(frozen=True, eq=False)
class _GridLayout:
    """The host-side layout of one image grid, unit indices counted from 0 (cached per grid, so a
    chunk of images in a new combination only concatenates cached pieces)."""

    units: int  # merge units of all frames
    frame_units: int
    frames: int
    windows: tuple[tuple[int, np.ndarray], ...]  # (window length in units, (count, length) indices)
    positions: np.ndarray  # (t*h*w, 2) (row, col) of each patch in processor order


@functools.lru_cache(maxsize=512)
def _grid_layout(grid: tuple[int, int, int], merge: int, window: int) -> _GridLayout:
    t, h, w = grid
    gh, gw = h // merge, w // merge
    nwh, nww = -(-gh // window), -(-gw // window)
    windows: dict[int, list[np.ndarray]] = {}
    for frame in range(t):
        idx = np.full((nwh * window, nww * window), -1, dtype=np.int64)
        idx[:gh, :gw] = np.arange(gh * gw).reshape(gh, gw) + frame * gh * gw
        # (window row, window col, row in window, col in window): windows row-major, units inside too
        tiles = idx.reshape(nwh, window, nww, window).transpose(0, 2, 1, 3).reshape(-1, window * window)
        counts = (tiles >= 0).sum(axis=1)
        for length in np.unique(counts[counts > 0]).tolist():
            sel = tiles[counts == length]
            windows.setdefault(length, []).append(sel[sel >= 0].reshape(-1, length))
    # Rotary (row, col) of each patch in processor order: merge units row-major, 2x2 inside.
    rows = np.arange(h).reshape(gh, merge, 1, 1) * np.ones((1, 1, gw, merge), dtype=np.int64)
    cols = np.arange(w).reshape(1, 1, gw, merge) * np.ones((gh, merge, 1, 1), dtype=np.int64)
    rc = np.stack([rows.transpose(0, 2, 1, 3).reshape(-1), cols.transpose(0, 2, 1, 3).reshape(-1)], 1)
    layout = _GridLayout(
        units=t * gh * gw,
        frame_units=gh * gw,
        frames=t,
        windows=tuple((n, np.concatenate(parts)) for n, parts in sorted(windows.items())),
        positions=np.tile(rc, (t, 1)),
    )
    for _, arr in layout.windows:
        arr.setflags(write=False)
    layout.positions.setflags(write=False)
    return layout


def _to_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without a host sync: pinned and asynchronous on CUDA."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def build_plan(
    grids: Sequence[tuple[int, int, int]], merge: int, window: int, device: torch.device
) -> VisionPlan:
    """Layout for ``grids`` (t, h, w) in patches; ``window`` is the window side in merge units."""
    unit = merge * merge
    windows: dict[int, list[np.ndarray]] = {}  # window length (units) -> unit index lists
    segments: list[np.ndarray] = []  # processor-order unit ranges of each attention frame
    pos_parts: list[np.ndarray] = []
    offset = 0
    for grid in grids:
        lay = _grid_layout((int(grid[0]), int(grid[1]), int(grid[2])), merge, window)
        for length, arr in lay.windows:
            windows.setdefault(length, []).append(arr + offset)
        for frame in range(lay.frames):
            start = offset + frame * lay.frame_units
            segments.append(np.arange(start, start + lay.frame_units))
        pos_parts.append(lay.positions)
        offset += lay.units
    order_units: list[np.ndarray] = []
    window_groups: list[tuple[int, int, int]] = []
    start = 0
    for length in sorted(windows):
        group = np.concatenate(windows[length])  # (windows, length) unit indices
        order_units.append(group.reshape(-1))
        window_groups.append((start * unit, len(group), length * unit))
        start += group.size
    unit_order = np.concatenate(order_units)
    unit_inverse = np.empty_like(unit_order)
    unit_inverse[unit_order] = np.arange(len(unit_order))
    sub = np.arange(unit)
    patch_order = (unit_order[:, None] * unit + sub).reshape(-1)
    full_groups: list[torch.Tensor | None] = []
    if len(segments) == 1:
        full_groups.append(None)
    else:
        by_len: dict[int, list[np.ndarray]] = {}
        for seg in segments:
            run = np.sort(unit_inverse[seg])
            by_len.setdefault(len(seg), []).append((run[:, None] * unit + sub).reshape(-1))
        for rows_ in by_len.values():
            full_groups.append(_to_device(np.stack(rows_), device))
    positions = np.concatenate(pos_parts)[patch_order]
    return VisionPlan(
        patch_order=_to_device(patch_order, device),
        unit_inverse=_to_device(unit_inverse, device),
        window_groups=tuple(window_groups),
        full_groups=tuple(full_groups),
        positions=_to_device(positions, device),
    )


class VisionTower:
    """Runs ``visual`` (a ``Qwen2_5_VisionTransformerPretrainedModel``) on still images."""

    def __init__(self, visual: Any, fused: FusedOps | None = None) -> None:
        cfg = visual.config
        self.visual = visual
        self.fused = fused if fused is not None else FusedOps("off")
        self.merge = int(cfg.spatial_merge_size)
        self.window = int(cfg.window_size) // self.merge // int(cfg.patch_size)
        self.full_blocks = frozenset(int(i) for i in cfg.fullatt_block_indexes)
        self.heads = int(cfg.num_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        weight = visual.patch_embed.proj.weight  # (E, C, T, P, P)
        self.dtype = weight.dtype
        self.device = weight.device
        # A still image repeats its frame over T: conv(x repeated) == x @ (sum over T of the kernel).
        self.w_patch = weight.detach().float().sum(dim=2).reshape(weight.shape[0], -1).to(self.dtype)
        self.inv_freq = visual.rotary_pos_emb.inv_freq.detach().to(self.device, torch.float32)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (N, 2, D/4)
        f = freqs.flatten(1)  # rows then cols: (N, D/2)
        emb = torch.cat([f, f], dim=-1)[:, None]  # (N, 1, D)
        return emb.cos(), emb.sin()

    def _attention(
        self, x: torch.Tensor, attn: Any, cos: torch.Tensor, sin: torch.Tensor, plan: VisionPlan, full: bool
    ) -> Generator[None, None, torch.Tensor]:
        n = x.shape[0]
        qkv = attn.qkv(x).view(n, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        # Rotary in float32 like transformers, then back to the compute dtype (one fused kernel
        # for q and k where engine.fused compiles).
        q, k = self.fused.rotary_qk_f32(q, k, cos, sin)
        out = torch.empty_like(q)
        scale = self.head_dim**-0.5
        if full:
            for index in plan.full_groups:
                if index is None:
                    qq, kk, vv = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, N, D)
                else:
                    qq, kk, vv = (t[index].transpose(1, 2) for t in (q, k, v))  # (count, H, L, D)
                o = yield from _chunked_sdpa(qq, kk, vv, scale)
                if index is None:
                    out = o[0].transpose(0, 1)
                else:
                    out[index] = o.transpose(1, 2)
        else:
            for start, count, length in plan.window_groups:
                end = start + count * length
                qq, kk, vv = (
                    t[start:end].view(count, length, self.heads, -1).transpose(1, 2) for t in (q, k, v)
                )
                o = F.scaled_dot_product_attention(qq, kk, vv, scale=scale)
                out[start:end] = o.transpose(1, 2).reshape(count * length, self.heads, -1)
                yield
        projected: torch.Tensor = attn.proj(out.reshape(n, -1))
        return projected

    def __call__(
        self, patches: Sequence[torch.Tensor], grids: Sequence[tuple[int, int, int]]
    ) -> torch.Tensor:
        """Merged embeddings ``(sum of t*h*w/merge^2, out_hidden)`` of the images, in input order.

        ``patches[i]`` is image i's ``(t*h*w, C*P*P)`` patch matrix (no temporal duplicate), on any
        device; ``grids[i]`` its (t, h, w) patch grid.
        """
        return run_steps(self.steps(patches, grids))

    def steps(
        self, patches: Sequence[torch.Tensor], grids: Sequence[tuple[int, int, int]]
    ) -> Generator[None, None, torch.Tensor]:
        """:meth:`__call__` pausing after each block and each full-attention query chunk."""
        # Batches of same-resolution images repeat their layouts: cache them (small CPU work otherwise).
        plan = _cached_plan(tuple(tuple(g) for g in grids), self.merge, self.window, self.device)
        # Embed per image, then reorder the (N, hidden) result: no concatenated copy of the inputs.
        embedded = [F.linear(p.to(self.device, self.dtype, non_blocking=True), self.w_patch) for p in patches]
        h = torch.cat(embedded).index_select(0, plan.patch_order)
        cos, sin = self._rotary(plan.positions)
        yield
        for i, blk in enumerate(self.visual.blocks):
            fz = self.fused
            x = fz.norm(blk.norm1, h)
            h = h + (yield from self._attention(x, blk.attn, cos, sin, plan, i in self.full_blocks))
            yield
            h = h + fz.mlp(blk.mlp, fz.norm(blk.norm2, h))
            yield
        merged: torch.Tensor = self.visual.merger(h)
        return merged[plan.unit_inverse]


# Query rows x keys per full-attention call (per image of a group, all heads together). Queries
# attend independently, so a chunk of query rows is exact; the chunks bound the step between two
# preemption points (24M pairs for a 1080p image at the 7B's patch size: twelve chunks) and the score
# matrix of SDPA's math backend, which materialises it (on the CPU).
_FULL_ATTENTION_PAIRS = 1 << 21


def _chunked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> Generator[None, None, torch.Tensor]:
    """SDPA of (B, H, L, D) tensors, over chunks of query rows with a pause between chunks."""
    count, length = q.shape[0], q.shape[2]
    rows = max(64, _FULL_ATTENTION_PAIRS // max(count * k.shape[2], 1))
    if rows >= length:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = torch.empty_like(q)
    for start in range(0, length, rows):
        end = min(start + rows, length)
        out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k, v, scale=scale)
        if end < length:
            yield
    return out
