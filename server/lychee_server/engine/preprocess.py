"""Qwen2.5-VL image preprocessing (resize + rescale/normalize + patchify) without the HF call overhead.

Why: the HF image processor is generic (grouping by shape, kwargs validation, a float32 copy of the
whole resized image for the normalisation, then a second copy that duplicates every patch along the
temporal axis because a still image is fed to a video patch embedding). For a 1080p document that is
~25 MB written per image on the CPU worker threads. Here the resize is the very same torchvision call,
the patchify permutes the *uint8* image (1 byte per value) and the normalisation then runs once on
the patch matrix with the processor's own float32 operations, so the values are bit-identical to the
processor's; the temporal duplicate is never materialised (the vision tower sums the two temporal
slices of its patch-embedding kernel instead, see ``engine.vision``), which halves the memory a
prepared image holds until it is scored (and its host-to-device copy).

Exactness is not assumed: :meth:`FastImagePreprocessor.self_check` compares against the installed HF
processor at engine start-up (transformers versions differ in their processors) and the engine falls
back to the HF processor when they disagree; ``tests/engine/test_vision.py`` pins it down too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["FastImagePreprocessor", "hf_patches"]


def hf_patches(processor: Any, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Run the HF image processor; return (patches without the temporal duplicate, grid (t, h, w))."""
    out = processor(images=[image], return_tensors="pt")
    grid = tuple(int(x) for x in out["image_grid_thw"][0].tolist())
    pv = out["pixel_values"]
    t_patch = int(processor.temporal_patch_size)
    n = pv.shape[0]
    channels = pv.shape[1] // (t_patch * processor.patch_size**2)
    # (N, C, T, P, P): the T copies of a still image are identical, keep the first.
    half = pv.view(n, channels, t_patch, -1)[:, :, 0].reshape(n, -1).contiguous()
    return half, (grid[0], grid[1], grid[2])


class FastImagePreprocessor:
    """Reproduces ``Qwen2VLImageProcessor`` (torchvision backend) for one RGB PIL image.

    Returns patches of shape ``(grid_h * grid_w, 3 * patch * patch)`` in the processor's order (2x2
    merge units consecutive) and value layout (channel, row, col), minus the temporal duplicate.
    """

    def __init__(self, processor: Any) -> None:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        self._smart_resize = smart_resize
        self.patch = int(processor.patch_size)
        self.merge = int(processor.merge_size)
        size = processor.size

        def get(name: str) -> Any:
            return size.get(name) if isinstance(size, dict) else getattr(size, name, None)

        self.min_pixels = int(get("shortest_edge") or processor.min_pixels)
        self.max_pixels = int(get("longest_edge") or processor.max_pixels)
        self.do_resize = bool(processor.do_resize)
        self.resample = processor.resample
        mean = torch.tensor(processor.image_mean, dtype=torch.float32)
        std = torch.tensor(processor.image_std, dtype=torch.float32)
        factor = float(processor.rescale_factor)
        # The processor's own float32 arithmetic, per channel: with rescale + normalize it fuses them
        # into (x - mean / factor) / (std / factor); rescale alone is x * factor.
        self._sub: torch.Tensor | None = None
        self._div: torch.Tensor | None = None
        self._mul: float | None = None
        if processor.do_normalize:
            if processor.do_rescale:
                mean, std = mean * (1.0 / factor), std * (1.0 / factor)
            self._sub, self._div = mean.view(1, 3, 1), std.view(1, 3, 1)
        elif processor.do_rescale:
            self._mul = factor

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.patch * self.merge
        if not self.do_resize:
            return height, width
        h, w = self._smart_resize(
            height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        return int(h), int(w)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        import torchvision.transforms.v2.functional as tvF
        from torchvision.transforms import InterpolationMode

        if image.mode != "RGB":
            image = image.convert("RGB")
        arr = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8
        height, width = arr.shape[1:]
        rh, rw = self.target_size(height, width)
        if (rh, rw) != (height, width):
            modes = {
                Image.Resampling.NEAREST: InterpolationMode.NEAREST_EXACT,
                Image.Resampling.BILINEAR: InterpolationMode.BILINEAR,
                Image.Resampling.BICUBIC: InterpolationMode.BICUBIC,
            }
            mode = modes.get(Image.Resampling(int(self.resample)), InterpolationMode.BICUBIC)
            arr = tvF.resize(arr.contiguous(), [rh, rw], interpolation=mode, antialias=True)
        p, m = self.patch, self.merge
        gh, gw = rh // p, rw // p
        # uint8 patchify (1 byte per value): (C, gh/m, m, p, gw/m, m, p) -> (gh/m, gw/m, m, m, C, p, p).
        u8 = np.ascontiguousarray(
            arr.numpy().reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        ).reshape(gh * gw, 3, p * p)
        out = torch.from_numpy(u8).to(torch.float32)
        if self._sub is not None and self._div is not None:
            out.sub_(self._sub).div_(self._div)
        elif self._mul is not None:
            out.mul_(self._mul)
        return out.view(gh * gw, 3 * p * p), (1, gh, gw)

    def self_check(self, processor: Any) -> bool:
        """True when this reproduces ``processor`` bit for bit on a few probe images (sizes that
        exercise up- and down-scaling and odd aspect ratios)."""
        rng = np.random.default_rng(0)
        for w, h in ((57, 91), (300, 40), (1600, 1200), (28, 28)):
            img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
            try:
                got, grid = self(img)
                want, want_grid = hf_patches(processor, img)
            except Exception:  # any incompatibility means: use the HF processor
                return False
            if grid != want_grid or got.shape != want.shape or not torch.equal(got, want):
                return False
        return True
