"""Decode and normalise untrusted image bytes into RGB PIL images the Qwen2.5-VL processor accepts.

Why a module of its own: image bytes arrive from the network. :func:`decode_image` is the one
decoder; the server runs it inside worker processes (``engine.decode_pool``: a hard wall-time
budget, killed on cancellation, memory returned to the OS), tests and tools run it in-process.

Before a single pixel is decoded it reads the facts a decoder would trust from the header with its
own small parsers (JPEG markers, PNG ``IHDR``, WebP ``VP8``/``VP8L``/``VP8X``) and refuses:

* more pixels than OUR ``max_image_pixels`` (the message quotes that limit and its setting; PIL's
  own ``Image.MAX_IMAGE_PIXELS`` ceiling is raised to ours so an operator's larger limit is real);
* a JPEG with more scans than ``max_jpeg_scans`` (a progressive file can repeat scans so that each
  costs a pass over every coefficient of the declared size: decode time amplification);
* a decode whose memory, estimated from the declared size, exceeds the per-image budget.

Truncated files are refused, never padded: PIL does both wrong silently (its JPEG decoder swallows
libjpeg's warnings, so a cut JPEG with an end marker appended decodes to grey; its PNG decoder
stops without complaint when the compressed stream ends on a row boundary before the last row).
So a JPEG is first checked by libjpeg-turbo in strict mode (``simplejpeg``, every libjpeg warning
is an error; scaled to 1/8 and greyscale so it costs a fraction of the real decode) and a PNG's
``IDAT`` stream is inflated (counted, not kept) and must hold every row the header declares.

Every failure is ``InvalidInput`` with a stable ``reason`` and no field path (the scheduler re-roots
it, e.g. ``documents[3].image``); messages never carry object reprs or heap addresses.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lychee_server.domain import ImageInput, MediaType
from lychee_server.errors import InvalidInput

__all__ = [
    "MAX_ASPECT_RATIO",
    "MIN_SIDE",
    "ImageHeader",
    "ImageLimits",
    "decode_image",
    "estimate_decode_bytes",
    "read_header",
]

MIN_SIDE = 28  # one merged 2x2 patch of 14 px: the processor rejects anything smaller
MAX_ASPECT_RATIO = 200  # the Qwen2-VL processor refuses more extreme ratios
MiB = 1 << 20

_PIL_FORMATS: dict[MediaType, str] = {MediaType.JPEG: "JPEG", MediaType.PNG: "PNG", MediaType.WEBP: "WEBP"}


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """The knobs of :func:`decode_image` (taken from Settings)."""

    max_image_pixels: int = 64_000_000
    max_pixels: int = 1280 * 28 * 28  # processor upper bound: used for JPEG draft downscale only
    # Per-image decode memory budget, estimated from the declared header (see estimate_decode_bytes).
    max_decode_bytes: int = 2048 * MiB
    # libjpeg's standard progressive script has 10 scans (6 for greyscale); encoders that optimise
    # the script stay in the tens. libjpeg-turbo's own tools offer the same kind of cap (-maxscans).
    max_jpeg_scans: int = 100
    # Scans x declared pixels of a progressive JPEG: the standard 10-scan script at 64 Mpx fits
    # (~25 scans at 64 Mpx, 100 at 16 Mpx); each scan is a pass over every coefficient.
    max_jpeg_scan_pixels: int = 1_600_000_000


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What the header declares (read without decoding a pixel)."""

    width: int
    height: int
    bands: int  # colour channels the file declares (alpha included)
    progressive: bool = False  # JPEG: progressive (coefficient buffer of the full declared size)
    scans: int = 0  # JPEG: SOS markers in the file
    alpha: bool = False  # transparency to flatten (extra full-size copies on the way to RGB)


def _sniff(data: bytes) -> MediaType | None:
    """Identify the container by its magic bytes (cheap; independent of PIL plugins)."""
    if data[:3] == b"\xff\xd8\xff":
        return MediaType.JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return MediaType.PNG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return MediaType.WEBP
    return None


# ------------------------------------------------------------------ header parsers (no decoding)
# 0xFF followed by a marker code: not a stuffed 0x00, not RST0-7 (they live inside scan data), not a
# fill byte. Searching with a compiled regex keeps the walk over a scan's entropy data in C.
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


