"""Ollama's HTTP API over the server's models (the apps that speak Ollama natively).

    POST /api/chat       chat; NDJSON stream of message deltas, or one body with "stream": false
    POST /api/generate   prompt completion (the chat template unless "raw": true); an empty
                         prompt loads the model (with keep_alive 0: unloads it)
    GET  /api/tags       the models served;  GET /api/ps: the ones loaded
    POST /api/show       one model's details; GET /api/version
    POST /api/pull       fetch a registry model and serve it (only with `selar serve --allow-pull`)

Ollama's `options` map onto DecodeParams (num_predict -> max_tokens; temperature, top_k,
top_p, min_p, seed, stop as they are; num_ctx is checked against the loaded context),
and the SeLaR knobs (method, tau, lam, ks, ...) are accepted in `options` too. `think`
sets the template's enable_thinking, and the thinking span comes back in
`message.thinking` (`thinking` for /api/generate). The timing fields are the decode's own
measurements, in nanoseconds. Errors are Ollama's {"error": "..."} with the HTTP status.
Requests go through the same RequestBuilder and Scheduler as the OpenAI endpoints, so
validation, queueing and cancellation on disconnect are theirs.

A search method (`"method": "latentseek"` or `"textmas"` in `options`) runs on /api/chat as on
/v1/chat/completions (selar_local/search_api.py): streamed, its final answer comes as one line
after the search, then the done line; the done line's `selar` holds the search's course.

`format` is structured output as in the OpenAI endpoints (llama.cpp's grammar sampler):
"json" is any JSON object, an object is a JSON Schema. Not supported: images, tools and
`context`; they are refused by name.
"""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from selar_local.http_stream import CancellingStream, cancel_all, compact_json, until_disconnect
from selar_local.model_pool import Lease, ModelPool, parse_keep_alive
from selar_local.openai_schema import DECODE_FIELDS, RequestError, selar_summary
from selar_local.search_api import run_search, wants_search

# Ollama option -> request field of the OpenAI schema (the rest of DECODE_FIELDS pass as named).
_OPTION_FIELDS = {"num_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                  "min_p": "min_p", "seed": "seed", "stop": "stop"}
_CHAT_KEYS = {"model", "messages", "stream", "options", "think", "keep_alive", "format", "tools"}
_GENERATE_KEYS = {"model", "prompt", "system", "raw", "stream", "options", "think", "keep_alive", "format",
                  "images", "context", "suffix", "template"}
_REFUSED = {"tools": "tool calling is not supported by this server",
            "images": "images are not supported (text models only)",
            "context": "'context' (token ids of an earlier /api/generate) is not supported: send the text again",
            "suffix": "'suffix' (fill-in-the-middle) is not supported",
            "template": "'template' is not supported: the model's own chat template is used"}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_error(exc: BaseException) -> JSONResponse:
    """Ollama's error shape, with the status the OpenAI endpoints would give."""
    from selar_local.server import _response_for

    openai_shaped = _response_for(exc)
    message = json.loads(openai_shaped.body)["error"]["message"]
    headers = {k: v for k, v in openai_shaped.headers.items() if k.lower() in ("retry-after", "www-authenticate")}
    return JSONResponse({"error": message}, status_code=openai_shaped.status_code, headers=headers)


def openai_body(body: dict[str, Any], kind: str, n_ctx_of) -> dict[str, Any]:
    """The OpenAI-schema request body of an Ollama /api/chat or /api/generate body."""
    allowed = _CHAT_KEYS if kind == "chat" else _GENERATE_KEYS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)} for /api/{kind}", param=unknown[0])
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, "", [], {}):
            raise RequestError(why, param=name)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise RequestError("'model' is required", param="model")
    out: dict[str, Any] = {"model": body["model"]}
    if kind == "chat":
        out["messages"] = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string", param="prompt")
        system = body.get("system")
        if system is not None and not isinstance(system, str):
            raise RequestError("'system' must be a string", param="system")
        if body.get("raw", False) is True:
            out["prompt"] = prompt if system is None else system + prompt
        else:
            out["messages"] = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
    think = body.get("think")
    if think is not None:
        if not isinstance(think, bool):
            raise RequestError("'think' must be true or false", param="think")
        if "messages" in out:
            out["chat_template_kwargs"] = {"enable_thinking": think}
    out.update(_format(body.get("format")))
    out.update(_options(body.get("options"), n_ctx_of))
    return out


