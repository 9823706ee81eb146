"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one `Selar` object, or a
`ModelPool` of models loaded on demand.

    POST /v1/chat/completions   chat, streamed as server-sent events or as one JSON body
    POST /v1/completions        raw-prompt completion, same
    POST /v1/responses          OpenAI's Responses API (selar_local/responses_api.py)
    GET  /v1/models             the models served (one, or many loaded on demand: model_pool.py)
    GET  /health                status and slot/queue counters
    GET  /                      the chat page (selar_local/web/; no API key needed to load it)
    /api/...                    Ollama's API (selar_local/ollama_api.py)
    GET  /metrics               Prometheus metrics, with `metrics=True` (selar_local/metrics.py)
    POST /tokenize, /detokenize as llama-server (selar_local/tokenize_api.py)

SeLaR parameters (method, tau, lam, ks, thinking_only, top_k, min_p, greedy, ...) are
extra fields of the request body, so the `openai` client passes them with `extra_body`.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for
malformed JSON, bad values and prompts over the context, 404 for an unknown model or
route, 401 for a missing or wrong API key, 503 when every slot is busy and the queue is
full. A client that disconnects has its sequence cancelled, which frees its slot and KV
cells before the next decode step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from selar_local.api import (
    ChunkWriter,
    PreparedRequest,
    QueueFullError,
    RequestCancelledError,
    RequestError,
    RequestHandle,
    SchedulerClosedError,
    Selar,
    as_request_error,
    completion_response,
)
from selar_local.errors import ContextOverflowError, InvalidParameterError, RpcError, UnsupportedModelError
from selar_local.http_stream import CancellingStream, cancel_all, compact_json, until_disconnect
from selar_local.model_pool import Lease, ModelPool
from selar_local.search_api import response_chunks, search_response, wants_search
from selar_local.webpage import add_chat_page, is_public

logger = logging.getLogger("selar_local.server")

MAX_BODY_BYTES = 16 << 20
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error",
                500: "server_error"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type_: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_ or _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else ({"Retry-After": "1"} if status == 503 else None)
    return JSONResponse(error_body(status, message, **kwargs), status_code=status, headers=headers)


