"""The Python API in the style of llama-cpp-python, and the scheduler behind it and the server.

    from selar_local.api import Selar
    llm = Selar("smollm2-135m-instruct", n_parallel=4)
    out = llm.create_chat_completion([{"role": "user", "content": "What is 17 * 23?"}],
                                     method="selar", tau=0.5, max_tokens=256)
    print(out["choices"][0]["message"]["content"], out["selar"]["soft_steps"])
    for chunk in llm.create_chat_completion(messages, stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")

Responses are OpenAI-shaped dicts (`chat.completion`, `chat.completion.chunk`,
`text_completion`) plus a `selar` field: method, soft steps, soft share, mean entropy.

`Scheduler` owns one `BatchGenerator` and drives it from ONE background thread: callers
in any thread submit requests (validated and tokenised in the caller's thread, so a bad
request fails alone and at once), up to `n_parallel` run as parallel sequences of one
llama.cpp context, up to `queue_size` more wait, and the rest get `QueueFullError`.
Events reach each request through its own sink; cancelling a request frees its slot and
KV cells before the next decode step.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from selar_local.errors import ContextOverflowError, InvalidParameterError, SelarError, UnsupportedModelError
from selar_local.generate import BatchGenerator, GenerationResult, StepEvent
from selar_local.params import DecodeParams

logger = logging.getLogger(__name__)

# DecodeParams fields a request may set by their own name (SeLaR's and the sampler's).
DECODE_FIELDS = tuple(f.name for f in dataclasses.fields(DecodeParams))
# OpenAI fields that are accepted but only in their neutral form (anything else is an error,
# so that a client never silently gets something other than what it asked for).
_NEUTRAL_FIELDS: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": lambda v: v in (None, 0, 0.0),
    "presence_penalty": lambda v: v in (None, 0, 0.0),
    "logit_bias": lambda v: not v,
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: True,
    "response_format": lambda v: v is None or (isinstance(v, Mapping) and v.get("type") == "text"),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
    "user": lambda v: True,
    "metadata": lambda v: True,
    "store": lambda v: v in (None, False),
    "service_tier": lambda v: True,
    "modalities": lambda v: v in (None, ["text"]),
}
_COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
                  "top_p", "stop", "seed", "n"}
CHAT_FIELDS = frozenset(_COMMON_FIELDS | {"messages"} | set(_NEUTRAL_FIELDS) | set(DECODE_FIELDS))
COMPLETION_FIELDS = frozenset(_COMMON_FIELDS | {"prompt", "echo"} | set(_NEUTRAL_FIELDS) | set(DECODE_FIELDS))
_ROLES = ("system", "developer", "user", "assistant", "tool")


# ----------------------------------------------------------------------------- errors


class RequestError(InvalidParameterError):
    """A request the server answers with 4xx: says which parameter and why."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status


class QueueFullError(SelarError):
    """Every slot is busy and the wait queue is full (the server answers 503)."""


class RequestCancelledError(SelarError):
    """Delivered to a request that was cancelled (its client went away)."""


class SchedulerClosedError(SelarError):
    """The scheduler was closed (the server is shutting down)."""


_PARAM_IN_MESSAGE = re.compile(r"^invalid (\w+)=")


