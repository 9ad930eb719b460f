"""The HTTP/JSON door (Cohere/Jina ``/v1/rerank``, TEI ``/rerank``, probes, OpenAPI).

``door`` holds the routes, ``jsoncodec`` the JSON <-> domain conversion, ``schema`` the JSON
shapes, ``fetch`` the opt-in image URL fetcher, ``server`` the uvicorn listener on the shared loop.
"""

from lychee_server.edge.http.door import OPEN_PATHS, HttpDoor
from lychee_server.edge.http.server import HttpServer

__all__ = ["OPEN_PATHS", "HttpDoor", "HttpServer"]
