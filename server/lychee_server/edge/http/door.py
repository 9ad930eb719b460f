"""The HTTP/JSON door: routes of the Cohere/Jina (``/v1/rerank``, ``/v2/rerank``) and TEI
(``/rerank``) reranking APIs, plus health, info, models, metrics and OpenAPI, over the same
:class:`~lychee_server.edge.gate.Gate` (and so the same scheduler, engine, limits, error table,
metrics and drain) as the gRPC door.

Why FastAPI on uvicorn: it is the field's well-kept ASGI stack (vLLM, SGLang, Infinity and TEI's
Python peers use it), it runs on the very asyncio loop grpc.aio uses, and it renders OpenAPI and
interactive docs from the models in :mod:`.schema`. FastAPI does not parse our bodies, though: a
route reads the body itself under the byte limit and the deadline, then :mod:`.jsoncodec` parses
it (in a worker thread when it is large, so one big body cannot stall the loop that also serves
gRPC) and applies the shared rule table.

Every route runs inside :meth:`HttpDoor._run`: request id (``x-request-id`` in, and out on every
answer), the gate's call accounting (metrics with ``transport="http"``, one log line), errors
through the one status table (:func:`lychee_server.edge.status.to_http`), and cancellation: when
the client disconnects while its job is queued or running, the job is cancelled (the scheduler
drops its work) and the call is logged as CANCELLED (499).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from lychee_server import domain, errors
from lychee_server.edge import parts
from lychee_server.edge.auth import KeySet, bearer_token, rejection, tenant_of
from lychee_server.edge.gate import REQUEST_ID_KEY, BufferHold, Call, Gate, request_id_from
from lychee_server.edge.http import jsoncodec, schema
from lychee_server.edge.progress import ProgressMailbox, follow
from lychee_server.edge.status import TABLE, http_error_for_exception, to_http
from lychee_server.edge.validation import render_rules_markdown
from lychee_server.metrics import Metrics
from lychee_server.settings import Settings

__all__ = ["OPEN_PATHS", "TRANSPORT", "HttpDoor"]

TRANSPORT = "http"
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
"""Routes answered without a bearer token (probes, the public contract and the playground page,
which holds no data: it asks for the token itself); all else is closed."""
OPEN_PREFIXES = ("/playground/",)
"""The playground's static files (HTML, CSS, JS shipped in the package), open like the page."""
PLAYGROUND_DIR = Path(__file__).resolve().parent / "playground"

THREAD_PARSE_BYTES = 1024 * 1024
"""Bodies larger than this are parsed and validated on a worker thread, not on the event loop."""
JSON_RESULT_OVERHEAD = 128
"""Bytes one ranked result costs in JSON besides its id and text (keys, index, score, framing)."""
RERANK_PATHS = parts.ResponsePaths(top_n="top_n", return_text="return_documents")
TEI_PATHS = parts.ResponsePaths(top_n="texts", return_text="return_text")

_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _EventStream(StreamingResponse):
    """A ``text/event-stream`` answer whose events come from a generator; ``on_close`` callbacks run
    when the generator ends, however it ends (finished, failed, or the client went away)."""

    def __init__(self, events: Callable[[Callable[[], None]], AsyncIterator[bytes]]) -> None:
        self._closers: list[Callable[[], None]] = []
        super().__init__(
            events(self._close),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def _close(self) -> None:
        closers, self._closers = self._closers, []
        for fn in closers:
            fn()


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _progress_json(p: domain.Progress) -> dict[str, Any]:
    return {
        "phase": p.phase.value,
        "pairs_total": p.pairs_total,
        "pairs_prepared": p.pairs_prepared,
        "pairs_scored": p.pairs_scored,
    }


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type="application/json")


def _error_response(exc: BaseException, request_id: str) -> tuple[Response, str]:
    """The one way an error leaves this door: (response, gRPC code name for metrics/logs)."""
    err = http_error_for_exception(exc, request_id=request_id)
    lychee = exc if isinstance(exc, errors.LycheeError) else None
    code = TABLE[lychee.code].grpc.name if lychee is not None else "INTERNAL"
    return _json(err.body, err.status, err.headers), code