def as_request_error(exc: Exception) -> RequestError:
    """Map the runtime's user errors to a RequestError carrying param and code."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return RequestError(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, UnsupportedModelError):
        return RequestError(str(exc), param="method", code="unsupported_method")
    match = _PARAM_IN_MESSAGE.match(str(exc))
    return RequestError(str(exc), param=match.group(1) if match else None, code="invalid_value")


# -------------------------------------------------------------------------- scheduler


@dataclass
class SchedulerStats:
    slots_total: int
    slots_busy: int
    queued: int
    queue_size: int
    submitted: int
    completed: int
    cancelled: int
    failed: int
    rejected: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RequestHandle:
    """One submitted request. Items go to `sink(kind, payload)`: ("event", StepEvent) per
    generated token, then exactly one of ("done", GenerationResult) or ("error", exception).
    Without a sink they go to a thread-safe queue that iteration reads."""

    def __init__(self, scheduler: "Scheduler", prompt_tokens: list[int], params: DecodeParams,
                 sink: Callable[[str, Any], None] | None):
        self.scheduler = scheduler
        self.prompt_tokens = prompt_tokens
        self.params = params
        self._queue: queue.Queue | None = None if sink is not None else queue.Queue()
        self._sink = sink or (lambda kind, payload: self._queue.put((kind, payload)))
        self.request_id: int | None = None  # the BatchGenerator's id, once admitted
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.cancelled = False

    def _deliver(self, kind: str, payload: Any) -> None:
        # Sinks must not block: the scheduler calls them, final ones under its lock.
        if kind != "event" and self.finished.is_set():
            return  # a request ends once
        if kind == "done":
            self.result = payload
        elif kind == "error":
            self.error = payload
        if kind != "event":
            self.finished.set()
            self.scheduler._ended()
        try:
            self._sink(kind, payload)
        except Exception:  # a sink that fails (closed event loop) must not stop the worker
            pass

    def cancel(self) -> None:
        """Stop generating: frees the slot and KV cells before the next decode step."""
        self.scheduler.cancel(self)

    def events(self, timeout: float | None = None) -> Iterator[StepEvent]:
        """Yield this request's events (queue mode); raise its error; cancel if abandoned."""
        if self._queue is None:
            raise RuntimeError("this request delivers to a sink, not to a queue")
        done = False
        try:
            while True:
                kind, payload = self._queue.get(timeout=timeout)
                if kind == "event":
                    yield payload
                elif kind == "error":
                    done = True
                    raise payload
                else:
                    done = True
                    return
        finally:
            if not done:
                self.cancel()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request ends; its result, or its error raised here."""
        for _ in self.events(timeout):
            pass
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class Scheduler:
    """Continuous batching over one BatchGenerator, driven by one background thread."""

    def __init__(self, runtime, *, queue_size: int = 32, idle_wait: float = 1.0):
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self.runtime = runtime
        self.queue_size = queue_size
        self._generator = BatchGenerator(runtime)
        self._lock = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._starting: list[RequestHandle] = []  # taken off the queue, prefilling
        self._running: dict[int, RequestHandle] = {}
        self._to_cancel: list[RequestHandle] = []
        self._closed = False
        self._active = 0  # submitted and not yet ended: waiting, being admitted, or running
        self._counts = dict(submitted=0, completed=0, cancelled=0, failed=0, rejected=0)
        self._idle_wait = idle_wait
        self._thread = threading.Thread(target=self._run, name="selar-scheduler", daemon=True)
        self._thread.start()

    # -- callers' side (any thread) -------------------------------------------------------
    @property
    def slots_total(self) -> int:
        return self.runtime.n_parallel

    def submit(self, prompt_tokens: Sequence[int], params: DecodeParams, *,
               sink: Callable[[str, Any], None] | None = None) -> RequestHandle:
        """Queue a request. Raises at once (in the caller's thread) for a prompt over the
        context, a method the model cannot run, or a full queue; never blocks."""
        prompt_tokens = list(prompt_tokens)
        self.runtime.check_prompt_fits(len(prompt_tokens))
        self.runtime.require_method(params.method)
        handle = RequestHandle(self, prompt_tokens, params, sink)
        with self._lock:
            if self._closed:
                raise SchedulerClosedError("the scheduler is closed")
            if self._active >= self.slots_total + self.queue_size:
                self._counts["rejected"] += 1
                raise QueueFullError(
                    f"server busy: all {self.slots_total} slots are generating and {len(self._waiting)} "
                    f"requests are waiting (queue size {self.queue_size}); retry later, or start the "
                    f"server with a larger --parallel or --queue-size"
                )
            self._counts["submitted"] += 1
            self._active += 1
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle.finished.is_set() or handle.cancelled:
                return
            handle.cancelled = True
            if handle in self._waiting:
                self._waiting.remove(handle)
                self._counts["cancelled"] += 1
                handle._deliver("error", RequestCancelledError("request cancelled"))
            else:
                self._to_cancel.append(handle)
                self._lock.notify_all()

    def _ended(self) -> None:
        with self._lock:
            self._active -= 1

    def stats(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(self.slots_total, len(self._running) + len(self._starting), len(self._waiting),
                                  self.queue_size,
                                  **self._counts)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still waiting or running get SchedulerClosedError."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._to_cancel and not self._running and not self._waiting:
                    self._lock.wait(self._idle_wait)
                if self._closed:
                    break
                cancels, self._to_cancel = self._to_cancel, []
            try:
                self._iterate(cancels)
            except BaseException as exc:  # a bug must not leave every client hanging
                logger.exception("scheduler step failed; failing the running requests")
                for handle in list(self._running.values()) + list(self._starting):
                    self._drop(handle, "failed", exc)
        closing = SchedulerClosedError("the server is shutting down")
        for handle in list(self._running.values()):
            self._drop(handle, "failed", closing)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            for handle in waiting:
                handle._deliver("error", closing)

    def _iterate(self, cancels: list[RequestHandle]) -> None:
        """One round: apply cancellations, admit waiting requests, one decode step."""
        gen = self._generator
        for handle in cancels:
            self._drop(handle, "cancelled", RequestCancelledError("request cancelled"))
        with self._lock:  # only this thread changes the generator's slots
            admit = [self._waiting.popleft() for _ in range(min(gen.free_slots, len(self._waiting)))]
            self._starting.extend(admit)
        for handle in admit:
            self._admit(handle)
        if self._running:
            try:
                events = gen.step()
            except Exception as exc:  # one failed decode: fail the sequences in it, not the server
                for handle in list(self._running.values()):
                    self._drop(handle, "failed", exc)
                return
            for event in events:
                self._dispatch(event)

    def _admit(self, handle: RequestHandle) -> None:
        try:
            request_id, first = self._generator.submit(handle.prompt_tokens, handle.params)
        except BaseException as exc:  # this request only (the generator freed its slot)
            with self._lock:
                self._starting.remove(handle)
                self._counts["failed"] += 1
                handle._deliver("error", exc)
            return
        handle.request_id = request_id
        with self._lock:
            self._starting.remove(handle)
            self._running[request_id] = handle
        if first is not None:
            self._dispatch(first)

    def _dispatch(self, event: StepEvent) -> None:
        handle = self._running.get(event.request_id)
        if handle is None:
            return
        handle._deliver("event", event)
        if event.finish_reason:
            result = self._generator.pop_result(event.request_id)
            with self._lock:  # ended and counted in one step: stats and admission agree
                self._running.pop(event.request_id, None)
                self._counts["completed"] += 1
                handle._deliver("done", result)

    def _drop(self, handle: RequestHandle, counter: str, error: BaseException) -> None:
        if handle.finished.is_set():  # it ended on its own before the cancellation arrived
            return
        if handle.request_id is not None:
            self._generator.cancel(handle.request_id)
        with self._lock:
            self._running.pop(handle.request_id, None)
            if handle in self._starting:
                self._starting.remove(handle)
            self._counts[counter] += 1
            handle._deliver("error", error)


# --------------------------------------------------------------------- request building


@dataclass
class PreparedRequest:
    """A validated request: its tokens, decoding parameters and how to answer it."""

    kind: str  # "chat" or "completion"
    prompt_tokens: list[int]
    params: DecodeParams
    stream: bool = False
    include_usage: bool = False
    echo_text: str | None = None
    model: str = ""
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones can be honoured
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RequestError(f"messages[{index}].content: only text parts are supported, not {kind!r}",
                                   param=f"messages[{index}].content")
        return "".join(texts)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts",
                       param=f"messages[{index}].content")


def normalise_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, not {role!r}",
                               param=f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content_text(message.get("content"), i)})
    return out


class RequestBuilder:
    """Turns OpenAI request bodies (or API keyword arguments) into PreparedRequests."""

    def __init__(self, runtime, *, model_id: str, default_stop: Sequence[str] = (), aliases: Sequence[str] = ()):
        self.runtime = runtime
        self.model_id = model_id
        self.default_stop = tuple(default_stop)
        self.aliases = frozenset({model_id, *aliases})

    def check_model(self, model: Any) -> None:
        if model is None or model == "":
            return
        if model not in self.aliases:
            raise RequestError(f"model {model!r} is not served here; this server serves {self.model_id!r}",
                               param="model", code="model_not_found", status=404)

    def chat(self, body: Mapping[str, Any]) -> PreparedRequest:
        self._check_fields(body, CHAT_FIELDS)
        self.check_model(body.get("model"))
        messages = normalise_messages(body.get("messages"))
        try:
            tokens = self.runtime.encode(messages=messages)
        except SelarError as exc:
            raise RequestError(f"cannot format these messages with the model's chat template: {exc}",
                               param="messages") from exc
        return self._prepared("chat", body, tokens)

    def completion(self, body: Mapping[str, Any]) -> PreparedRequest:
        self._check_fields(body, COMPLETION_FIELDS)
        self.check_model(body.get("model"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("'prompt' is empty", param="prompt")
            tokens, text = self.runtime.encode(prompt), prompt
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            n_vocab = self.runtime.model.n_vocab
            if any(not 0 <= t < n_vocab for t in prompt):
                raise RequestError(f"'prompt' token ids must be in [0, {n_vocab})", param="prompt")
            tokens, text = list(prompt), None
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise RequestError("one prompt per request: batches of prompts are not supported "
                               "(send them as separate, concurrent requests)", param="prompt")
        else:
            raise RequestError("'prompt' must be a non-empty string or a list of token ids", param="prompt")
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise RequestError("'echo' must be true or false", param="echo")
        prepared = self._prepared("completion", body, tokens)
        if echo:
            prepared.echo_text = text if text is not None else self.runtime.model.detokenize(tokens)
        return prepared

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _check_fields(body: Mapping[str, Any], allowed: frozenset) -> None:
        if not isinstance(body, Mapping):
            raise RequestError("the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise RequestError(f"unrecognized request argument(s): {', '.join(unknown)} (SeLaR parameters: "
                               f"{', '.join(DECODE_FIELDS)})", param=unknown[0], code="unknown_parameter")
        for name, neutral in _NEUTRAL_FIELDS.items():
            if name in body and not neutral(body[name]):
                raise RequestError(f"{name}={body[name]!r} is not supported by selar-local "
                                   f"(only its neutral value is accepted)", param=name, code="unsupported_parameter")

    def _prepared(self, kind: str, body: Mapping[str, Any], tokens: list[int]) -> PreparedRequest:
        n = body.get("n", 1)
        if n not in (None, 1) or isinstance(n, bool):
            raise RequestError(f"n={n!r}: one choice per request is supported (send n separate requests, "
                               "each with its own seed)", param="n", code="unsupported_parameter")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
            raise RequestError("'stream_options' supports only include_usage", param="stream_options")
        try:
            self.runtime.check_prompt_fits(len(tokens))
        except ContextOverflowError as exc:
            raise RequestError(str(exc), param="messages" if kind == "chat" else "prompt",
                               code="context_length_exceeded") from exc
        params = self._decode_params(body, len(tokens))
        try:
            self.runtime.require_method(params.method)
        except UnsupportedModelError as exc:
            raise as_request_error(exc) from exc
        return PreparedRequest(kind, tokens, params, stream=stream, include_usage=bool(options.get("include_usage")),
                               model=self.model_id,
                               id=("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24])

    def _decode_params(self, body: Mapping[str, Any], n_prompt: int) -> DecodeParams:
        values: dict[str, Any] = {k: body[k] for k in DECODE_FIELDS if body.get(k) is not None}
        for flag in ("greedy", "thinking_only"):
            if flag in values and not isinstance(values[flag], bool):
                raise RequestError(f"invalid {flag}={values[flag]!r}: expected true or false", param=flag)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        room = self.runtime.context.n_ctx - n_prompt
        if max_tokens is None:
            max_tokens = room  # OpenAI: up to the end of the context
        elif not _is_int(max_tokens) or max_tokens < 1:
            raise RequestError(f"invalid max_tokens={max_tokens!r}: expected an integer >= 1", param="max_tokens")
        values["max_tokens"] = max(1, min(max_tokens, room))
        temperature = body.get("temperature")
        if temperature is not None:
            if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
                raise RequestError(f"invalid temperature={temperature!r}: expected a number in [0, 2] "
                                   "(0 = greedy)", param="temperature")
            if temperature == 0:
                values["greedy"] = True
                values.pop("temperature", None)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise RequestError("'stop' must be a string or a list of strings", param="stop")
        values["stop"] = tuple(dict.fromkeys([s for s in stop if s] + list(self.default_stop)))
        try:
            return DecodeParams(**values)
        except (InvalidParameterError, TypeError) as exc:
            raise as_request_error(exc) from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------- response shapes


def selar_summary(params: DecodeParams, result: GenerationResult) -> dict[str, Any]:
    counts = result.effective_counts
    summary = {
        "method": params.method,
        "soft_steps": result.soft_steps,
        "soft_share": round(result.soft_share, 6),
        "mean_entropy": round(result.mean_entropy, 6),
        "mean_effective_tokens": round(sum(counts) / len(counts), 6) if counts else None,
        "prefill_seconds": round(result.prefill_seconds, 6),
        "decode_seconds": round(result.decode_seconds, 6),
        "tokens_per_second": round(result.tokens_per_second, 3),
    }
    if params.method == "selar":
        summary.update(tau=params.tau, lam=params.lam, ks=params.ks)
    return summary


def usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion_response(req: PreparedRequest, result: GenerationResult) -> dict[str, Any]:
    """The non-streaming body: chat.completion or text_completion."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "logprobs": None, "finish_reason": result.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": (req.echo_text or "") + result.text, "logprobs": None,
                  "finish_reason": result.finish_reason}
        obj = "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": [choice],
            "usage": usage(result), "selar": selar_summary(req.params, result)}


