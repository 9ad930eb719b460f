"""Decode and normalise untrusted image bytes into RGB PIL images the Qwen2.5-VL processor accepts.

Why a module of its own: image bytes arrive from the network. Everything here runs on CPU worker
threads, checks the cheap header facts (format, pixel count, frames) BEFORE decoding so a
decompression bomb never allocates, forces a full decode (PIL is lazy: a truncated file would
otherwise fail later, on the device thread), and turns every failure into ``InvalidInput`` with a
stable ``reason`` and no field path (the scheduler re-roots it, e.g. ``documents[3].image``).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lychee_server.domain import ImageInput, MediaType
from lychee_server.errors import InvalidInput

__all__ = ["MAX_ASPECT_RATIO", "MIN_SIDE", "ImageLimits", "decode_image"]

MIN_SIDE = 28  # one merged 2x2 patch of 14 px: the processor rejects anything smaller
MAX_ASPECT_RATIO = 200  # the Qwen2-VL processor refuses more extreme ratios

_PIL_FORMATS: dict[MediaType, str] = {MediaType.JPEG: "JPEG", MediaType.PNG: "PNG", MediaType.WEBP: "WEBP"}


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """The knobs of :func:`decode_image` (taken from Settings)."""

    max_image_pixels: int = 64_000_000
    max_pixels: int = 1280 * 28 * 28  # processor upper bound: used for JPEG draft downscale only


def _sniff(data: bytes) -> MediaType | None:
    """Identify the container by its magic bytes (cheap; independent of PIL plugins)."""
    if data[:3] == b"\xff\xd8\xff":
        return MediaType.JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return MediaType.PNG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return MediaType.WEBP
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency goes onto white (a bare convert would make it black)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bit by the format's range instead of clipping at 255.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(np.rint(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV, RGBX ...: PIL's converters are correct for these.
    return img.convert("RGB")


def _upscale_small(img: Image.Image) -> Image.Image:
    """Make both sides >= MIN_SIDE keeping the aspect ratio, so a 1x1 image still yields one patch."""
    w, h = img.size
    if w >= MIN_SIDE and h >= MIN_SIDE:
        return img
    scale = MIN_SIDE / min(w, h)
    nw, nh = max(MIN_SIDE, math.ceil(w * scale)), max(MIN_SIDE, math.ceil(h * scale))
    return img.resize((nw, nh), Image.Resampling.BICUBIC)


def decode_image(image: ImageInput, limits: ImageLimits) -> Image.Image:
    """Decode ``image`` into a fully loaded RGB ``PIL.Image``; raise ``InvalidInput`` if it is bad.

    Reasons: IMAGE_MEDIA_TYPE_MISMATCH, IMAGE_DECODE_FAILED, IMAGE_TOO_MANY_PIXELS, IMAGE_ANIMATED,
    IMAGE_ASPECT_RATIO.
    """
    data = image.data
    sniffed = _sniff(data)
    if sniffed is None:
        raise InvalidInput("image bytes are not a JPEG, PNG or WebP file", reason="IMAGE_DECODE_FAILED")
    if sniffed is not image.media_type:
        raise InvalidInput(
            f"image declared as {image.media_type.value} but the bytes are {sniffed.value}",
            reason="IMAGE_MEDIA_TYPE_MISMATCH",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[sniffed]])
            w, h = img.size  # from the header: nothing decoded yet
            if w <= 0 or h <= 0:
                raise InvalidInput("image has no pixels", reason="IMAGE_DECODE_FAILED")
            if w * h > limits.max_image_pixels:
                raise InvalidInput(
                    f"image has {w}x{h} = {w * h} pixels, more than the limit {limits.max_image_pixels}",
                    reason="IMAGE_TOO_MANY_PIXELS",
                )
            if getattr(img, "n_frames", 1) > 1:
                raise InvalidInput("animated / multi-frame images are not supported", reason="IMAGE_ANIMATED")
            if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                raise InvalidInput(
                    f"image aspect ratio {max(w, h) / min(w, h):.0f} exceeds {MAX_ASPECT_RATIO}",
                    reason="IMAGE_ASPECT_RATIO",
                )
            if (
                sniffed is MediaType.JPEG
                and w * h > 4 * limits.max_pixels
                and img.mode in ("RGB", "L", "CMYK")
            ):
                # DCT-domain downscale by 1/2..1/8 while staying above 2x the processor target: much
                # cheaper than decoding 12 MP and resizing; the processor still does the final resize.
                target = math.sqrt(2 * limits.max_pixels / (w * h))
                img.draft(img.mode, (max(1, int(w * target)), max(1, int(h * target))))
            img.load()  # force the full decode now (PIL is lazy)
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
            rgb.load()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(str(exc), reason="IMAGE_TOO_MANY_PIXELS") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise InvalidInput(f"image could not be decoded: {exc}", reason="IMAGE_DECODE_FAILED") from exc
    return _upscale_small(rgb)


# Truncated files must raise, never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
