"""The FastAPI app: `POST /v1/embeddings`, `GET /v1/models`, `GET /health`, `GET /metrics`.

Every request passes one guard first (Host header, API key except on /health, an access-log line without body
or texts, request metrics); refusals are OpenAI-style error bodies, and an unexpected failure is a 500 whose body
says nothing about the server (the traceback goes to the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pue.runtime import Embedder, Query
from pue.runtime.embedder import matryoshka_cut
from pue.runtime.prompts import PromptTokenizer
from pue.serve.batcher import Batcher, Draining, QueueFull
from pue.serve.config import ServeSettings
from pue.serve.errors import AUTHENTICATION, SERVER_ERROR, ApiError, bad_request, too_large, unavailable
from pue.serve.grouping import embed_grouped_by_length
from pue.serve.metrics import ServeMetrics
from pue.serve.responses import embeddings_body, model_card
from pue.serve.rows import prepare_rows
from pue.serve.schema import parse_request
from pue.serve.security import bearer_matches, host_allowed, is_json_content_type

log = logging.getLogger(__name__)
access_log = logging.getLogger("pue.serve.access")

OPEN_ROUTES = frozenset({"/health"})


class ServerState:
    """What the routes share: readiness, the batcher, the validating tokenizer, the metrics."""

    def __init__(self, embedder: Embedder, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.embedder = embedder
        self.settings = settings
        self.metrics = metrics
        # Validation tokenizes in request threads; its own tokenizer keeps it off the Embedder's state.
        self.prompts = PromptTokenizer.for_bundle(embedder.bundle_dir, embedder.manifest)

        def embed(queries: list[Query]) -> np.ndarray:
            return embedder.embed(queries, batch_size=settings.max_batch)

        if not settings.per_request:  # a per-request batch must stay exactly `Embedder.embed(that request)`
            # the worker thread's own tokenizer: request threads keep using self.prompts
            embed = embed_grouped_by_length(embed, PromptTokenizer.for_bundle(embedder.bundle_dir, embedder.manifest))
        self.batcher = Batcher(
            embed,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            per_request=settings.per_request,
            metrics=metrics,
        )
        self.ready = False
        self.draining = False
        self.started = time.time()


def create_app(embedder: Embedder, settings: ServeSettings, metrics: ServeMetrics | None = None) -> FastAPI:
    """The server over one loaded `embedder`; ready (GET /health 200) once its warm-up batch ran."""
    state = ServerState(embedder, settings, metrics or ServeMetrics())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.batcher.start()
        warm_up = asyncio.create_task(_warm_up(state))
        yield
        state.draining = True
        log.info("draining: %d queued rows to finish", state.batcher.queued_rows)
        await warm_up
        await state.batcher.drain()
        log.info("drained")

    app = FastAPI(title="pue-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        return await _guarded(state, request, call_next)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await _embeddings(state, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(settings.model_name, state.started)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(settings.model_name, model_id)
        return model_card(settings.model_name, state.started)

    @app.get("/health")
    async def health() -> Response:
        status = "draining" if state.draining else "ok" if state.ready else "loading"
        body = {"status": status, "model": settings.model_name}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        content, content_type = state.metrics.render()
        return Response(content, media_type=content_type)

    return app


async def _warm_up(state: ServerState) -> None:
    tile = np.full((state.embedder.manifest.tile_size,) * 2 + (3,), 230, np.uint8)
    kinds = [Query(text="warm-up"), Query(image=tile), Query(image=tile, text="warm-up")]
    queries = [kinds[i % 3] for i in range(state.settings.max_batch)]
    started = time.perf_counter()
    try:
        await state.batcher.run_now(queries)
    except Exception:
        log.exception("the warm-up batch failed; the server stays not ready")
        return
    state.ready = True
    log.info("ready: warm-up batch of %d rows ran in %.2f s", len(queries), time.perf_counter() - started)


async def _guarded(
    state: ServerState, request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    started = time.perf_counter()
    request_id = uuid.uuid4().hex[:16]
    request.state.rows = 0
    settings = state.settings
    path = request.url.path
    if not host_allowed(request.headers.get("host"), settings.allowed_hosts):
        response = _error_response(
            ApiError(400, "the Host header names no host this server answers", code="invalid_host")
        )
    elif (
        settings.api_key is not None
        and path not in OPEN_ROUTES
        and not bearer_matches(request.headers.get("authorization"), settings.api_key)
    ):
        response = _error_response(
            ApiError(
                401,
                "a valid API key is required (Authorization: Bearer KEY)",
                type=AUTHENTICATION,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        )
    else:
        try:
            response = await call_next(request)
        except Exception:
            log.exception("request %s failed", request_id)
            response = _error_response(ApiError(500, "internal server error", type=SERVER_ERROR, code="internal_error"))
    response.headers["X-Request-Id"] = request_id
    state.metrics.requests.labels(state.metrics.route_label(path), str(response.status_code)).inc()
    if settings.access_log:
        access_log.info(
            json.dumps(
                {
                    "request_id": request_id,
                    "client": request.client.host if request.client else None,
                    "method": request.method,
                    "path": path,
                    "status": response.status_code,
                    "ms": round(1000 * (time.perf_counter() - started), 2),
                    "rows": request.state.rows,
                    "bytes_in": int(request.headers.get("content-length") or 0),
                }
            )
        )
    return response


async def _embeddings(state: ServerState, request: Request) -> Response:
    started = time.perf_counter()
    settings, batcher, metrics = state.settings, state.batcher, state.metrics
    if not is_json_content_type(request.headers.get("content-type")):
        raise ApiError(415, "Content-Type must be application/json", code="unsupported_media_type")
    if state.draining:
        raise unavailable("the server is shutting down", code="shutting_down")
    if not state.ready:
        raise unavailable("the model is still warming up", code="not_ready")
    if not batcher.has_room(1):
        raise unavailable("the queue is full; retry later")
    body = await _read_body(request, settings.limits.max_body_bytes)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise bad_request("the request body is not valid JSON", code="invalid_json") from exc
    parsed = parse_request(payload, settings.limits)
    _check_model(settings.model_name, parsed.model)
    _check_dimensions(state.embedder, parsed.dimensions)
    if not batcher.has_room(len(parsed.rows)):
        raise unavailable("the queue is full; retry later")
    prepared = await run_in_threadpool(prepare_rows, parsed, state.prompts, settings.limits)
    request.state.rows = len(prepared.queries)
    metrics.stage_seconds.labels("validate").observe(time.perf_counter() - started)
    try:
        vectors = await batcher.submit(prepared.queries)
    except QueueFull:
        raise unavailable("the queue is full; retry later") from None
    except Draining:
        raise unavailable("the server is shutting down", code="shutting_down") from None
    encoding_started = time.perf_counter()
    if parsed.dimensions is not None:
        vectors = matryoshka_cut(vectors, parsed.dimensions)
    content = embeddings_body(vectors, parsed.encoding_format, settings.model_name, prepared.prompt_tokens)
    for kind in prepared.kinds:
        metrics.rows.labels(kind).inc()
    finished = time.perf_counter()
    metrics.stage_seconds.labels("encode").observe(finished - encoding_started)
    metrics.stage_seconds.labels("request").observe(finished - started)
    return Response(content, media_type="application/json")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise bad_request("the Content-Length header is not a number", code="invalid_header")
        if int(declared) > limit:
            raise too_large(f"the request body has {int(declared)} bytes, more than this server's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"the request body is larger than this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_model(served: str, asked: str | None) -> None:
    if asked is not None and asked != served:
        raise ApiError(
            404,
            f"model {asked!r} is not served here; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


def _check_dimensions(embedder: Embedder, asked: int | None) -> None:
    """The bundle's own dimension, or where its recipe allows a Matryoshka cut (Qwen3-VL-Embedding) any dimension
    from the recipe's minimum up to the bundle's: the rows are then cut and renormalised as the runtime cuts them."""
    dimension = embedder.dimension
    matryoshka = (embedder.manifest.recipe or {}).get("matryoshka")
    low = min(int(matryoshka["min_dim"]), dimension) if matryoshka else dimension
    if asked is not None and not low <= asked <= dimension:
        supported = f"[{dimension}]" if low == dimension else f"{low} to {dimension}"
        raise bad_request(
            f"dimensions={asked} is not supported: this bundle produces {dimension}-dimensional embeddings"
            f"{' only' if low == dimension else ', cut to fewer down to its recipe minimum'} "
            f"(supported dimensions: {supported})",
            param="dimensions",
            code="unsupported_dimensions",
        )


def _error_response(exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