class ChunkWriter:
    """Builds the streamed chunks of one request, in order."""

    def __init__(self, req: PreparedRequest):
        self.req = req
        self.object = "chat.completion.chunk" if req.kind == "chat" else "text_completion"

    def _chunk(self, choice: dict | None, **extra: Any) -> dict[str, Any]:
        out = {"id": self.req.id, "object": self.object, "created": self.req.created, "model": self.req.model,
               "choices": [choice] if choice is not None else []}
        out.update(extra)
        return out

    def _choice(self, text: str | None, finish_reason: str | None, *, role: bool = False) -> dict:
        if self.req.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[dict]:
        if self.req.kind == "chat":
            return [self._chunk(self._choice("", None, role=True))]
        return [self._chunk(self._choice(self.req.echo_text, None))] if self.req.echo_text else []

    def event(self, event: StepEvent) -> dict | None:
        """A content chunk for one step (None when the step released no text yet)."""
        if not event.text:
            return None
        return self._chunk(self._choice(event.text, None),
                           selar={"soft": event.soft, "entropy": round(event.entropy, 6) + 0.0})

    def closing(self, result: GenerationResult) -> list[dict]:
        last = self._chunk(self._choice(None if self.req.kind == "chat" else "", result.finish_reason),
                           selar=selar_summary(self.req.params, result))
        chunks = [last]
        if self.req.include_usage:
            chunks.append(self._chunk(None, usage=usage(result)))
        return chunks