class _Progression:
    """libjpeg's progression rules, checked per SOS header before any decoding.

    Each scan of a progressive JPEG sends one bit range of one band of coefficients; a scan that
    repeats or skips bits of a coefficient is what libjpeg only warns about ("Inconsistent
    progression sequence") while it still spends a full pass over every coefficient on it. So a
    few bytes per repeated scan buy a pass over the whole declared image: refused here instead."""

    def __init__(self, component_ids: list[int]) -> None:
        self.bits = {cid: [-1] * 64 for cid in component_ids}  # last Al seen per coefficient

    def scan(self, sos: bytes) -> str | None:
        """Record one scan (the SOS segment body); the problem with it, or None."""
        if not sos:
            return "empty scan header"
        count = sos[0]
        if len(sos) < 1 + 2 * count + 3 or count == 0:
            return "short scan header"
        ids = [sos[1 + 2 * i] for i in range(count)]
        ss, se, a = sos[1 + 2 * count], sos[2 + 2 * count], sos[3 + 2 * count]
        ah, al = a >> 4, a & 15
        if ss == 0:
            if se != 0:
                return "a DC scan also carries AC coefficients"
        elif se < ss or se > 63 or count != 1:
            return "an AC scan with a bad band or several components"
        if al > 13 or (ah != 0 and al != ah - 1):
            return "a scan that refines by more than one bit"
        for cid in ids:
            coef = self.bits.get(cid)
            if coef is None:
                return "a scan of a component the frame does not declare"
            if ss > 0 and coef[0] < 0:
                return "AC coefficients before their DC"
            for k in range(ss, se + 1):
                expected = 0 if coef[k] < 0 else coef[k]
                if ah != expected:
                    return "a scan repeats or skips bits of a coefficient"
                coef[k] = al
        return None


def _jpeg_header(data: bytes, limits: ImageLimits) -> ImageHeader | None:
    """Walk the JPEG's marker segments: frame size and components from SOF, the scans from SOS.

    Returns None when no frame header is found (PIL then reports the file as undecodable). Raises
    ``InvalidInput`` as soon as the scans go past the limits or break the progression rules, so a
    scan bomb is refused from its headers, before any decoding."""
    pos, n = 2, len(data)
    frame: tuple[int, int, int, bool] | None = None
    progression: _Progression | None = None
    scans = 0
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            m = _JPEG_MARKER.search(data, pos)
            if m is None:
                break
            pos = m.start()
        while pos < n and data[pos] == 0xFF:  # fill bytes before the marker code
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM / stray RSTn: no length
            continue
        if pos + 2 > n:
            break
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            break
        segment = pos + 2
        pos += length
        if marker in _SOF and frame is None and segment + 6 <= n:
            height, width = struct.unpack_from(">HH", data, segment + 1)
            comps = data[segment + 5]
            frame = (width, height, comps, marker in _PROGRESSIVE_SOF)
            if frame[3]:
                progression = _Progression(
                    [data[segment + 6 + 3 * i] for i in range(comps) if segment + 6 + 3 * i < n]
                )
        elif marker == 0xDA:  # SOS: entropy-coded data follows, up to the next marker
            scans += 1
            _check_scan_work(scans, frame, limits)
            if progression is not None:
                problem = progression.scan(data[segment:pos])
                if problem is not None:
                    raise InvalidInput(
                        f"JPEG scan {scans} breaks the progressive sequence ({problem})",
                        reason="IMAGE_DECODE_FAILED",
                    )
            m = _JPEG_MARKER.search(data, pos)
            if m is None:
                break
            pos = m.start()
    if frame is None:
        return None
    width, height, comps, progressive = frame
    return ImageHeader(width, height, max(1, comps), progressive=progressive, scans=scans)


def _check_scan_work(scans: int, frame: tuple[int, int, int, bool] | None, limits: ImageLimits) -> None:
    """Each scan of a progressive JPEG is a pass over the coefficients of the whole declared image:
    cap the scan count, and the scans times the declared pixels (the decoding work)."""
    if scans > limits.max_jpeg_scans:
        raise InvalidInput(
            f"JPEG has more than {limits.max_jpeg_scans} scans, the server's limit per image",
            reason="IMAGE_DECODE_FAILED",
        )
    if frame is not None and frame[3] and scans * frame[0] * frame[1] > limits.max_jpeg_scan_pixels:
        raise InvalidInput(
            f"progressive JPEG has {scans}+ scans of {frame[0]}x{frame[1]} pixels, more decoding work "
            f"than the server's limit of {limits.max_jpeg_scan_pixels} scan-pixels per image "
            "(scans x width x height)",
            reason="IMAGE_DECODE_FAILED",
        )


