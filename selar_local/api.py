"""The Python API in the style of llama-cpp-python (the facade the server and CLI sit on).

    from selar_local.api import Selar
    llm = Selar("smollm2-135m-instruct", n_parallel=4)
    out = llm.create_chat_completion([{"role": "user", "content": "What is 17 * 23?"}],
                                     method="selar", tau=0.5, max_tokens=256)
    print(out["choices"][0]["message"]["content"], out["selar"]["soft_steps"])
    for chunk in llm.create_chat_completion(messages, stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")

Responses are OpenAI-shaped dicts (`chat.completion`, `chat.completion.chunk`,
`text_completion`) plus a `selar` field: method, soft steps, soft share, mean entropy.

The scheduler lives in `selar_local/scheduler.py`, the OpenAI schema (request validation,
response and chunk shapes) in `selar_local/openai_schema.py`; this module joins them.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from selar_local.openai_schema import (  # noqa: F401  (re-exported: the API's public names)
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    DECODE_FIELDS,
    ChunkWriter,
    PreparedRequest,
    RequestBuilder,
    RequestError,
    as_request_error,
    completion_response,
    normalise_messages,
    selar_summary,
    usage,
)
from selar_local.search_api import check_search_request, response_chunks, search_response, wants_search
from selar_local.scheduler import (  # noqa: F401
    QueueFullError,
    RequestCancelledError,
    RequestHandle,
    Scheduler,
    SchedulerClosedError,
    SchedulerStats,
    decode_requests,
)

# ------------------------------------------------------------------------ the object

log = logging.getLogger(__name__)


class CompletionStream:
    """Iterator over the chunks of one streamed request (all its choices). Closing it
    (or dropping it, or leaving its `with` block) before the end cancels the request,
    even one that is still waiting in the queue."""

    def __init__(self, req: PreparedRequest, scheduler: Scheduler, model=None):
        self.request = req
        self._inbox: queue.Queue = queue.Queue()
        sinks = [lambda kind, payload, index=index: self._inbox.put((index, kind, payload))
                 for index in range(len(req.choices))]
        self.handles: list[RequestHandle] = scheduler.submit_group(req.prompt_tokens, req.choices, sinks=sinks)
        self._chunks = self._generate(ChunkWriter(req, model))

    def _generate(self, writer: ChunkWriter) -> Iterator[dict[str, Any]]:
        yield from writer.opening()
        while not writer.finished:
            index, kind, payload = self._inbox.get()
            if kind == "error":
                raise payload
            yield from writer.feed(index, kind, payload)

    def __iter__(self) -> "CompletionStream":
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        for handle in self.handles:
            handle.cancel()  # no-op once the request has ended

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
                 queue_size: int = 32, verbose: bool = False, runtime=None, model_id: str | None = None,
                 rpc=None, tensor_split=None, calibration_max_tokens: int = 256, **runtime_options: Any):
        """runtime_options: more Runtime settings (n_threads_batch, prefill_chunk,
        prompt_cache, kv_unified). calibration_max_tokens: the length of each calibration
        decode when a request asks for tau "auto" on a sampler not calibrated yet (as
        `selar calibrate --max-tokens`)."""
        if runtime is None:
            from selar_local.runtime import load

            runtime = load(model, n_ctx=n_ctx, n_batch=n_batch, n_parallel=n_parallel, n_threads=n_threads,
                           n_gpu_layers=n_gpu_layers, verbose=verbose, rpc=rpc, tensor_split=tensor_split,
                           **runtime_options)
            self._owns_runtime = True
        else:
            self._owns_runtime = False
        self.runtime = runtime
        name, aliases, stops = model_identity(runtime.model_path)
        self.model_id = model_id or name
        self.builder = RequestBuilder(runtime, model_id=self.model_id, default_stop=stops,
                                      aliases=aliases + ((name,) if model_id else ()), auto_tau=self._auto_tau)
        self.scheduler = Scheduler(runtime, queue_size=queue_size)
        self.calibration_max_tokens = calibration_max_tokens
        self._calibrating = threading.Lock()  # one calibration at a time
        self.calibration: dict | None = None  # the running calibration's progress (for /health)
        self.created = int(time.time())

    # -- OpenAI-style calls ---------------------------------------------------------------
    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
                               **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Chat with the model's template. Keyword arguments: OpenAI's (max_tokens,
        temperature, top_p, stop, seed, n, logprobs, top_logprobs, stream_options) and every DecodeParams field
        (method, tau, lam, ks, thinking_only, max_think_tokens, top_k, min_p, greedy, ...);
        chat_template_kwargs passes variables to the template (e.g. enable_thinking=False).
        response_format ({"type": "json_object"} or {"type": "json_schema", ...}), grammar (GBNF)
        or json_schema constrain the answer (after any thinking span).
        Thinking models return their reasoning in message.reasoning_content."""
        body = {k: v for k, v in kwargs.items() if v is not None}
        body.update(messages=list(messages), stream=stream)
        req = self.builder.chat(body)
        if wants_search(req):  # e.g. method="latentseek": selar_local/search_api.py
            response = search_response(self, req, body["messages"])
            return iter(response_chunks(response, req.include_usage)) if req.stream else response
        return self._run(req)

    def create_completion(self, prompt: str | Sequence[int], *, stream: bool = False,
                          **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Raw-prompt completion (no chat template); same keyword arguments, plus echo."""
        body = {k: v for k, v in kwargs.items() if v is not None}
        body.update(prompt=prompt if isinstance(prompt, str) else list(prompt), stream=stream)
        return self._run(self.builder.completion(body))

    __call__ = create_completion

    def _run(self, req: PreparedRequest):
        if wants_search(req):
            check_search_request(req, None)  # a search answers a chat only: raises
        if req.stream:
            return CompletionStream(req, self.scheduler, self.runtime.model)
        handles = self.scheduler.submit_group(req.prompt_tokens, req.choices)
        try:
            results = [handle.wait() for handle in handles]
        finally:
            for handle in handles:
                handle.cancel()  # no-op once ended; frees the slots if one choice failed
        return completion_response(req, results, self.runtime.model)

    # -- tau "auto" -----------------------------------------------------------------------
    def _auto_tau(self, params) -> float:
        """The model's calibrated tau for the request's sampler: cached, or calibrated now by
        decoding the calibration prompts as ordinary requests beside the others (the
        scheduler owns the context). Requests asking meanwhile wait and then read the cache;
        a calibrated sampler never waits for another one's calibration."""
        from selar_local.calibrate import auto_tau, cached_tau

        cached = cached_tau(self.runtime.model_path, params)
        if cached is not None:
            return cached.tau
        with self._calibrating:  # auto_tau looks again: the request ahead may have just stored it
            try:
                calibration = auto_tau(self.runtime, params, decode=self._decode_as_requests,
                                       max_tokens=self.calibration_max_tokens, progress=self._calibration_progress)
            except BaseException:
                if self.calibration is not None:
                    log.warning("calibration of tau failed after %s", self.calibration)
                raise
            else:
                if self.calibration is not None:
                    log.info("calibration of tau done: tau %.2f, soft share %.1f%%", calibration.tau,
                             100 * calibration.soft_share)
            finally:
                self.calibration = None
            return calibration.tau

    def _calibration_progress(self, state) -> None:
        """The server's log and /health say a calibration is running and how far it is."""
        if state.prompts_done == 0:
            log.info("calibrating tau for %s: %d prompts (requests asking for tau auto wait)",
                     self.model_id, state.prompts_total)
        else:
            log.info("calibrating tau: %d/%d prompts, %d tokens", state.prompts_done, state.prompts_total, state.tokens)
        self.calibration = {"prompts_done": state.prompts_done, "prompts_total": state.prompts_total,
                            "tokens": state.tokens}

    def _decode_as_requests(self, prompts: Sequence[Sequence[int]], params_list: Sequence, *,
                            on_finish=None) -> list:
        """Decode through the scheduler (scheduler.decode_requests)."""
        return decode_requests(self.scheduler, prompts, params_list, on_finish=on_finish)

    # -- information ----------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        model = self.runtime.model
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "selar-local",
            "meta": {"architecture": model.architecture, "n_vocab": model.n_vocab, "n_ctx": self.runtime.context.n_ctx,
                     "n_ctx_train": model.n_ctx_train, "n_parallel": self.runtime.n_parallel,
                     "soft_decoding": self.runtime.self_check.passed, "path": str(self.runtime.model_path),
                     "sampler": dict(self.runtime.sampler.values), "tau": self._default_tau()},
        }]}

    def _default_tau(self) -> dict[str, Any]:
        """The tau a request without one decodes with, and where it comes from."""
        choice = self.runtime.sampler.tau_choice(self.runtime.default_params())
        return {"value": choice.value, "source": choice.source, "note": choice.note}

    def close(self) -> None:
        self.scheduler.close()
        if self._owns_runtime:
            self.runtime.close()

    def __enter__(self) -> "Selar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