def _response_for(exc: BaseException) -> JSONResponse:
    if isinstance(exc, QueueFullError):
        return error_response(503, str(exc), code="queue_full")
    if isinstance(exc, RequestCancelledError):  # nobody is listening any more
        return error_response(499, str(exc), code="cancelled", type_="cancelled")
    if isinstance(exc, SchedulerClosedError):
        return error_response(503, str(exc), code="shutting_down")
    if isinstance(exc, RpcError):  # a server holding some of the layers is gone (docs/DISTRIBUTED.md)
        return error_response(503, str(exc), code="rpc_server_lost")
    if isinstance(exc, (RequestError, InvalidParameterError, ContextOverflowError, UnsupportedModelError)):
        err = as_request_error(exc)  # type: ignore[arg-type]
        return error_response(err.status, str(err), param=err.param, code=err.code)
    logger.error("request failed", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


class _ApiKeyMiddleware:
    """Checks `Authorization: Bearer KEY` on every HTTP request (pure ASGI, streaming-safe)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not is_public(scope):
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "invalid API key"
                await error_response(401, message, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse_frame(chunk: dict) -> bytes:
    return b"data: " + compact_json(chunk) + b"\n\n"


def create_app(llm: Selar | ModelPool, *, api_key: str | None = None, close_on_shutdown: bool = False,
               metrics: bool = False, allow_pull: bool = False) -> FastAPI:
    """The ASGI app serving `llm` (one Selar, or a ModelPool loading models on demand).
    With `api_key`, every request must carry it; `metrics`: GET /metrics; `allow_pull`:
    POST /api/pull may download registry models."""
    from contextlib import asynccontextmanager

    pool = llm if isinstance(llm, ModelPool) else ModelPool.single(llm)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if close_on_shutdown:
            await run_in_threadpool(pool.close)

    app = FastAPI(title="selar-local", version=_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llm = llm
    app.state.pool = pool

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception):
        return _response_for(exc)

    @app.get("/health")
    async def health():
        return pool.health()

    @app.get("/v1/models")
    async def models():
        return pool.listing()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        try:
            wanted = pool.resolve(model_id).id
        except RequestError as exc:
            return _response_for(exc)
        return next(entry for entry in pool.listing()["data"] if entry["id"] == wanted)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, pool, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, pool, "completion")

    from selar_local.ollama_api import add_ollama_routes
    from selar_local.tokenize_api import add_tokenize_routes

    add_ollama_routes(app, pool, version=_version(), allow_pull=allow_pull)
    add_tokenize_routes(app, pool)

    @app.post("/v1/responses")
    async def responses(request: Request):
        from selar_local.responses_api import create_response

        return await create_response(request, pool)

    pinned = [m.selar for m in pool.models.values() if m.pinned]  # GET /: the chat page (selar_local/web/)
    add_chat_page(app, pinned[0].runtime.default_params() if pinned else None)
    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)
    if metrics:
        from selar_local.metrics import add_metrics

        app.state.metrics = add_metrics(app, pool)
    return app


async def _read_json(request: Request) -> dict[str, Any]:
    too_large = RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413, code="body_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    # Counted while it arrives (a chunked body has no length to trust): a client cannot make
    # the server buffer more than the limit.
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise too_large
        parts.append(part)
    raw = b"".join(parts)
    if not raw.strip():
        raise RequestError("the request body is empty: send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return body


async def acquire_model(pool: ModelPool, body: dict[str, Any], **kwargs: Any) -> Lease:
    """The request's model, loaded (in a worker thread: a load takes seconds)."""
    return await run_in_threadpool(lambda: pool.acquire(body.get("model"), **kwargs))


async def _complete(request: Request, pool: ModelPool, kind: str) -> Response:
    lease = None
    try:
        body = await _read_json(request)
        lease = await acquire_model(pool, body)
        llm = lease.selar
        # tokenising a long prompt must not block the loop
        req = await run_in_threadpool(getattr(llm.builder, kind), body)
        search = wants_search(req)  # e.g. method "latentseek": decoded by selar_local/search_api.py
        if not search:
            loop = asyncio.get_running_loop()
            inbox: asyncio.Queue = asyncio.Queue()

            def sink_for(index: int):
                def sink(kind: str, payload: Any) -> None:  # called in the scheduler's thread
                    loop.call_soon_threadsafe(inbox.put_nowait, (index, kind, payload))
                return sink

            handles = llm.scheduler.submit_group(req.prompt_tokens, req.choices,
                                                 sinks=[sink_for(i) for i in range(len(req.choices))])
    except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
        if lease is not None:
            lease.release()
        return _response_for(exc)
    if search:
        return await _search(req, llm, body, lease)
    if req.stream:
        return CancellingStream(_sse_chunks(req, inbox, llm.runtime.model, lease), handles, _sse_frame,
                                media_type="text/event-stream", last=b"data: [DONE]\n\n",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                on_close=lease.release)
    try:
        return await _wait_result(request, req, handles, inbox, llm.runtime.model)
    finally:
        lease.release()  # the model may be unloaded once no request holds it


async def _search(req: PreparedRequest, llm: Selar, body: dict[str, Any], lease: Lease) -> Response:
    """A search method's request: the whole search runs first (off the loop); a streamed one
    then gets the final answer as one chunk (search_api.response_chunks)."""
    try:
        messages = body.get("messages") if req.kind == "chat" else None
        response = await run_in_threadpool(search_response, llm, req, messages)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
        return _response_for(exc)
    finally:
        lease.release()
    if not req.stream:
        return JSONResponse(response)
    frames = b"".join(_sse_frame(c) for c in response_chunks(response, req.include_usage)) + b"data: [DONE]\n\n"
    return Response(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse_chunks(req: PreparedRequest, inbox: asyncio.Queue, model, lease: Lease) -> AsyncIterator[dict]:
    try:
        writer = ChunkWriter(req, model)
        for chunk in writer.opening():
            yield chunk
        while not writer.finished:
            index, kind, payload = await inbox.get()
            if kind == "error":  # the headers are sent: report the failure in the stream, as OpenAI does
                yield json.loads(_response_for(payload).body)
                return
            for chunk in writer.feed(index, kind, payload):
                yield chunk
    finally:
        lease.release()


async def _wait_result(request: Request, req: PreparedRequest, handles: list[RequestHandle],
                       inbox: asyncio.Queue, model) -> Response:
    watcher = asyncio.ensure_future(until_disconnect(request.receive, handles))
    results: dict[int, Any] = {}
    try:
        while len(results) < len(handles):
            index, kind, payload = await inbox.get()
            if kind == "done":
                results[index] = payload
            elif kind == "error":
                return _response_for(payload)
        return JSONResponse(completion_response(req, [results[i] for i in range(len(handles))], model))
    finally:
        watcher.cancel()
        cancel_all(handles)  # no-op once ended; frees the slots if this task was cancelled or one failed


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selar-local")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def serve(llm: "Selar | ModelPool", *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          log_level: str = "info", metrics: bool = False, allow_pull: bool = False) -> None:
    """Run the server until interrupted (uvicorn, one process, one event loop)."""
    import uvicorn

    app = create_app(llm, api_key=api_key, metrics=metrics, allow_pull=allow_pull)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
