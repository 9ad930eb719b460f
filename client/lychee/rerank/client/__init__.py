"""Typed Python client for the Lychee multimodal rerank service (``lychee.rerank.v1``).

    from lychee.rerank.client import LycheeClient, Doc

    with LycheeClient("localhost:50051") as client:
        result = client.rerank("how do I reset my password?", ["Reset it under Settings.", "Lunch menu"])
        best = result.results[0]          # RankedDocument(index=0, score=0.97, ...)

Inputs are plain Python values: ``str`` is text, ``bytes`` / ``pathlib.Path`` / PIL images are
images (JPEG, PNG or WebP; GIF, BMP and TIFF are converted to PNG when Pillow is installed),
:class:`Doc` / :class:`Query` combine text and an image. A bare ``str`` that looks like an
image (URL, ``data:`` URI, image file path) is still text and warns with
:class:`ImageLikeTextWarning`; ``EncodedImage.from_data_uri`` / ``from_file`` build images. Large
payloads switch to the streaming RPC automatically. Failures raise the :class:`LycheeError`
tree; transient ones (UNAVAILABLE, overload) are retried within the call's deadline.

The base install needs only grpcio and protobuf: this package imports neither torch, the
server, nor LangChain, and Pillow only when it is handed a PIL image or a GIF/BMP/TIFF.
"""

from ._async import AsyncLycheeClient
from ._errors import (
    AuthenticationError,
    DeadlineExceededError,
    FieldViolation,
    InvalidRequestError,
    LycheeError,
    OverloadedError,
    ServerError,
    UnavailableError,
)
from ._inputs import ImageLikeTextWarning
from ._retry import NO_RETRY, RetryPolicy
from ._sync import LycheeClient
from ._types import (
    Doc,
    DocumentInput,
    EncodedImage,
    ImageInput,
    Limits,
    MediaType,
    Progress,
    Query,
    QueryInput,
    RankedDocument,
    RerankResult,
    ScoreKind,
    ServerInfo,
    Timings,
    Usage,
)

__all__ = [
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
]