_PNG_BANDS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type


def _png_header(data: bytes) -> ImageHeader | None:
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    width, height, _depth, ctype = struct.unpack_from(">IIBB", data, 16)
    bands = _PNG_BANDS.get(ctype)
    if bands is None:
        return None
    # A palette or greyscale image may carry a tRNS chunk; counting it as alpha only over-estimates.
    return ImageHeader(width, height, bands, alpha=ctype in (3, 4, 6) or b"tRNS" in data[:65536])


def _webp_header(data: bytes) -> ImageHeader | None:
    kind = data[12:16]
    if kind == b"VP8X" and len(data) >= 30:
        flags = data[20]
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return ImageHeader(width, height, 4, alpha=bool(flags & 0x10))
    if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return ImageHeader(1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF), 4, alpha=bool(bits >> 28 & 1))
    if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return ImageHeader(width & 0x3FFF, height & 0x3FFF, 3)
    return None


def read_header(data: bytes, media: MediaType, limits: ImageLimits) -> ImageHeader | None:
    """The declared geometry of ``data`` (None when our parser cannot tell; PIL then decides)."""
    if media is MediaType.JPEG:
        return _jpeg_header(data, limits)
    if media is MediaType.PNG:
        return _png_header(data)
    return _webp_header(data)


def estimate_decode_bytes(header: ImageHeader, decoded_size: tuple[int, int]) -> int:
    """Peak bytes a decode of ``header`` at ``decoded_size`` (after a JPEG draft) needs, roughly.

    PIL keeps every 8-bit multi-band mode in 4 bytes per pixel; the way to RGB holds the decoded
    image plus one converted copy (EXIF rotation or colour conversion), or four full copies when
    transparency is flattened onto white (RGBA, white background, composite, RGB), and then the
    3-byte RGB buffer that goes back to the server. A progressive JPEG also keeps its whole
    coefficient buffer: 2 bytes per sample at the full declared size, whatever the draft scale."""
    w, h = decoded_size
    copies = 4 if header.alpha else 2
    total = w * h * (4 * copies + 3)
    if header.progressive:
        total += header.width * header.height * header.bands * 2
    return total