def _format(fmt: Any) -> dict[str, Any]:
    """Ollama's `format` as the OpenAI schema's constraint fields."""
    if fmt in (None, ""):
        return {}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict):
        return {"json_schema": fmt}
    raise RequestError(f"invalid format={fmt!r}: expected \"json\" or a JSON Schema object", param="format")


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object", param="messages")
        if message.get("images"):
            raise RequestError(_REFUSED["images"], param="messages")
        if message.get("tool_calls"):
            raise RequestError(_REFUSED["tools"], param="messages")
        # an assistant turn's `thinking` is the model's own earlier reasoning: templates drop it
        out.append({"role": message.get("role"), "content": message.get("content")})
    return out


def _options(options: Any, n_ctx_of) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RequestError("'options' must be an object", param="options")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name == "num_ctx":
            n_ctx = n_ctx_of()
            if not isinstance(value, int) or value < 1 or value > n_ctx:
                raise RequestError(f"invalid num_ctx={value!r}: this server's context is {n_ctx} tokens per "
                                   f"sequence (start it with a larger --n-ctx)", param="num_ctx")
        elif name == "num_predict":
            if isinstance(value, int) and value < 0:
                continue  # Ollama's "until the context is full": the server's default length
            out["max_tokens"] = value
        elif name in _OPTION_FIELDS:
            out[_OPTION_FIELDS[name]] = value
        elif name in DECODE_FIELDS:
            out[name] = value
        else:
            raise RequestError(f"option {name!r} is not supported (supported: num_ctx, "
                               f"{', '.join(_OPTION_FIELDS)}, and the SeLaR fields {', '.join(DECODE_FIELDS)})",
                               param=name)
    return out


def _ndjson_line(line: dict) -> bytes:
    return compact_json(line) + b"\n"


