"""Pins the public API of the client and the LangChain adapter.

A failing test here means the public surface changed: if that is deliberate, update the set
below in the same change (and the changelog); if not, something leaked or went missing.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

CLIENT_API = {
    "NO_RETRY",
    "AsyncLycheeClient",
    "AuthenticationError",
    "DeadlineExceededError",
    "Doc",
    "DocumentInput",
    "EncodedImage",
    "FieldViolation",
    "ImageInput",
    "ImageLikeTextWarning",
    "InvalidRequestError",
    "Limits",
    "LycheeClient",
    "LycheeError",
    "MediaType",
    "OverloadedError",
    "Progress",
    "Query",
    "QueryInput",
    "RankedDocument",
    "RerankResult",
    "RetryPolicy",
    "ScoreKind",
    "ServerError",
    "ServerInfo",
    "Timings",
    "UnavailableError",
    "Usage",
}

ADAPTER_API = {"LycheeRerank"}


def test_client_all_is_pinned() -> None:
    import lychee.rerank.client as client

    assert set(client.__all__) == CLIENT_API
    assert len(client.__all__) == len(set(client.__all__))
    for name in client.__all__:
        assert hasattr(client, name), name


def test_adapter_all_is_pinned() -> None:
    pytest.importorskip("langchain_core")
    import langchain_lychee

    assert set(langchain_lychee.__all__) == ADAPTER_API
    for name in langchain_lychee.__all__:
        assert hasattr(langchain_lychee, name), name


def test_exception_tree() -> None:
    from lychee.rerank import client as c

    for cls in (
        c.InvalidRequestError,
        c.AuthenticationError,
        c.OverloadedError,
        c.UnavailableError,
        c.DeadlineExceededError,
        c.ServerError,
    ):
        assert issubclass(cls, c.LycheeError)
    assert issubclass(c.InvalidRequestError, ValueError)
    assert issubclass(c.DeadlineExceededError, TimeoutError)
    assert not issubclass(c.ServerError, ValueError)


def test_image_helpers_and_warning() -> None:
    from lychee.rerank import client as c

    assert issubclass(c.ImageLikeTextWarning, UserWarning)
    for name in ("from_bytes", "from_file", "from_data_uri"):
        assert isinstance(inspect.getattr_static(c.EncodedImage, name), classmethod), name


@pytest.mark.parametrize("cls_name", ["LycheeClient", "AsyncLycheeClient"])
def test_rerank_signature(cls_name: str) -> None:
    from lychee.rerank import client as c

    params = inspect.signature(getattr(c, cls_name).rerank).parameters
    assert list(params) == [
        "self",
        "query",
        "documents",
        "instruction",
        "top_n",
        "score_kind",
        "max_length",
        "return_text",
        "timeout",
        "on_progress",
    ]
    assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in list(params)[3:])


def test_client_keeps_heavy_imports_out() -> None:
    """The base install is grpcio + protobuf: importing the client must not drag in torch,
    the server, LangChain or Pillow (a fresh interpreter, since this one may have them loaded)."""
    code = (
        "import sys, lychee.rerank.client, lychee.rerank\n"
        "bad = [m for m in ('torch', 'lychee_server', 'langchain_core', 'PIL') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_adapter_keeps_server_and_torch_out() -> None:
    pytest.importorskip("langchain_core")
    code = (
        "import sys, langchain_lychee\n"
        "bad = [m for m in ('torch', 'lychee_server') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