# ------------------------------------------------------------------ strictness checks
def _check_jpeg_strict(data: bytes) -> None:
    """libjpeg-turbo in strict mode: any corruption libjpeg reports (a premature end of data
    segment, a premature end of file, a bad Huffman code...) is an error. Scaled to the smallest
    size and greyscale: the entropy decoding (which is what detects truncation) still covers every
    scan of every component."""
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, strict=True)
    except (ValueError, RuntimeError) as exc:
        raise InvalidInput(
            f"JPEG is truncated or corrupt (libjpeg: {_tidy(str(exc))})", reason="IMAGE_DECODE_FAILED"
        ) from exc


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_raw_bytes(data: bytes) -> int:
    """Bytes the IDAT stream must inflate to: one filter byte plus the packed samples per row."""
    width, height, depth, ctype, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    bits = _PNG_BANDS.get(ctype, 4) * depth

    def rows(w: int, h: int) -> int:
        return h * (1 + (w * bits + 7) // 8) if w > 0 and h > 0 else 0

    if interlace != 1:
        return rows(width, height)
    return sum(rows((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7)


def _check_png_complete(data: bytes) -> None:
    """Inflate the IDAT chunks (1 MiB at a time, output counted and dropped) and require every row
    the header declares: PIL's PNG decoder treats a stream that ends early as the end of the image."""
    want = _png_raw_bytes(data)
    inflater = zlib.decompressobj()
    got, pos, n = 0, 8, len(data)
    view = memoryview(data)
    try:
        while pos + 8 <= n and got < want and not inflater.eof:
            (length,) = struct.unpack_from(">I", data, pos)
            kind = data[pos + 4 : pos + 8]
            body = view[pos + 8 : min(n, pos + 8 + length)]
            pos += 12 + length
            if kind == b"IDAT":
                chunk: bytes | memoryview = body
                while chunk and got < want:
                    got += len(inflater.decompress(chunk, MiB))
                    chunk = inflater.unconsumed_tail
                    if inflater.eof:
                        break
            elif kind == b"IEND":
                break
    except zlib.error as exc:
        raise InvalidInput(
            f"PNG image data is corrupt (zlib: {_tidy(str(exc))})", reason="IMAGE_DECODE_FAILED"
        ) from exc
    if got < want:
        raise InvalidInput(
            f"PNG image data ends early: {got} of the {want} bytes its header declares "
            "(the file is truncated)",
            reason="IMAGE_DECODE_FAILED",
        )


# ------------------------------------------------------------------ messages
_ADDRESS = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")


def _tidy(text: str) -> str:
    """An exception text fit for a caller: no object reprs, no addresses, one short line."""
    text = _ADDRESS.sub("", text).replace("\n", " ").strip(" :")
    return text[:200] or "no detail"


def _too_many(w: int, h: int, limits: ImageLimits) -> InvalidInput:
    return InvalidInput(
        f"image is {w}x{h} = {w * h} pixels, more than the server's limit of {limits.max_image_pixels} "
        "pixels per image (max_image_pixels)",
        reason="IMAGE_TOO_MANY_PIXELS",
    )


def _check_geometry(w: int, h: int, limits: ImageLimits) -> None:
    if w <= 0 or h <= 0:
        raise InvalidInput("image has no pixels", reason="IMAGE_DECODE_FAILED")
    if w * h > limits.max_image_pixels:
        raise _too_many(w, h, limits)


# ------------------------------------------------------------------ conversion
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


def _align_pil_ceiling(limits: ImageLimits) -> None:
    """PIL refuses images above 2x ``Image.MAX_IMAGE_PIXELS`` (~179 Mpx by default) on its own:
    raise that ceiling to our limit so ``--max-image-pixels`` above it is honoured (ours is checked
    first, from the header, with our message). Never lowered: only ever raised to our limit."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < limits.max_image_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels


# ------------------------------------------------------------------ the decoder
def decode_image(image: ImageInput, limits: ImageLimits) -> Image.Image:
    """Decode ``image`` into a fully loaded RGB ``PIL.Image``; raise ``InvalidInput`` if it is bad.

    Reasons: IMAGE_MEDIA_TYPE_MISMATCH, IMAGE_DECODE_FAILED (corrupt, truncated, too many JPEG
    scans), IMAGE_TOO_MANY_PIXELS (pixel limit or per-image memory budget, both from the header),
    IMAGE_ANIMATED, IMAGE_ASPECT_RATIO.
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
    header = read_header(data, sniffed, limits)
    if header is not None:
        _check_geometry(header.width, header.height, limits)
    _align_pil_ceiling(limits)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file raises instead of being padded
    try:
        with warnings.catch_warnings():
            # Our own limit was checked above; PIL's warning between 1x and 2x its ceiling is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[sniffed]])
            w, h = img.size  # from the header: nothing decoded yet
            _check_geometry(w, h, limits)
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
            if header is None:
                header = ImageHeader(w, h, len(img.getbands()), alpha="transparency" in img.info)
            need = estimate_decode_bytes(header, img.size)
            if need > limits.max_decode_bytes:
                raise InvalidInput(
                    f"decoding this {w}x{h} image needs about {need // MiB} MiB, more than the "
                    f"server's budget of {limits.max_decode_bytes // MiB} MiB per image "
                    "(image_decode_memory_mib)",
                    reason="IMAGE_TOO_MANY_PIXELS",
                )
            if sniffed is MediaType.JPEG:
                _check_jpeg_strict(data)
            elif sniffed is MediaType.PNG:
                _check_png_complete(data)
            img.load()  # force the full decode now (PIL is lazy)
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
            rgb.load()
    except InvalidInput:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(
            f"image has more pixels than the server's limit of {limits.max_image_pixels} pixels per "
            "image (max_image_pixels)",
            reason="IMAGE_TOO_MANY_PIXELS",
        ) from exc
    except MemoryError as exc:
        raise InvalidInput(
            f"decoding the image ran out of its memory budget of {limits.max_decode_bytes // MiB} MiB "
            "(image_decode_memory_mib)",
            reason="IMAGE_TOO_MANY_PIXELS",
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidInput(
            f"image bytes start like a {sniffed.name} file but its header cannot be read",
            reason="IMAGE_DECODE_FAILED",
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as exc:
        raise InvalidInput(
            f"image could not be decoded: {_tidy(str(exc))}", reason="IMAGE_DECODE_FAILED"
        ) from exc
    return _upscale_small(rgb)


# Truncated files must raise, never be silently padded with grey (set again inside decode_image,
# which is what the decoder processes run).
ImageFile.LOAD_TRUNCATED_IMAGES = False