class _Exchange:
    """One /api/chat or /api/generate request: its lease, prepared request and timings."""

    def __init__(self, kind: str, body: dict[str, Any], lease: Lease, req, started: float):
        self.kind, self.body, self.lease, self.req, self.started = kind, body, lease, req, started
        self.model = body["model"]

    def line(self, content: str, reasoning: str, *, done: bool = False, result=None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": _now_iso()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning:
                message["thinking"] = reasoning
            out["message"] = message
        else:
            out["response"] = content
            if reasoning:
                out["thinking"] = reasoning
        out["done"] = done
        if done:
            out.update(self.done_fields(result.finish_reason, result.prompt_tokens, result.prefill_seconds,
                                        result.completion_tokens, result.decode_seconds,
                                        selar_summary(self.req.params, result)))
        return out

    def done_fields(self, finish_reason: str, prompt_tokens: int, prefill_seconds: float, completion_tokens: int,
                    decode_seconds: float, selar: dict[str, Any]) -> dict[str, Any]:
        """The done line's fields: the reason, Ollama's timings (nanoseconds, from this request's
        own measurements) and the `selar` field."""
        ns = 1_000_000_000
        return {"done_reason": finish_reason, "total_duration": int((time.monotonic() - self.started) * ns),
                "load_duration": int(self.lease.load_seconds * ns),
                "prompt_eval_count": prompt_tokens, "prompt_eval_duration": int(prefill_seconds * ns),
                "eval_count": completion_tokens, "eval_duration": int(decode_seconds * ns), "selar": selar}

    def piece(self, event) -> tuple[str, str]:
        """(content, reasoning) of one step: the template's answer and thinking, or raw text."""
        if self.req.kind == "chat":
            return event.content, event.reasoning
        return event.text, ""


async def _run(request: Request, pool: ModelPool, kind: str) -> Response:
    from selar_local.server import _read_json, acquire_model

    started = time.monotonic()
    lease = None
    try:
        body = await _read_json(request)
        keep_alive = parse_keep_alive(body.get("keep_alive", "default"))
        if kind == "generate" and body.get("prompt", "") == "" and "messages" not in body:
            return await _load_or_unload(pool, body, keep_alive, started)
        lease = await acquire_model(pool, body, keep_alive=keep_alive)
        llm = lease.selar
        translated = openai_body(body, kind, lambda: llm.runtime.context.n_ctx)
        build = llm.builder.chat if "messages" in translated else llm.builder.completion
        req = await run_in_threadpool(build, translated)
        exchange = _Exchange(kind, body, lease, req, started)
        if wants_search(req):
            if kind != "chat":
                raise RequestError(f"method '{req.params.method}' is a search over a chat: use /api/chat",
                                   param="method")
            try:
                found, selar = await run_in_threadpool(run_search, llm, req, translated["messages"])
            finally:  # the search is over (or failed): the model may go
                lease.release()
                lease = None
            return _search_reply(exchange, found, selar, stream=body.get("stream", True))
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        handles = llm.scheduler.submit_group(req.prompt_tokens, req.choices, sinks=[
            lambda k, p: loop.call_soon_threadsafe(inbox.put_nowait, (k, p))])
    except Exception as exc:  # noqa: BLE001 - every failure becomes an Ollama-shaped error
        if lease is not None:
            lease.release()
        return ollama_error(exc)
    if body.get("stream", True):
        return CancellingStream(_lines(exchange, inbox), handles, _ndjson_line, media_type="application/x-ndjson",
                                on_close=lease.release)
    watcher = asyncio.ensure_future(until_disconnect(request.receive, handles))
    content, reasoning = [], []
    try:
        while True:
            item, payload = await inbox.get()
            if item == "event":
                text, thought = exchange.piece(payload)
                content.append(text)
                reasoning.append(thought)
            elif item == "error":
                return ollama_error(payload)
            else:
                result = payload
                break
        return JSONResponse(exchange.line(result.content if req.kind == "chat" else "".join(content),
                                          result.reasoning if req.kind == "chat" else "", done=True,
                                          result=result))
    finally:
        watcher.cancel()
        cancel_all(handles)
        lease.release()


def _search_reply(exchange: _Exchange, found, selar: dict[str, Any], *, stream: bool) -> Response:
    """A finished search as Ollama's reply: one body, or (streamed) the answer's line, then the
    done line. Its timings sum the answers it decoded; `selar` is the OpenAI response's."""
    done = exchange.done_fields(found.finish_reason, len(exchange.req.prompt_tokens),
                                sum(r.prefill_seconds for r in found.results), len(found.tokens),
                                sum(r.decode_seconds for r in found.results), selar)
    answer = exchange.line(found.content, found.reasoning)  # reasoning: "" without a thinking span
    if not stream:
        return JSONResponse({**answer, "done": True, **done})
    lines = [answer, {**exchange.line("", ""), "done": True, **done}]
    return StreamingResponse(iter([_ndjson_line(line) for line in lines]), media_type="application/x-ndjson")


async def _lines(exchange: _Exchange, inbox: asyncio.Queue) -> AsyncIterator[dict]:
    while True:
        item, payload = await inbox.get()
        if item == "event":
            text, thought = exchange.piece(payload)
            if text or thought:
                yield exchange.line(text, thought)
        elif item == "error":
            yield json.loads(ollama_error(payload).body)
            return
        else:
            yield exchange.line("", "", done=True, result=payload)
            return


async def _load_or_unload(pool: ModelPool, body: dict, keep_alive, started: float) -> Response:
    """/api/generate with no prompt: load the model (keep_alive 0: unload it), as Ollama."""
    model = body.get("model")
    if keep_alive == 0:
        await run_in_threadpool(pool.unload, model)
        reason = "unload"
    else:
        lease = await run_in_threadpool(lambda: pool.acquire(model, keep_alive=keep_alive))
        lease.release()
        reason = "load"
    return JSONResponse({"model": model, "created_at": _now_iso(), "response": "", "done": True,
                         "done_reason": reason, "total_duration": int((time.monotonic() - started) * 1e9)})


def _details(model) -> dict[str, Any]:
    selar = model.selar
    family = selar.runtime.model.architecture if selar is not None else ""
    description = selar.runtime.model.description if selar is not None else ""
    parts = description.split()
    return {"format": "gguf", "family": family, "families": [family] if family else None,
            "parameter_size": parts[1] if len(parts) > 2 else "", "quantization_level": parts[-1] if parts else ""}


def _tag(model, pool: ModelPool) -> dict[str, Any]:
    stat = model.path.stat() if model.path.exists() else None
    modified = datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat() if stat else None
    return {"name": model.id, "model": model.id, "modified_at": modified, "size": stat.st_size if stat else 0,
            "digest": "", "details": _details(model)}


async def _pull(request: Request, pool: ModelPool) -> Response:
    """Fetch a registry model (`selar pull`), then serve it; NDJSON status lines, or one body."""
    from selar_local.api import model_identity
    from selar_local.model_pool import ServedModel
    from selar_local.registry import get_entry, pull
    from selar_local.server import _read_json

    try:
        body = await _read_json(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError("'model' is required", param="model")
        try:
            entry = get_entry(name)
        except Exception as exc:  # noqa: BLE001 - the registry's own message names the models it knows
            raise RequestError(str(exc), param="model", code="model_not_found", status=404) from exc
    except Exception as exc:  # noqa: BLE001
        return ollama_error(exc)

    async def fetch(progress) -> dict[str, Any]:
        path = await run_in_threadpool(lambda: pull(entry, progress=progress))
        model_id, aliases, _ = model_identity(path)
        served = pool.add(ServedModel(model_id, path, frozenset(aliases) | {name}))
        return {"status": "success", "model": served.id, "total": path.stat().st_size}

    if body.get("stream", True) is False:
        try:
            return JSONResponse(await fetch(False))
        except Exception as exc:  # noqa: BLE001
            return ollama_error(exc)

    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    reported = {"at": 0.0, "desc": None}

    def progress(desc: str, completed: int, total: int | None) -> None:
        """Called by the pull's worker thread at every chunk: a line at most every 0.2 s
        per stage, and always its first and its last."""
        now = time.monotonic()
        last = total is not None and completed >= total
        if desc == reported["desc"] and not last and now - reported["at"] < 0.2:
            return
        reported.update(at=now, desc=desc)
        line = {"status": f"pulling {desc}", "completed": completed}
        if total is not None:
            line["total"] = total
        loop.call_soon_threadsafe(updates.put_nowait, line)

    async def lines() -> AsyncIterator[bytes]:
        yield json.dumps({"status": f"pulling {entry.name}"}).encode() + b"\n"
        task = asyncio.ensure_future(fetch(progress))
        try:
            while not task.done() or not updates.empty():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield json.dumps(getter.result()).encode() + b"\n"
                else:
                    getter.cancel()
            yield json.dumps(task.result()).encode() + b"\n"
        except Exception as exc:  # noqa: BLE001 - the headers are sent: the error is the last line
            yield json.dumps({"error": json.loads(ollama_error(exc).body)["error"]}).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def add_ollama_routes(app: FastAPI, pool: ModelPool, *, version: str, allow_pull: bool = False) -> None:
    @app.post("/api/pull")
    async def api_pull(request: Request):
        if not allow_pull:
            return JSONResponse({"error": "pulling models through the server is disabled: start it with "
                                          "`selar serve --allow-pull`, or run `selar pull NAME` on the machine"},
                                status_code=403)
        return await _pull(request, pool)

    @app.post("/api/chat")
    async def chat(request: Request):
        return await _run(request, pool, "chat")

    @app.post("/api/generate")
    async def generate(request: Request):
        return await _run(request, pool, "generate")

    @app.get("/api/tags")
    async def tags():
        return {"models": [_tag(m, pool) for m in pool.models.values()]}

    @app.get("/api/ps")
    async def ps():
        out = []
        for model in pool.loaded():
            entry = _tag(model, pool)
            expires = model.expires_at
            entry["expires_at"] = (datetime.now(timezone.utc).timestamp() + expires - time.monotonic()
                                   if expires is not None else None)
            if entry["expires_at"] is not None:
                entry["expires_at"] = datetime.fromtimestamp(entry["expires_at"], timezone.utc).isoformat()
            entry["size_vram"] = 0
            entry["context_length"] = model.selar.runtime.context.n_ctx
            out.append(entry)
        return {"models": out}

    @app.post("/api/show")
    async def show(request: Request):
        from selar_local.server import _read_json

        try:
            body = await _read_json(request)
            model = pool.resolve(body.get("model") or body.get("name"))
        except Exception as exc:  # noqa: BLE001
            return ollama_error(exc)
        info: dict[str, Any] = {"general.path": str(model.path)}
        capabilities = ["completion"]
        if model.selar is not None:
            runtime = model.selar.runtime
            info.update({"general.architecture": runtime.model.architecture,
                         f"{runtime.model.architecture}.context_length": runtime.model.n_ctx_train,
                         f"{runtime.model.architecture}.embedding_length": runtime.model.n_embd})
            if runtime.thinking_span is not None:
                capabilities.append("thinking")
        return {"modelfile": "", "parameters": "", "template": "", "details": _details(model),
                "model_info": info, "capabilities": capabilities, "modified_at": _tag(model, pool)["modified_at"]}

    @app.get("/api/version")
    async def api_version():
        return {"version": version}
