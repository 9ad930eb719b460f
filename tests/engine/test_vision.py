"""The fast image preprocessing equals the HF processor bit for bit; the batched vision tower equals
transformers' vision tower (up to float summation order) for mixed image sizes in one call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lychee_server.engine.preprocess import FastImagePreprocessor, hf_patches
from lychee_server.engine.qwen import QwenRerankEngine
from lychee_server.engine.vision import build_plan

SIZES = [(57, 91), (300, 40), (28, 28), (1, 1), (29, 1000), (1920, 1080), (1333, 777), (64, 64)]


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_fast_preprocessing_is_bit_identical(tiny_engine: QwenRerankEngine, w: int, h: int) -> None:
    ip = tiny_engine.processor.image_processor
    fast = FastImagePreprocessor(ip)
    img = _image(w, h, seed=w * 7 + h)
    got, grid = fast(img)
    want, want_grid = hf_patches(ip, img)
    assert grid == want_grid
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
    # The temporal duplicate hf_patches drops really is a duplicate of what the processor writes.
    full = ip(images=[img], return_tensors="pt")["pixel_values"]
    t = int(ip.temporal_patch_size)
    assert torch.equal(full, got.view(got.shape[0], 3, 1, -1).expand(-1, -1, t, -1).reshape(full.shape))


def test_engine_uses_fast_preprocessing(tiny_engine: QwenRerankEngine) -> None:
    assert tiny_engine._fast_pre is not None  # self-check passed on the installed transformers


def test_plan_covers_every_patch_once() -> None:
    grids = [(1, 52, 94), (1, 4, 6), (1, 2, 2), (1, 52, 94), (1, 20, 8)]
    plan = build_plan(grids, merge=2, window=4, device=torch.device("cpu"))
    n = sum(t * h * w for t, h, w in grids)
    assert sorted(plan.patch_order.tolist()) == list(range(n))
    covered = sum(count * length for _, count, length in plan.window_groups)
    assert covered == n and len(plan.window_groups) <= 9
    full = torch.cat([g.reshape(-1) for g in plan.full_groups if g is not None])
    assert sorted(full.tolist()) == list(range(n))
    assert len(plan.full_groups) == 4  # images of equal size share one attention call


def test_vision_tower_matches_transformers(tiny_engine: QwenRerankEngine) -> None:
    ip = tiny_engine.processor.image_processor
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    fast = FastImagePreprocessor(ip)
    prepared = [fast(img) for img in images]
    with torch.inference_mode():
        got = tiny_engine.tower([p for p, _ in prepared], [g for _, g in prepared])
        ref_in = ip(images=images, return_tensors="pt")
        out = tiny_engine.visual(ref_in["pixel_values"], grid_thw=ref_in["image_grid_thw"])
        want = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
