"""Images beyond JPEG/PNG/WebP (converted on the client), data: URIs, and plain strings that look
like images (warned about). The end-to-end cases send the converted images to a real server."""

from __future__ import annotations

import base64
import io
import sys
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import pytest

from lychee.rerank.client import AsyncLycheeClient, Doc, EncodedImage, ImageLikeTextWarning, Query
from lychee.rerank.client._inputs import coerce_document, image_like_text, warn_image_like_text

PIL_Image = pytest.importorskip("PIL.Image")

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _encode(image: Any, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [PIL_Image.new("RGB", (12, 9), c) for c in (RED, BLUE)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _decoded(image: EncodedImage) -> Any:
    assert image.media_type == "image/png"
    assert image.data.startswith(b"\x89PNG\r\n\x1a\n")
    return PIL_Image.open(io.BytesIO(image.data))


# -- conversion ------------------------------------------------------------------------------


def test_gif_becomes_a_png_of_its_first_frame(tmp_path: Path) -> None:
    gif = _animated_gif()
    path = tmp_path / "anim.gif"
    path.write_bytes(gif)
    for image in (EncodedImage.from_bytes(gif), EncodedImage.from_file(path), coerce_document(path, 0).image):
        assert image is not None
        with _decoded(image) as png:
            assert png.size == (12, 9)
            assert getattr(png, "n_frames", 1) == 1
            assert png.convert("RGB").getpixel((3, 3)) == RED  # frame 0, not the blue frame 1


@pytest.mark.parametrize(
    ("fmt", "mode", "kw"),
    [
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {}),
        ("TIFF", "CMYK", {}),  # a mode PNG cannot hold: converted to RGB
        ("TIFF", "I;16", {}),
        ("TIFF", "F", {}),
        ("TIFF", "RGB", {"compression": "tiff_lzw"}),
    ],
)
def test_bmp_and_tiff_become_png(fmt: str, mode: str, kw: dict[str, Any]) -> None:
    if mode in ("I;16", "F"):  # 16-bit and float greyscale
        source = PIL_Image.new(mode, (7, 5), 300 if mode == "I;16" else 0.5)
    else:
        source = PIL_Image.new("RGB", (7, 5), RED).convert(mode)
    data = _encode(source, fmt, **kw)
    item = coerce_document(Doc(text="caption", image=data), 0)
    assert item.image is not None and item.text == "caption"
    with _decoded(item.image) as png:
        assert png.size == (7, 5)
        if mode in ("RGB", "CMYK"):
            assert png.convert("RGB").getpixel((1, 1)) == pytest.approx(RED, abs=2)


def test_multipage_tiff_uses_the_first_page() -> None:
    pages = [PIL_Image.new("RGB", (6, 6), c) for c in (BLUE, RED)]
    data = _encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    with _decoded(EncodedImage.from_bytes(data)) as png:
        assert png.convert("RGB").getpixel((0, 0)) == BLUE


def test_jpeg_png_webp_pass_through_unchanged() -> None:
    for fmt, media in (("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")):
        data = _encode(PIL_Image.new("RGB", (4, 4), RED), fmt)
        assert EncodedImage.from_bytes(data) == EncodedImage(data, media)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [b"GIF89a" + b"\x00" * 20, b"BM" + b"\xff" * 40, b"II*\x00" + b"\x08\x00\x00\x00" + b"\x00" * 10],
    ids=["gif", "bmp", "tiff"],
)
def test_corrupt_convertible_image_is_a_clear_value_error(data: bytes) -> None:
    with pytest.raises(
        ValueError, match=r"documents\[4\]: (not a valid|cannot convert the) (GIF|BMP|TIFF)"
    ) as info:
        coerce_document(data, 4)
    assert "0x" not in str(info.value)  # no heap addresses from the imaging library