# ------------------------------------------------------------------------ the object


class CompletionStream:
    """Iterator over the chunks of one streamed request. Closing it (or dropping it,
    or leaving its `with` block) before the end cancels the request, even one that is
    still waiting in the queue."""

    def __init__(self, req: PreparedRequest, handle: RequestHandle):
        self.request = req
        self.handle = handle
        self._chunks = self._generate()

    def _generate(self) -> Iterator[dict[str, Any]]:
        writer = ChunkWriter(self.request)
        yield from writer.opening()
        for event in self.handle.events():
            chunk = writer.event(event)
            if chunk is not None:
                yield chunk
        if self.handle.error is not None:
            raise self.handle.error
        yield from writer.closing(self.handle.result)

    def __iter__(self) -> "CompletionStream":
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self.handle.cancel()  # no-op once the request has ended

    def __enter__(self) -> "CompletionStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def model_identity(model_path: Path) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(id, aliases, stop strings) of a model file: the registry name where it has one."""
    from selar_local.registry import entry_for_path

    path = Path(model_path)
    entry = entry_for_path(path)
    aliases = {path.name, path.stem, str(path)}
    if entry is not None:
        aliases.add(entry.name)
        return entry.name, tuple(sorted(aliases)), tuple(entry.stop_strings)
    return path.stem, tuple(sorted(aliases)), ()


