"""Unit tests of image decoding / normalisation (engine.images)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import encode, pattern
from lychee_server.domain import ImageInput, MediaType
from lychee_server.engine.images import ImageLimits, decode_image
from lychee_server.errors import InvalidInput

LIMITS = ImageLimits()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def _webp_declaring(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the dimensions in a WebP's VP8/VP8L header (the pixel data no longer matches)."""
    out = bytearray(data)
    if out[12:16] == b"VP8L":
        bits = int.from_bytes(out[21:25], "little") & ~((1 << 28) - 1)
        out[21:25] = (bits | (width - 1) | (height - 1) << 14).to_bytes(4, "little")
    else:
        assert out[12:16] == b"VP8 "
        out[26:30] = struct.pack("<HH", width, height)
    return bytes(out)


def _jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    pos = data.index(b"\xff\xc0")
    return data[: pos + 5] + struct.pack(">HH", height, width) + data[pos + 9 :]


def _error(data: bytes, media: MediaType, limits: ImageLimits = LIMITS) -> InvalidInput:
    with pytest.raises(InvalidInput) as err:
        decode_image(ImageInput(data, media), limits)
    assert not err.value.violations
    return err.value


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


def test_our_pixel_limit_is_honoured_above_pils_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    # PIL refuses images above 2x its own MAX_IMAGE_PIXELS by itself: the decoder raises that
    # ceiling to our limit, so the advertised --max-image-pixels is the real one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    img = decode_image(ImageInput(encode(pattern(40, 40)), MediaType.PNG), LIMITS)
    assert img.size == (40, 40)
    assert LIMITS.max_image_pixels == Image.MAX_IMAGE_PIXELS


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` with (almost) no data: a pixel bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_MAGIC + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def test_pixel_bomb_refused_from_header_with_our_limit() -> None:
    limits = ImageLimits(max_image_pixels=10_000_000)
    for data, media in (
        (_png_declaring(20_000, 20_000), MediaType.PNG),
        (_webp_declaring(encode(pattern(64, 64), "WEBP", lossless=True), 16_000, 16_000), MediaType.WEBP),
        (_webp_declaring(encode(pattern(64, 64), "WEBP", quality=80), 16_000, 16_000), MediaType.WEBP),
        (_jpeg_declaring(encode(pattern(64, 64), "JPEG"), 60_000, 60_000), MediaType.JPEG),
    ):
        err = _error(data, media, limits)
        assert err.reason == "IMAGE_TOO_MANY_PIXELS", (media, err.message)
        assert "10000000" in err.message and "max_image_pixels" in err.message, err.message
        assert str(Image.MAX_IMAGE_PIXELS) not in err.message  # PIL's ceiling is not what we enforce


def test_memory_budget_from_header_before_decoding() -> None:
    data = encode(pattern(1500, 1000))
    err = _error(data, MediaType.PNG, ImageLimits(max_decode_bytes=8 << 20))
    assert err.reason == "IMAGE_TOO_MANY_PIXELS"
    assert "image_decode_memory_mib" in err.message and "8 MiB" in err.message
    assert decode_image(ImageInput(data, MediaType.PNG), ImageLimits()).size == (1500, 1000)


def test_messages_carry_no_object_reprs_or_addresses() -> None:
    bad = [
        (PNG_MAGIC + b"garbage" * 10, MediaType.PNG),
        (b"\xff\xd8\xff" + b"garbage" * 10, MediaType.JPEG),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"garbage" * 10, MediaType.WEBP),
    ]
    for data, media in bad:
        err = _error(data, media)
        assert err.reason == "IMAGE_DECODE_FAILED"
        assert "0x" not in err.message and "BytesIO" not in err.message and "object at" not in err.message, (
            err.message
        )


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


def test_truncated_jpeg_with_end_marker_appended_is_refused() -> None:
    # PIL pads such a file with grey without a word; libjpeg's strict mode calls it what it is.
    for progressive in (False, True):
        jpeg = encode(pattern(300, 200), "JPEG", quality=90, progressive=progressive)
        cut = jpeg[: len(jpeg) // 2] + b"\xff\xd9"
        err = _error(cut, MediaType.JPEG)
        assert err.reason == "IMAGE_DECODE_FAILED" and "truncated" in err.message, err.message


def test_png_whose_compressed_rows_end_early_is_refused() -> None:
    for interlace in (False, True):
        png = encode(pattern(120, 90), "PNG", **({"interlace": 1} if interlace else {}))  # type: ignore[arg-type]
        chunks = _png_chunks(png)
        raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
        # A complete, valid zlib stream that holds only some of the rows the header declares.
        short = zlib.compress(raw[: len(raw) // 2 // 361 * 361])
        ihdr = next(body for kind, body in chunks if kind == b"IHDR")
        data = PNG_MAGIC + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", short) + _chunk(b"IEND", b"")
        err = _error(data, MediaType.PNG)
        assert err.reason == "IMAGE_DECODE_FAILED" and "ends early" in err.message, err.message


def _without_eoi_and_last_scan(data: bytes) -> tuple[bytes, bytes]:
    """(the JPEG without its EOI marker, its last scan: SOS header and entropy-coded data).

    "\\xff\\xda" cannot occur inside entropy-coded data (a 0xFF there is stuffed as 0xFF00)."""
    assert data.endswith(b"\xff\xd9")
    body = data[:-2]
    return body, body[body.rindex(b"\xff\xda") :]


def test_progressive_scan_bombs_refused_from_the_headers() -> None:
    # Repeating a progressive refinement scan costs a pass over every coefficient of the declared
    # size for a few bytes (4.2 s for a 72 KB file at 4000x4000 with 300 repeats before the fix).
    body, last = _without_eoi_and_last_scan(encode(Image.new("L", (400, 400), 128), "JPEG", progressive=True))
    repeated = body + last * 20 + b"\xff\xd9"
    err = _error(repeated, MediaType.JPEG)
    assert err.reason == "IMAGE_DECODE_FAILED" and "progressive sequence" in err.message, err.message
    # Any JPEG: the scan count alone is capped too (here a sequential file with its scan repeated).
    body, last = _without_eoi_and_last_scan(encode(pattern(64, 64), "JPEG"))
    many = _error(body + last * 200 + b"\xff\xd9", MediaType.JPEG, ImageLimits(max_jpeg_scans=50))
    assert "more than 50 scans" in many.message
    # A valid progression still pays per scan: capped by scans x declared pixels.
    work = _error(
        encode(pattern(400, 400), "JPEG", progressive=True),
        MediaType.JPEG,
        ImageLimits(max_jpeg_scan_pixels=1_000_000),
    )
    assert "scan-pixels" in work.message


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("JPEG", {"progressive": True, "quality": 90}),
        ("JPEG", {"progressive": True, "subsampling": 0}),
        ("JPEG", {"subsampling": 2, "quality": 75, "restart_marker_blocks": 4}),
        ("PNG", {"interlace": 1}),
        ("PNG", {"optimize": True}),
    ],
)
def test_valid_files_pass_the_strict_checks_unchanged(fmt: str, kwargs: dict[str, object]) -> None:
    img = pattern(301, 203)
    for mode in ("RGB", "L"):
        data = encode(img.convert(mode), fmt, **kwargs)
        media = MediaType.JPEG if fmt == "JPEG" else MediaType.PNG
        out = decode_image(ImageInput(data, media), LIMITS)
        with Image.open(io.BytesIO(data)) as want:  # PIL's own decode, as before the checks
            assert np.array_equal(np.asarray(out), np.asarray(want.convert("RGB")))