def test_truncated_gif_is_refused() -> None:
    gif = _encode(PIL_Image.new("RGB", (64, 64), RED), "GIF")
    with pytest.raises(ValueError, match="GIF"):
        EncodedImage.from_bytes(gif[: len(gif) // 2])


def test_unknown_format_names_what_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(b"%PDF-1.7 not an image")
    with pytest.raises(
        ValueError, match=r"notes\.png: not a JPEG, PNG or WebP image \(nor a GIF, BMP or TIFF"
    ):
        EncodedImage.from_file(path)
    with pytest.raises(ValueError, match=r"missing\.gif: cannot read image file"):
        EncodedImage.from_file(tmp_path / "missing.gif")


def test_without_pillow_conversion_says_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    gif = _animated_gif()
    png = _encode(PIL_Image.new("RGB", (4, 4), RED), "PNG")
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    with pytest.raises(ValueError, match=r"documents\[0\]: GIF images are converted .*pip install pillow"):
        coerce_document(gif, 0)
    assert EncodedImage.from_bytes(png).media_type == "image/png"  # no Pillow needed for these


# -- data: URIs ------------------------------------------------------------------------------


def test_data_uri_through_the_image_helper() -> None:
    png = _encode(PIL_Image.new("RGB", (4, 4), RED), "PNG")
    b64 = base64.b64encode(png).decode()
    assert EncodedImage.from_data_uri(f"data:image/png;base64,{b64}") == EncodedImage(png, "image/png")
    wrapped = "\n".join(b64[i : i + 20] for i in range(0, len(b64), 20))  # MIME-style line breaks
    assert EncodedImage.from_data_uri(f"  DATA:image/png;BASE64,{wrapped}\n").data == png
    assert EncodedImage.from_data_uri("data:image/png," + urllib.parse.quote_from_bytes(png)).data == png
    gif = base64.b64encode(_animated_gif()).decode()
    assert EncodedImage.from_data_uri(f"data:image/gif;base64,{gif}").media_type == "image/png"


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("https://example.com/a.png", "not a data: URI"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:,hello", "not an image"),
        ("data:image/png;base64,@@@@", "invalid base64"),
        ("data:image/png;base64,aGVsbG8=", "not a JPEG, PNG or WebP"),
        ("data:image/png;base64,", "image data is empty"),
    ],
)
def test_bad_data_uris(uri: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EncodedImage.from_data_uri(uri)


# -- strings that look like images -------------------------------------------------------------


def test_what_looks_like_an_image(tmp_path: Path) -> None:
    photo = tmp_path / "cat.JPG"
    photo.write_bytes(b"\xff\xd8\xff")
    assert image_like_text("https://example.com/cat.jpg") == "a URL"
    assert image_like_text("  HTTP://example.com/x?y=1 ") == "a URL"
    assert image_like_text("file:///tmp/cat.png") == "a URL"
    assert image_like_text("data:image/png;base64,iVBORw0KGgo=") == "a data: URI"
    assert image_like_text(str(photo)) == "the path of an image file"
    for text in (
        "see https://example.com for details",  # a sentence that contains a URL is text
        str(tmp_path / "missing.jpg"),  # not an existing file
        str(tmp_path),  # a folder
        "a red square",
        "data science is fun",
        "data:text/plain,hello",  # a data: URI, but not of an image
        "",
    ):
        assert image_like_text(text) is None, text


def test_one_warning_per_call_pointing_at_the_caller(tmp_path: Path) -> None:
    photo = tmp_path / "cat.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n")
    docs = [
        "plain text",
        "https://example.com/a.jpg",
        str(photo),
        "data:image/png;base64,AAAA",
        "ftp://h/x",
        "x",
    ]
    with pytest.warns(ImageLikeTextWarning) as record:
        warn_image_like_text("https://example.com/q.png", docs)
    assert len(record) == 1
    message = str(record[0].message)
    assert "query 'https://example.com/q.png' looks like a URL" in message
    assert "documents[1]" in message and "documents[2]" in message and "and 2 more" in message
    assert "plain text" not in message
    assert "EncodedImage.from_data_uri" in message and "Doc(text=...)" in message
    assert record[0].filename == __file__  # the caller's line, not the client's internals


def test_explicit_text_never_warns() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_image_like_text(
            Query(text="https://example.com/q.png"), [Doc(text="https://x.org/a.jpg"), "text"]
        )


async def test_converted_images_and_the_warning_through_a_real_server(server: Any, tmp_path: Path) -> None:
    gif_path = tmp_path / "anim.gif"
    gif_path.write_bytes(_animated_gif())
    bmp = _encode(PIL_Image.new("RGB", (20, 16), BLUE), "BMP")
    tiff = _encode(PIL_Image.new("RGB", (16, 20), RED), "TIFF")
    url = "https://example.com/photo.jpg"
    async with AsyncLycheeClient(server.address) as client:
        with pytest.warns(
            ImageLikeTextWarning, match=r"documents\[3\] 'https://example.com/photo.jpg'"
        ) as rec:
            result = await client.rerank(
                "a red square", [gif_path, bmp, Doc(text="a tiff", image=tiff), url], return_text=True
            )
        assert rec[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            explicit = await client.rerank(Query(text="a red square"), [Doc(text=url)], return_text=True)
    assert sorted(r.index for r in result.results) == [0, 1, 2, 3]
    assert result.usage.images == 3  # the GIF, BMP and TIFF arrived as images
    assert {r.index: r.text for r in result.results}[3] == url  # the URL was scored as text
    assert explicit.results[0].text == url