class Selar:
    """A loaded model serving OpenAI-shaped completions, thread-safe, with batching.

    `Selar(model)` loads a registry name or a GGUF path (None: the default model);
    `Selar(runtime=rt)` wraps a loaded Runtime. Several threads may call it at once: up
    to `n_parallel` requests decode together, `queue_size` more wait, the rest raise
    QueueFullError.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, n_ctx: int = 4096, n_parallel: int = 1,
                 n_threads: int | None = None, n_gpu_layers: int = -1, n_batch: int = 512,
                 queue_size: int = 32, verbose: bool = False, runtime=None, model_id: str | None = None):
        if runtime is None:
            from selar_local.runtime import load

            runtime = load(model, n_ctx=n_ctx, n_batch=n_batch, n_parallel=n_parallel, n_threads=n_threads,
                           n_gpu_layers=n_gpu_layers, verbose=verbose)
            self._owns_runtime = True
        else:
            self._owns_runtime = False
        self.runtime = runtime
        name, aliases, stops = model_identity(runtime.model_path)
        self.model_id = model_id or name
        self.builder = RequestBuilder(runtime, model_id=self.model_id, default_stop=stops,
                                      aliases=aliases + ((name,) if model_id else ()))
        self.scheduler = Scheduler(runtime, queue_size=queue_size)
        self.created = int(time.time())

    # -- OpenAI-style calls ---------------------------------------------------------------
    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
                               **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Chat with the model's template. Keyword arguments: OpenAI's (max_tokens,
        temperature, top_p, stop, seed, n=1, stream_options) and every DecodeParams field
        (method, tau, lam, ks, thinking_only, top_k, min_p, greedy, ...)."""
        body = {k: v for k, v in kwargs.items() if v is not None}
        body.update(messages=list(messages), stream=stream)
        return self._run(self.builder.chat(body))

    def create_completion(self, prompt: str | Sequence[int], *, stream: bool = False,
                          **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Raw-prompt completion (no chat template); same keyword arguments, plus echo."""
        body = {k: v for k, v in kwargs.items() if v is not None}
        body.update(prompt=prompt if isinstance(prompt, str) else list(prompt), stream=stream)
        return self._run(self.builder.completion(body))

    __call__ = create_completion

    def _run(self, req: PreparedRequest):
        handle = self.scheduler.submit(req.prompt_tokens, req.params)
        if req.stream:
            return self._stream(req, handle)
        return completion_response(req, handle.wait())

    @staticmethod
    def _stream(req: PreparedRequest, handle: RequestHandle) -> "CompletionStream":
        return CompletionStream(req, handle)

    # -- information ----------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        model = self.runtime.model
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "selar-local",
            "meta": {"architecture": model.architecture, "n_vocab": model.n_vocab, "n_ctx": self.runtime.context.n_ctx,
                     "n_ctx_train": model.n_ctx_train, "n_parallel": self.runtime.n_parallel,
                     "soft_decoding": self.runtime.self_check.passed, "path": str(self.runtime.model_path)},
        }]}

    def close(self) -> None:
        self.scheduler.close()
        if self._owns_runtime:
            self.runtime.close()

    def __enter__(self) -> "Selar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
