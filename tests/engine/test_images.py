"""Unit tests of image decoding / normalisation (engine.images)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import encode, pattern
from lychee_server.domain import ImageInput, MediaType
from lychee_server.engine.images import ImageLimits, decode_image
from lychee_server.errors import InvalidInput

LIMITS = ImageLimits()


def _reason(data: bytes, media: MediaType, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(InvalidInput) as err:
        decode_image(ImageInput(data, media), limits)
    assert not err.value.violations  # no field path: the scheduler re-roots it
    return err.value.reason


def test_plain_rgb_roundtrip() -> None:
    img = decode_image(ImageInput(encode(pattern(57, 91)), MediaType.PNG), LIMITS)
    assert img.mode == "RGB" and img.size == (57, 91)
    assert np.array_equal(np.asarray(img), np.asarray(pattern(57, 91)))


def test_exif_orientation_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(pattern(80, 40), "JPEG", exif=exif.tobytes())
    assert decode_image(ImageInput(data, MediaType.JPEG), LIMITS).size == (40, 80)


def test_alpha_flattened_onto_white() -> None:
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    img = decode_image(ImageInput(encode(rgba), MediaType.PNG), LIMITS)
    assert img.getpixel((5, 5)) == (255, 255, 255) and img.getpixel((0, 0)) == (0, 0, 255)
    la = Image.new("LA", (30, 30), (0, 0))
    assert decode_image(ImageInput(encode(la), MediaType.PNG), LIMITS).getpixel((3, 3)) == (255, 255, 255)


def test_palette_with_transparency_and_cmyk() -> None:
    pal = pattern(40, 40).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    out = decode_image(ImageInput(encode(pal, transparency=0), MediaType.PNG), LIMITS)
    assert out.mode == "RGB"
    cmyk = Image.new("CMYK", (30, 30), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = decode_image(ImageInput(encode(cmyk, "JPEG", quality=95), MediaType.JPEG), LIMITS).getpixel(
        (10, 10)
    )
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_greyscale_scaled_not_clipped() -> None:
    arr = np.full((30, 30), 32768, dtype=np.uint16)
    img16 = Image.fromarray(arr)
    assert img16.mode.startswith("I;16")
    out = decode_image(ImageInput(encode(img16), MediaType.PNG), LIMITS)
    assert abs(out.getpixel((1, 1))[0] - 128) <= 1


def test_pixel_bomb_guard_before_decode() -> None:
    data = encode(Image.new("L", (4000, 4000)))
    assert _reason(data, MediaType.PNG, ImageLimits(max_image_pixels=1_000_000)) == "IMAGE_TOO_MANY_PIXELS"


def test_pil_decompression_bomb_error_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert _reason(encode(pattern(40, 40)), MediaType.PNG) == "IMAGE_TOO_MANY_PIXELS"


def test_corrupt_and_truncated() -> None:
    assert _reason(b"not an image at all", MediaType.PNG) == "IMAGE_DECODE_FAILED"
    jpeg = encode(pattern(200, 200), "JPEG")
    assert _reason(jpeg[: len(jpeg) // 2], MediaType.JPEG) == "IMAGE_DECODE_FAILED"
    png = encode(pattern(200, 200))
    assert _reason(png[: len(png) // 2], MediaType.PNG) == "IMAGE_DECODE_FAILED"


def test_media_type_mismatch() -> None:
    assert _reason(encode(pattern(30, 30), "JPEG"), MediaType.PNG) == "IMAGE_MEDIA_TYPE_MISMATCH"


def test_animated_rejected() -> None:
    frames = [pattern(30, 30, seed=i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    assert _reason(buf.getvalue(), MediaType.PNG) == "IMAGE_ANIMATED"
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:])
    assert _reason(buf.getvalue(), MediaType.WEBP) == "IMAGE_ANIMATED"


def test_tiny_images_upscaled_and_aspect_ratio_guard() -> None:
    assert decode_image(ImageInput(encode(pattern(1, 1)), MediaType.PNG), LIMITS).size == (28, 28)
    w, h = decode_image(ImageInput(encode(pattern(100, 2)), MediaType.PNG), LIMITS).size
    assert h == 28 and w == 1400
    assert _reason(encode(pattern(402, 2)), MediaType.PNG) == "IMAGE_ASPECT_RATIO"


def test_large_jpeg_uses_draft_downscale() -> None:
    data = encode(pattern(3000, 2000), "JPEG", quality=80)
    img = decode_image(ImageInput(data, MediaType.JPEG), ImageLimits(max_pixels=256 * 28 * 28))
    assert img.size[0] < 3000 and img.size[0] * img.size[1] >= 2 * 256 * 28 * 28 * 0.9
