"""Input coercion: media-type sniffing, paths, PIL, Doc/Query (no server)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from lychee.rerank.client import Doc, EncodedImage, Query
from lychee.rerank.client._inputs import coerce_document, coerce_query, sniff_media_type

PIL_Image = pytest.importorskip("PIL.Image")


def _encoded(fmt: str, size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    PIL_Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "media"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_sniff_real_encodings(fmt: str, media: str) -> None:
    assert sniff_media_type(_encoded(fmt)) == media


@pytest.mark.parametrize("data", [b"", b"GIF89a....", b"RIFF\x00\x00\x00\x00WAVE", b"hello", b"\xff\xd8"])
def test_sniff_rejects_other_bytes(data: bytes) -> None:
    assert sniff_media_type(data) is None


def test_str_is_always_text_never_a_path(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(_encoded("PNG"))
    item = coerce_query(str(p))  # coercion alone never warns: the call does (test_client_images)
    assert item.text == str(p) and item.image is None


def test_bytes_and_path_are_images(tmp_path: Path) -> None:
    jpeg = _encoded("JPEG")
    p = tmp_path / "photo.bin"  # the extension is irrelevant: bytes decide
    p.write_bytes(jpeg)
    a = coerce_document(jpeg, 0)
    b = coerce_document(p, 1)
    assert a.image == b.image == EncodedImage(jpeg, "image/jpeg")
    assert a.text is None and a.payload_bytes == len(jpeg)


def test_missing_file_names_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"documents\[3\]: cannot read image file"):
        coerce_document(tmp_path / "nope.png", 3)


def test_unknown_image_bytes_rejected_locally() -> None:
    with pytest.raises(ValueError, match=r"documents\[0\]: not a JPEG, PNG or WebP"):
        coerce_document(b"\x00\x00\x01\x00 an .ico or anything else", 0)


def test_pil_image_encoded_as_png() -> None:
    img = PIL_Image.new("RGB", (5, 7), (1, 2, 3))
    item = coerce_query(img)
    assert item.image is not None and item.image.media_type == "image/png"
    with PIL_Image.open(io.BytesIO(item.image.data)) as back:
        assert back.size == (5, 7)
        assert back.getpixel((0, 0)) == (1, 2, 3)


def test_pil_cmyk_converted() -> None:
    item = coerce_document(PIL_Image.new("CMYK", (3, 3)), 0)
    assert item.image is not None and sniff_media_type(item.image.data) == "image/png"


def test_doc_and_query_combine_text_image_and_id() -> None:
    png = _encoded("PNG")
    d = coerce_document(Doc(text="caption", image=png, id="d-1"), 0)
    assert (d.text, d.id, d.image and d.image.media_type) == ("caption", "d-1", "image/png")
    assert d.text_bytes == b"caption"
    assert d.payload_bytes == len("caption") + len(png) + len("d-1")
    q = coerce_query(Query(text="find this", image=png))
    assert q.text == "find this" and q.image is not None and q.id is None


def test_doc_needs_content_and_roles_are_not_mixed() -> None:
    with pytest.raises(ValueError):
        Doc()
    with pytest.raises(ValueError):
        Query()
    with pytest.raises(TypeError):
        coerce_query(Doc(text="x"))
    with pytest.raises(TypeError):
        coerce_document(Query(text="x"), 0)
    with pytest.raises(TypeError, match=r"documents\[2\]"):
        coerce_document(12345, 2)


def test_encoded_image_validates_and_hides_bytes_in_repr() -> None:
    with pytest.raises(ValueError):
        EncodedImage(b"x", "image/gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EncodedImage(b"", "image/png")
    assert repr(EncodedImage(b"\x89PNG" * 1000, "image/png")) == "EncodedImage(image/png, 4000 bytes)"


def test_text_utf8_size_is_bytes_not_chars() -> None:
    item = coerce_document("é漢🙂", 0)
    assert item.payload_bytes == len("é漢🙂".encode())