def _bearer(scope: Scope) -> bytes | None:
    headers = scope.get("headers", ())
    return bearer_token((bytes(k).decode("latin-1"), bytes(v)) for k, v in headers)


class _AuthMiddleware:
    """Bearer-token check before routing and before any body byte is read (pure ASGI)."""

    def __init__(self, app: ASGIApp, keys: KeySet, metrics: Metrics) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if self.keys.verify(token):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(_header(scope, b"x-request-id"))
        self.metrics.requests.labels(scope.get("path", ""), "UNAUTHENTICATED", TRANSPORT).inc()
        response, _ = _error_response(rejection(token), request_id)
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _deadline(request: Request, settings: Settings) -> float | None:
    """``X-Request-Timeout`` (seconds) or the ``http_timeout_s`` default, as a monotonic deadline."""
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return None if settings.http_timeout_s is None else time.monotonic() + settings.http_timeout_s
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not (0 < seconds < 1e7):
        raise errors.InvalidInput(
            "X-Request-Timeout must be a positive number of seconds",
            violations=[errors.FieldViolation("X-Request-Timeout", "must be a positive number of seconds")],
        )
    return time.monotonic() + seconds


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class HttpDoor:
    """The FastAPI application of the HTTP door (serve it with :class:`.server.HttpServer`)."""

    def __init__(
        self,
        settings: Settings,
        gate: Gate,
        metrics: Metrics,
        *,
        version: str = "",
        keys: KeySet | None = None,
        fetcher: Any = None,
    ) -> None:
        self.settings = settings
        self.gate = gate
        self.metrics = metrics
        self.version = version
        self.fetcher = fetcher
        self.app = self._build()
        self.asgi: ASGIApp = self.app if keys is None else _AuthMiddleware(self.app, keys, metrics)

    # ------------------------------------------------------------------ the one wrapper
    async def _run(
        self, request: Request, method: str, body: Callable[[Call], Awaitable[Response]]
    ) -> Response:
        peer = f"{request.client.host}:{request.client.port}" if request.client else ""
        tenant = tenant_of(_bearer(request.scope)) if self.gate.authenticated else ""
        request_id = request_id_from(request.headers.get(REQUEST_ID_KEY))
        stack = contextlib.ExitStack()  # the call stays open while a streamed answer is sent
        headers = request.scope.get("headers", ())  # traceparent / tracestate, read only when tracing
        call = stack.enter_context(self.gate.call(method, TRANSPORT, request_id, peer, tenant, headers))
        try:
            try:
                self.gate.admit(call)  # before the body is read
                response = await body(call)
            except _ClientGone:
                call.code = "CANCELLED"
                return Response(status_code=499)  # nobody reads it; for the access log only
            except Exception as exc:
                response, call.code = _error_response(exc, call.request_id)
                await self.gate.pause_refusal(exc, call)
                return response
            response.headers[REQUEST_ID_KEY] = call.request_id
            if isinstance(response, _EventStream):
                response.on_close(stack.pop_all().close)
            return response
        finally:
            stack.close()

    async def _read_body(
        self, request: Request, deadline: float | None, hold: BufferHold, call: Call
    ) -> bytes:
        """The body, refused with 413 past the limit (by Content-Length before reading, else as the
        bytes arrive), with 429 past the server-wide payload budget (``hold``), and with 504 when
        it stalls for ``stream_idle_timeout_s`` or outlives the deadline."""
        limit = self.settings.http_max_body_bytes
        too_large = errors.InvalidInput(
            f"the request body is over the {limit}-byte limit",
            reason="REQUEST_TOO_LARGE",
            violations=[
                errors.FieldViolation("body", f"is over the {limit}-byte limit", "REQUEST_TOO_LARGE")
            ],
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            if int(declared) > limit:
                raise too_large
            hold.resize(int(declared))  # refused before a byte is read when the server is full
        idle = self.settings.stream_idle_timeout_s
        chunks: list[bytes] = []
        size = 0
        stream = request.stream().__aiter__()
        while True:
            remaining = _remaining(deadline)
            wait = idle if remaining is None else min(idle, remaining)
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0.0))
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"the request body stalled for {idle:g} s (stream_idle_timeout_s) "
                    "or outlived the deadline"
                ) from None
            size += len(chunk)
            call.received_bytes = size
            if size > limit:
                raise too_large
            if size > hold.held:
                hold.resize(size)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _off_loop(self, size: int, fn: Callable[..., _T], *args: Any) -> _T:
        """Run CPU work proportional to the body on a thread when the body is large."""
        if size > THREAD_PARSE_BYTES:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def _until_done_or_gone(self, request: Request, work: Coroutine[Any, Any, _T]) -> _T:
        """Await ``work``; if the client disconnects first, cancel it (the scheduler drops the job)."""
        task = asyncio.ensure_future(work)

        async def gone() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(gone())
        try:
            done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _ClientGone()

    async def _fetch_images(
        self, req: schema.RerankIn, deadline: float | None, request_id: str
    ) -> dict[str, bytes]:
        refs = jsoncodec.image_urls(req)
        if not refs:
            return {}
        if not self.settings.image_url_fetch or self.fetcher is None:
            violations = [
                errors.FieldViolation(
                    r.path,
                    "image URLs are off on this server: send the image as base64 or a data: URI, or "
                    "start the server with --image-url-fetch (LYCHEE_IMAGE_URL_FETCH=1)",
                    "IMAGE_URL_DISABLED",
                )
                for r in refs
            ]
            raise errors.InvalidInput(
                f"{refs[0].path}: image URLs are off on this server (--image-url-fetch turns them on)",
                reason="IMAGE_URL_DISABLED",
                violations=violations,
                metadata={"request_id": request_id},
            )
        if len(refs) > self.settings.max_documents + 1:
            raise errors.InvalidInput(
                "too many image URLs",
                reason="TOO_MANY_DOCUMENTS",
                violations=[errors.FieldViolation("documents", "too many image URLs", "TOO_MANY_DOCUMENTS")],
            )
        results = await asyncio.gather(
            *(self.fetcher.fetch(r.url, path=r.path, deadline=deadline) for r in refs), return_exceptions=True
        )
        fetched: dict[str, bytes] = {}
        failures: list[errors.LycheeError] = []
        for ref, got in zip(refs, results, strict=True):
            if isinstance(got, errors.LycheeError):
                failures.append(got)
            elif isinstance(got, BaseException):
                raise got
            else:
                fetched[ref.path] = got
        if failures:
            violations = [
                v for f in failures for v in (f.violations or (errors.FieldViolation("", f.message),))
            ]
            raise errors.InvalidInput(
                failures[0].message,
                reason=failures[0].reason,
                violations=violations,
                metadata={"request_id": request_id},
            )
        return fetched

    # ------------------------------------------------------------------ rerank bodies
    async def _parse(
        self, request: Request, model: type[_M], deadline: float | None, call: Call, hold: BufferHold
    ) -> tuple[_M, int]:
        self.gate.require_serving()  # refuse before reading a body the server cannot use
        body = await self._read_body(request, deadline, hold, call)
        parsed = await self._off_loop(
            len(body), lambda: jsoncodec.parse(body, model, request_id=call.request_id)
        )
        return parsed, len(body)

    def _checked_job(self, job: domain.RerankJob, paths: parts.ResponsePaths) -> domain.RerankJob:
        """The job, unless its answer could exceed ``max_message_bytes`` (refused before scoring)."""
        limit = self.settings.max_message_bytes
        parts.check_response_size(job, limit, JSON_RESULT_OVERHEAD, paths, request_id=job.request_id)
        return job

    def _answer(self, body: Any, paths: parts.ResponsePaths, request_id: str) -> Response:
        rendered = orjson.dumps(body)
        parts.require_response_fits(
            len(rendered), self.settings.max_message_bytes, paths, request_id=request_id
        )
        return Response(rendered, media_type="application/json")

    async def _rerank_job(
        self, request: Request, deadline: float | None, call: Call, hold: BufferHold
    ) -> tuple[schema.RerankIn, domain.RerankJob]:
        """Body -> shape -> fetched image URLs -> a checked job (the Cohere/Jina routes)."""
        with call.span("validate"):
            req, size = await self._parse(request, schema.RerankIn, deadline, call, hold)
            fetched = await self._fetch_images(req, deadline, call.request_id)
            size += sum(len(b) for b in fetched.values())
            hold.resize(max(hold.held, size))
            job = await self._off_loop(
                size,
                lambda: self._checked_job(
                    jsoncodec.job_from_rerank(
                        req, self.settings, request_id=call.request_id, fetched=fetched
                    ),
                    RERANK_PATHS,
                ),
            )
        call.note(request_bytes=size)
        return req, job

    async def _rerank(self, request: Request, call: Call) -> Response:
        t0 = time.monotonic()
        deadline = _deadline(request, self.settings)
        hold = self.gate.hold()
        try:
            req, job = await self._rerank_job(request, deadline, call, hold)
            result = await self._until_done_or_gone(request, self.gate.score(job, call, deadline))
        finally:
            hold.release()  # the job (and the bytes it holds) is no longer needed
        warnings = [f"unknown field '{name}' was ignored" for name in jsoncodec.unknown_fields(req)]
        body = jsoncodec.rerank_body(
            _with_total(result, t0),
            request_id=call.request_id,
            warnings=warnings,
            return_documents=req.return_documents,
        )
        return self._answer(body, RERANK_PATHS, call.request_id)

    async def _rerank_progress(self, request: Request, call: Call) -> Response:
        """``/v1/rerank/progress``: the same job as ``/v1/rerank``, answered as server-sent events
        (``progress`` events, then one ``result`` or ``error``). Everything that can fail before
        the job is admitted -- the body, the rules, admission -- fails as a normal JSON error."""
        t0 = time.monotonic()
        deadline = _deadline(request, self.settings)
        hold = self.gate.hold()
        streaming = False
        try:
            req, job = await self._rerank_job(request, deadline, call, hold)
            mailbox = ProgressMailbox()
            scoring = asyncio.ensure_future(self.gate.score(job, call, deadline, mailbox.put))
            admitted = asyncio.ensure_future(mailbox.wait())
            try:
                await asyncio.wait((scoring, admitted), return_when=asyncio.FIRST_COMPLETED)
            finally:
                admitted.cancel()
            if scoring.done() and scoring.exception() is not None:
                raise scoring.exception()  # type: ignore[misc]  # refused (e.g. overload): a JSON error
            streaming = True
        finally:
            if not streaming:
                hold.release()
        warnings = [f"unknown field '{name}' was ignored" for name in jsoncodec.unknown_fields(req)]

        async def events(close: Callable[[], None]) -> AsyncIterator[bytes]:
            try:
                async for progress in follow(mailbox, scoring):
                    yield _event("progress", _progress_json(progress))
                result = await scoring
                body = jsoncodec.rerank_body(
                    _with_total(result, t0),
                    request_id=call.request_id,
                    warnings=warnings,
                    return_documents=req.return_documents,
                )
                yield _event("result", body)
            except asyncio.CancelledError:
                call.code = "CANCELLED"  # the client went away mid-stream
                raise
            except Exception as exc:  # after the 200 was sent: the error becomes the last event
                err = http_error_for_exception(exc, request_id=call.request_id)
                call.code = err.body["code"]
                yield _event("error", err.body)
            finally:
                scoring.cancel()  # a no-op once done; else the scheduler drops the rest
                hold.release()
                close()

        return _EventStream(events)

    async def _tei(self, request: Request, call: Call) -> Response:
        deadline = _deadline(request, self.settings)
        hold = self.gate.hold()
        try:
            with call.span("validate"):
                req, size = await self._parse(request, schema.TeiRerankIn, deadline, call, hold)
                job = await self._off_loop(
                    size,
                    lambda: self._checked_job(
                        jsoncodec.job_from_tei(req, self.settings, request_id=call.request_id), TEI_PATHS
                    ),
                )
            call.note(request_bytes=size)
            result = await self._until_done_or_gone(request, self.gate.score(job, call, deadline))
        finally:
            hold.release()
        return self._answer(
            jsoncodec.tei_body(result, return_text=req.return_text), TEI_PATHS, call.request_id
        )

    async def _info(self, call: Call) -> Response:
        info = self.gate.info
        return _json(
            {
                "model_id": info.model_id,
                "model_revision": info.model_revision,
                "dtype": info.dtype,
                "device": info.device,
                "query_modalities": sorted(m.value for m in info.query_modalities),
                "document_modalities": sorted(m.value for m in info.document_modalities),
                "limits": {
                    **parts.limits(self.settings, info),
                    "max_body_bytes": self.settings.http_max_body_bytes,
                    "media_types": sorted(t.value for t in parts.MEDIA_TYPE_NUMBERS.values()),
                },
                "server_version": self.version,
                "random_weights": info.random_weights,
                "quantization": info.quantization,
                "attention": info.attention,
                "image_url_fetch": self.settings.image_url_fetch,
            }
        )

    # ------------------------------------------------------------------ the application
    def _build(self) -> FastAPI:
        app = FastAPI(
            title="lychee-rerank",
            version=self.version or "0",
            summary="Multimodal reranking (Lychee, Qwen2.5-VL) over HTTP/JSON: Cohere, Jina and TEI shapes.",
            description=_DESCRIPTION + "\n\n### Request limits\n\n" + render_rules_markdown(),
        )
        errors_doc: dict[int | str, dict[str, Any]] = {
            status: {"model": schema.ErrorBody, "description": text}
            for status, text in _ERROR_STATUSES.items()
        }

        def rerank_route(path: str) -> None:
            @app.post(
                path,
                response_model=schema.RerankOut,
                responses=errors_doc,
                openapi_extra=_body_doc(schema.RerankIn),
                summary="Rank documents against a query (Cohere / Jina shape)",
                name=f"rerank {path}",
            )
            async def rerank(request: Request) -> Response:
                return await self._run(request, path, lambda call: self._rerank(request, call))

        rerank_route("/v1/rerank")
        rerank_route("/v2/rerank")

        @app.post(
            "/v1/rerank/progress",
            responses={
                200: {
                    "description": "Server-sent events: `progress` ({phase, pairs_total, pairs_prepared, "
                    "pairs_scored}, monotonic), then one `result` (the /v1/rerank answer) or `error` "
                    "(an ErrorBody)",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **errors_doc,
            },
            openapi_extra=_body_doc(schema.RerankIn),
            summary="Rank documents and stream progress (server-sent events)",
        )
        async def rerank_progress(request: Request) -> Response:
            return await self._run(
                request, "/v1/rerank/progress", lambda call: self._rerank_progress(request, call)
            )

        @app.post(
            "/rerank",
            response_model=list[schema.TeiResultOut],
            responses=errors_doc,
            openapi_extra=_body_doc(schema.TeiRerankIn),
            summary="Rank texts against a query (Hugging Face TEI shape)",
        )
        async def tei_rerank(request: Request) -> Response:
            return await self._run(request, "/rerank", lambda call: self._tei(request, call))

        @app.get("/", include_in_schema=False)
        async def playground() -> Response:
            return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html")

        app.mount("/playground", StaticFiles(directory=PLAYGROUND_DIR), name="playground")

        @app.get("/healthz", summary="The process is up (answers while the model loads, too)")
        async def healthz() -> Response:
            return _json({"status": "ok"})

        @app.get("/readyz", summary="200 only when the model is warm and the server is not draining")
        async def readyz() -> Response:
            if self.gate.ready:
                return _json({"status": "serving"})
            state = self.gate.state.value
            return _json({"status": state}, 503, {"retry-after": "1"})

        @app.get("/v1/models", response_model=schema.ModelList, summary="The served model")
        async def models(request: Request) -> Response:
            async def body(call: Call) -> Response:
                card = schema.ModelCard(id=self.gate.info.model_id)
                return _json(schema.ModelList(data=[card]).model_dump())

            return await self._run(request, "/v1/models", body)

        @app.get("/v1/info", summary="The model, its modalities and the request limits in force")
        async def info(request: Request) -> Response:
            return await self._run(request, "/v1/info", self._info)

        @app.get("/metrics", summary="Prometheus metrics (the same registry as the metrics port)")
        async def metrics() -> Response:
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        async def not_found(request: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, StarletteHTTPException) else 404
            word = "no such route" if status == 404 else "method not allowed"
            err = errors.NotFound(f"{word}: {request.method} {request.url.path}")
            rendered = to_http(err, request_id=request_id_from(request.headers.get(REQUEST_ID_KEY)))
            return _json(rendered.body, status, rendered.headers)

        async def invalid(request: Request, exc: Exception) -> Response:  # pragma: no cover - no body params
            response, _ = _error_response(errors.InvalidInput("invalid request"), "")
            return response

        app.add_exception_handler(StarletteHTTPException, not_found)
        app.add_exception_handler(RequestValidationError, invalid)

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                spec = get_openapi(
                    title=app.title,
                    version=app.version,
                    summary=app.summary,
                    description=app.description,
                    routes=app.routes,
                )
                components = spec.setdefault("components", {}).setdefault("schemas", {})
                for model in (schema.RerankIn, schema.TeiRerankIn):
                    components.update(_defs(model))
                spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                app.openapi_schema = spec
            built: dict[str, Any] = app.openapi_schema
            return built

        app.openapi = openapi  # type: ignore[method-assign]
        return app


def _with_total(result: domain.RerankResult, t0: float) -> domain.RerankResult:
    return replace(result, timings=replace(result.timings, total=time.monotonic() - t0))


_REF = "#/components/schemas/{model}"


def _defs(model: type[BaseModel]) -> dict[str, Any]:
    js = model.model_json_schema(ref_template=_REF)
    defs: dict[str, Any] = js.pop("$defs", {})
    defs[model.__name__] = js
    return defs


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring the JSON body the route reads itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
        }
    }


