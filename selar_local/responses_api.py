"""`POST /v1/responses`: OpenAI's Responses API (what its newer clients and agent SDKs use).

`input` is a string or a list of messages (content as a string or input_text /
output_text parts), `instructions` becomes the system message, `max_output_tokens` the
length, `reasoning: {"effort": "none"}` turns the template's thinking off; the thinking
span comes back as a `reasoning` output item (its text in `content`), the answer as a
`message` item. Streaming sends the typed events (response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta,
..., response.completed), each as `event: TYPE` + `data: JSON`. The SeLaR fields (method,
tau, lam, ks, ...) are extra body fields, as in chat completions. Stateless: no `store`,
no `previous_response_id`, no tools. A search method (`"method": "latentseek"`, `textmas`)
runs as in chat completions (selar_local/search_api.py): its final answer is the output, and
streamed, its events all come after the search; `selar` holds the search's course.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, AsyncIterator, Iterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from selar_local.http_stream import CancellingStream, cancel_all, compact_json, until_disconnect
from selar_local.model_pool import ModelPool
from selar_local.openai_schema import DECODE_FIELDS, RequestError, selar_summary
from selar_local.search_api import run_search, wants_search

_NEUTRAL = {"store": (None, False), "previous_response_id": (None,), "tools": (None, []),
            "tool_choice": (None, "auto", "none"), "parallel_tool_calls": None, "truncation": (None, "disabled"),
            "background": (None, False), "include": (None, []), "metadata": None, "user": None,
            "service_tier": None, "text": (None, {"format": {"type": "text"}})}
_FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "reasoning",
           "seed", "stream_options", *DECODE_FIELDS, *_NEUTRAL}


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body of a Responses request (validated field by field)."""
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise RequestError(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0],
                           code="unknown_parameter")
    for name, neutral in _NEUTRAL.items():
        if neutral is not None and name in body and body[name] not in neutral:
            raise RequestError(f"{name}={body[name]!r} is not supported by selar-local (stateless, no tools)",
                               param=name, code="unsupported_parameter")
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RequestError("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    messages += _input_messages(body.get("input"))
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": body.get("stream", False)}
    for name in ("temperature", "top_p", "seed", *DECODE_FIELDS):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise RequestError("'reasoning' must be an object", param="reasoning")
        effort = reasoning.get("effort")
        if effort not in (None, "none", "minimal", "low", "medium", "high"):
            raise RequestError(f"invalid reasoning.effort={effort!r}", param="reasoning")
        if effort == "none":
            out["chat_template_kwargs"] = {"enable_thinking": False}
    return out


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        if not value:
            raise RequestError("'input' is empty", param="input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RequestError("'input' must be a string or a non-empty list of messages", param="input")
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise RequestError(f"input[{index}] must be an object", param="input")
        kind = item.get("type", "message")
        if kind == "reasoning":
            continue  # the model's earlier reasoning: chat templates drop it
        if kind != "message":
            raise RequestError(f"input[{index}] of type {kind!r} is not supported (messages only)", param="input")
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                    raise RequestError(f"input[{index}]: only text content parts are supported", param="input")
                texts.append(part.get("text", ""))
            content = "".join(texts)
        messages.append({"role": item.get("role"), "content": content})
    return messages


@dataclass(frozen=True)
class _SearchOutput:
    """A finished search, with the fields the writer reads from a GenerationResult."""
    content: str
    reasoning: str
    prompt_tokens: int
    completion_tokens: int
    think_tokens: int
    finish_reason: str
    cached_tokens: int = 0

    @classmethod
    def of(cls, found, prompt_tokens: int) -> "_SearchOutput":
        return cls(found.content, found.reasoning, prompt_tokens, len(found.tokens), found.think_tokens,
                   found.finish_reason)


class _ResponseWriter:
    """The response object and its stream events, for one request."""

    def __init__(self, body: dict[str, Any], req, model: str):
        self.req, self.model = req, model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id, self.reasoning_id = f"msg_{uuid.uuid4().hex}", f"rs_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.body = body
        self.sequence = 0
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.open_items: list[str] = []  # "reasoning" / "message", in output order

    def response(self, status: str, result=None, selar: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object; with a result, its output, usage and `selar` field (`selar`
        given: a search's course, else the decode's summary, as the chat endpoint's)."""
        out: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": [], "error": None, "incomplete_details": None, "instructions": self.body.get("instructions"),
            "max_output_tokens": self.body.get("max_output_tokens"), "parallel_tool_calls": False,
            "tool_choice": "auto", "tools": [], "temperature": self.req.params.temperature,
            "top_p": self.req.params.top_p, "text": {"format": {"type": "text"}},
            "reasoning": self.body.get("reasoning"), "usage": None}
        if result is not None:
            if result.reasoning:
                out["output"].append(self._reasoning_item(result.reasoning, "completed"))
            out["output"].append(self._message_item(result.content, "completed"))
            out["usage"] = {"input_tokens": result.prompt_tokens,
                            "input_tokens_details": {"cached_tokens": result.cached_tokens},
                            "output_tokens": result.completion_tokens,
                            "output_tokens_details": {"reasoning_tokens": result.think_tokens},
                            "total_tokens": result.prompt_tokens + result.completion_tokens}
            if selar is None:
                selar = selar_summary(self.req.params, result)
            out["selar"] = {**selar, "finish_reason": result.finish_reason}
            if result.finish_reason == "length":
                out["status"] = "incomplete"
                out["incomplete_details"] = {"reason": "max_output_tokens"}
        return out

    def _message_item(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" \
            else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def _reasoning_item(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "content": content, "status": status}

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def opening(self) -> list[dict]:
        return [self.event("response.created", response=self.response("in_progress")),
                self.event("response.in_progress", response=self.response("in_progress"))]

    def _open(self, item: str) -> list[dict]:
        """Start an output item (the reasoning one before the message) if not started."""
        if item in self.open_items:
            return []
        out = self._close("reasoning") if item == "message" and "reasoning" in self.open_items else []
        self.open_items.append(item)
        index = len(self.open_items) - 1
        if item == "message":
            return out + [
                self.event("response.output_item.added", output_index=index, item=self._message_item("", "in_progress")),
                self.event("response.content_part.added", item_id=self.message_id, output_index=index,
                           content_index=0, part={"type": "output_text", "text": "", "annotations": []})]
        return out + [self.event("response.output_item.added", output_index=index,
                                 item=self._reasoning_item("", "in_progress"))]

    def _close(self, item: str) -> list[dict]:
        index = self.open_items.index(item)
        if item == "reasoning":
            text = "".join(self.thinking)
            return [self.event("response.reasoning_text.done", item_id=self.reasoning_id, output_index=index,
                               content_index=0, text=text),
                    self.event("response.output_item.done", output_index=index,
                               item=self._reasoning_item(text, "completed"))]
        text = "".join(self.text)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return [self.event("response.output_text.done", item_id=self.message_id, output_index=index,
                           content_index=0, text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=self.message_id, output_index=index,
                           content_index=0, part=part),
                self.event("response.output_item.done", output_index=index, item=self._message_item(text, "completed"))]

    def step(self, event) -> list[dict]:
        out = []
        if event.reasoning:
            out += self._open("reasoning")
            self.thinking.append(event.reasoning)
            out.append(self.event("response.reasoning_text.delta", item_id=self.reasoning_id,
                                  output_index=self.open_items.index("reasoning"), content_index=0,
                                  delta=event.reasoning))
        if event.content:
            out += self._open("message")
            self.text.append(event.content)
            out.append(self.event("response.output_text.delta", item_id=self.message_id,
                                  output_index=self.open_items.index("message"), content_index=0,
                                  delta=event.content, logprobs=[]))
        return out

    def search_events(self, result: _SearchOutput, selar: dict[str, Any]) -> Iterator[dict]:
        """A finished search's whole stream: its answer as one delta of each item."""
        yield from self.opening()
        yield from self.step(SimpleNamespace(reasoning=result.reasoning, content=result.content))
        yield from self.closing(result, selar)

    def closing(self, result, selar: dict[str, Any] | None = None) -> list[dict]:
        out = self._open("message")  # an empty answer still has its message item
        out += self._close("reasoning") if "reasoning" in self.open_items and self.open_items[-1] == "reasoning" \
            else []
        out += self._close("message")
        final = self.response("completed", result, selar)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return out + [self.event(kind, response=final)]


def _typed_event(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: ".encode() + compact_json(event) + b"\n\n"


async def create_response(request: Request, pool: ModelPool) -> Response:
    from selar_local.server import _read_json, _response_for, acquire_model

    lease = None
    try:
        body = await _read_json(request)
        translated = chat_body(body)
        lease = await acquire_model(pool, body)
        llm = lease.selar
        req = await run_in_threadpool(llm.builder.chat, translated)
        writer = _ResponseWriter(body, req, llm.model_id)
        if wants_search(req):
            try:
                found, selar = await run_in_threadpool(run_search, llm, req, translated["messages"])
            finally:  # the search is over (or failed): the model may go
                lease.release()
                lease = None
            result = _SearchOutput.of(found, len(req.prompt_tokens))
            if req.stream:
                return StreamingResponse(map(_typed_event, writer.search_events(result, selar)),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return JSONResponse(writer.response("completed", result, selar))
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        handles = llm.scheduler.submit_group(req.prompt_tokens, req.choices, sinks=[
            lambda k, p: loop.call_soon_threadsafe(inbox.put_nowait, (k, p))])
    except Exception as exc:  # noqa: BLE001 - OpenAI-shaped errors
        if lease is not None:
            lease.release()
        return _response_for(exc)
    if req.stream:
        return CancellingStream(_events(writer, inbox), handles, _typed_event, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache"}, on_close=lease.release)
    watcher = asyncio.ensure_future(until_disconnect(request.receive, handles))
    try:
        while True:
            kind, payload = await inbox.get()
            if kind == "error":
                return _response_for(payload)
            if kind == "done":
                return JSONResponse(writer.response("completed", payload))
    finally:
        watcher.cancel()
        cancel_all(handles)
        lease.release()


async def _events(writer: _ResponseWriter, inbox: asyncio.Queue) -> AsyncIterator[dict]:
    from selar_local.server import _response_for

    for event in writer.opening():
        yield event
    while True:
        kind, payload = await inbox.get()
        if kind == "event":
            for event in writer.step(payload):
                yield event
        elif kind == "error":
            error = json.loads(_response_for(payload).body)["error"]
            yield writer.event("error", code=error["code"], message=error["message"], param=error["param"])
            return
        else:
            for event in writer.closing(payload):
                yield event
            return
