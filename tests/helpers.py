"""Shared test helpers: deterministic test images encoded in memory (owned by the engine team)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from lychee_server.domain import ImageInput, MediaType


def pattern(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic noisy gradient (not flat, so every patch embedding differs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 7 + seed * 31) % 256, (yy * 5 + seed * 17) % 256, (xx + yy) * 3 % 256], axis=-1)
    arr = np.clip(base + rng.integers(-20, 20, size=base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="RGB")
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **save_kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


_MEDIA = {"PNG": MediaType.PNG, "JPEG": MediaType.JPEG, "WEBP": MediaType.WEBP}


def image_input(
    width: int, height: int, seed: int = 0, fmt: str = "PNG", **save_kwargs: object
) -> ImageInput:
    """An ``ImageInput`` of a pattern image of the given size and format."""
    return ImageInput(encode(pattern(width, height, seed), fmt, **save_kwargs), _MEDIA[fmt])