_ERROR_STATUSES: dict[int | str, str] = {
    400: "Invalid request (reason and field_violations say what and where)",
    401: "Missing or invalid bearer token",
    413: "Body over the size limit",
    422: "The loaded model does not accept this modality",
    429: "Overloaded: retry after Retry-After seconds",
    499: "The client went away (logged only)",
    500: "Internal error",
    503: "Loading or draining: retry after Retry-After seconds",
    504: "Deadline exceeded",
}

_DESCRIPTION = """\
Scores every (query, document) pair with the Lychee reranker's published recipe — p("yes") from
the softmax over the (no, yes) logits — and returns the documents ranked. The same scheduler,
limits and error reasons as the gRPC service `lychee.rerank.v1.RerankService`.

* `POST /v1/rerank`, `POST /v2/rerank`: Cohere (v1, v2) and Jina request/answer shapes; documents
  and the query may be strings or objects with `text` and/or `image` (base64 or a data: URI).
* `POST /rerank`: Hugging Face TEI shape.
* Deadline: header `X-Request-Timeout: <seconds>`. Request id: header `x-request-id` (echoed).
* Errors: JSON `{message, reason, code, request_id, field_violations[{field, description, reason}]}`;
  429 and 503 carry `Retry-After`.
* Auth (when the server has keys): `Authorization: Bearer <key>`.
"""
