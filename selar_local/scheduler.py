"""Continuous batching over one BatchGenerator, driven by ONE background thread.

Callers in any thread submit requests (validated and tokenised in the caller's thread, so
a bad request fails alone and at once); up to `n_parallel` run as parallel sequences of
one llama.cpp context, up to `queue_size` more wait, and the rest get `QueueFullError`.
Events reach each request through its own sink; cancelling a request frees its slot
before the next decode step. Prompts are prefilled by the generator's steps, in chunks
beside the live sequences, so admitting a request never stalls the others.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from selar_local.errors import InvalidParameterError, SelarError
from selar_local.frac import check_ready, control_key
from selar_local.methods import refuse_search
from selar_local.generate import BatchGenerator, GenerationResult, StepEvent
from selar_local.params import DecodeParams
from selar_local.turns import keep_turns, total_prompt_tokens

logger = logging.getLogger(__name__)

class QueueFullError(SelarError):
    """Every slot is busy and the wait queue is full (the server answers 503)."""


class RequestCancelledError(SelarError):
    """Delivered to a request that was cancelled (its client went away)."""


class SchedulerClosedError(SelarError):
    """The scheduler was closed (the server is shutting down)."""


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
    waited_for_room: int  # submissions that waited out a full queue (a search's own decodes) instead of failing
    slots_busy_peak: int  # the most sequences ever decoding together (never above slots_total)
    kv_cells_in_use: int  # KV cells held for live sequences (and leaks), as of the scheduler's last round
    kv_cells_cached: int  # KV cells free slots keep as prompt cache

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
        self.submitted_at = time.monotonic()  # for time-to-first-token (selar_local/metrics.py)

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
        for listener in self.scheduler.listeners:
            try:
                listener(self, kind, payload)
            except Exception:  # observers (metrics) must not stop the worker either
                logger.exception("scheduler listener failed")

    def cancel(self) -> None:
        """Stop generating: frees the slot before the next decode step (its cells stay
        as prompt cache, up to the first soft input)."""
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
        self._waiting: deque[list[RequestHandle]] = deque()  # groups admitted together
        self._starting: list[RequestHandle] = []  # taken off the queue, prefilling
        self._running: dict[int, RequestHandle] = {}
        self._to_cancel: list[RequestHandle] = []
        self._closed = False
        self._active = 0  # submitted and not yet ended: waiting, being admitted, or running
        self._counts = dict(submitted=0, completed=0, cancelled=0, failed=0, rejected=0, waited_for_room=0,
                            slots_busy_peak=0, kv_cells_in_use=0, kv_cells_cached=0)
        self._idle_wait = idle_wait
        # listener(handle, kind, payload): called with every item any request receives,
        # in the delivering thread (selar_local/metrics.py counts tokens and latencies)
        self.listeners: list[Callable[[RequestHandle, str, Any], None]] = []
        self._thread = threading.Thread(target=self._run, name="selar-scheduler", daemon=True)
        self._thread.start()

    # -- callers' side (any thread) -------------------------------------------------------
    @property
    def slots_total(self) -> int:
        return self.runtime.n_parallel

    def submit(self, prompt_tokens: Sequence[int], params: DecodeParams, *,
               sink: Callable[[str, Any], None] | None = None, wait_for_room: bool = False) -> RequestHandle:
        """Queue a request. Raises at once (in the caller's thread) for a prompt over the
        context, a method the model cannot run, or a full queue; never blocks, unless
        wait_for_room: then a full queue is waited out (work already admitted, such as a search's
        own decodes, which must not fail halfway because other work filled the queue)."""
        return self.submit_group(prompt_tokens, [params], sinks=[sink], wait_for_room=wait_for_room)[0]

    def submit_group(self, prompt_tokens: Sequence[int], params_list: Sequence[DecodeParams], *,
                     sinks: Sequence[Callable[[str, Any], None] | None] | None = None,
                     wait_for_room: bool = False) -> list[RequestHandle]:
        """Queue several sequences of one prompt (OpenAI `n`): admitted together, the
        prompt prefilled once. One handle per sequence; each ends on its own. wait_for_room: as
        in submit."""
        prompt_tokens = keep_turns(prompt_tokens)  # a TurnPrompt keeps its later turns (latentmas)
        self.runtime.check_prompt_fits(total_prompt_tokens(prompt_tokens))
        for params in params_list:
            self.runtime.require_method(params.method)
            check_ready(self.runtime, params)  # --method frac: the model's steering vectors exist
            refuse_search(params.method)  # latentseek: dispatched above (search_api), never stepped here
        if not 1 <= len(params_list) <= self.slots_total:
            raise InvalidParameterError(
                f"invalid n={len(params_list)}: expected an integer in [1, {self.slots_total}] "
                f"(the sequences of one request decode together; the server runs {self.slots_total} at once)")
        sinks = list(sinks) if sinks is not None else [None] * len(params_list)
        group = [RequestHandle(self, prompt_tokens, params, sink) for params, sink in zip(params_list, sinks)]
        with self._lock:
            if wait_for_room and not self._closed and not self._has_room(len(group)):
                self._counts["waited_for_room"] += 1
                while not self._closed and not self._has_room(len(group)):
                    self._lock.wait()  # _ended notifies
            if self._closed:
                raise SchedulerClosedError("the scheduler is closed")
            if not self._has_room(len(group)):
                self._counts["rejected"] += 1
                raise QueueFullError(
                    f"server busy: all {self.slots_total} slots are generating and {self._queued()} "
                    f"requests are waiting (queue size {self.queue_size}); retry later, or start the "
                    f"server with a larger --parallel or --queue-size"
                )
            self._counts["submitted"] += len(group)
            self._active += len(group)
            self._waiting.append(group)
            self._lock.notify_all()
        return group

    def cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle.finished.is_set() or handle.cancelled:
                return
            handle.cancelled = True
            for group in self._waiting:
                if handle in group:
                    group.remove(handle)
                    if not group:
                        self._waiting.remove(group)
                    self._counts["cancelled"] += 1
                    handle._deliver("error", RequestCancelledError("request cancelled"))
                    return
            self._to_cancel.append(handle)
            self._lock.notify_all()

    def _queued(self) -> int:
        return sum(len(group) for group in self._waiting)

    def _has_room(self, n: int) -> bool:
        return self._active + n <= self.slots_total + self.queue_size

    def _ended(self) -> None:
        with self._lock:
            self._active -= 1
            self._lock.notify_all()  # a caller waiting for room

    def stats(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(self.slots_total, len(self._running) + len(self._starting), self._queued(),
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
            cells = self._generator.kv_cells_in_use()  # read here: only this thread touches the context
            cached = self._generator.kv_cells_cached()
            with self._lock:
                self._counts["kv_cells_in_use"] = cells
                self._counts["kv_cells_cached"] = cached
        closing = SchedulerClosedError("the server is shutting down")
        for handle in list(self._running.values()):
            self._drop(handle, "failed", closing)
        with self._lock:
            waiting, self._waiting = [h for group in self._waiting for h in group], deque()
            for handle in waiting:
                handle._deliver("error", closing)

    def _iterate(self, cancels: list[RequestHandle]) -> None:
        """One round: apply cancellations, admit waiting requests, one decode step."""
        gen = self._generator
        for handle in cancels:
            self._drop(handle, "cancelled", RequestCancelledError("request cancelled"))
        with self._lock:  # only this thread changes the generator's slots
            admit, free = [], gen.free_slots
            vectors = {control_key(h.params) for h in [*self._running.values(), *self._starting]}
            while self._waiting and len(self._waiting[0]) <= free:  # first come, first served
                vector = control_key(self._waiting[0][0].params)
                if vectors and vector not in vectors:
                    break  # another control vector (--method frac): drain the live sequences, then switch
                vectors.add(vector)
                group = self._waiting.popleft()
                free -= len(group)
                admit.append(group)
                self._starting.extend(group)
            busy = len(self._running) + len(self._starting)
            self._counts["slots_busy_peak"] = max(self._counts["slots_busy_peak"], busy)
        for group in admit:
            self._admit(group)
        if self._running:
            try:
                events = gen.step()
            except Exception as exc:  # one failed decode: fail the sequences in it, not the server
                for handle in list(self._running.values()):
                    self._drop(handle, "failed", exc)
                return
            for event in events:
                self._dispatch(event)

    def _admit(self, group: list[RequestHandle]) -> None:
        try:
            started = self._generator.submit_group(group[0].prompt_tokens, [h.params for h in group])
        except BaseException as exc:  # these requests only (the generator freed their slots)
            with self._lock:
                for handle in group:
                    self._starting.remove(handle)
                    self._counts["failed"] += 1
                    handle._deliver("error", exc)
            return
        with self._lock:
            for handle, (request_id, _first) in zip(group, started):
                handle.request_id = request_id
                self._starting.remove(handle)
                self._running[request_id] = handle
        for _request_id, first in started:
            if first is not None:
                self._dispatch(first)

    def _dispatch(self, event: StepEvent) -> None:
        handle = self._running.get(event.request_id)
        if handle is None:
            return
        if event.finish_reason == "error":  # this sequence alone could not be decoded
            error = self._generator.pop_error(event.request_id)
            with self._lock:
                self._running.pop(event.request_id, None)
                self._counts["failed"] += 1
                handle._deliver("error", error)
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


def decode_requests(scheduler: Scheduler, prompts: Sequence[Sequence[int]], params_list: Sequence[DecodeParams], *,
                    on_finish: Callable[[int, GenerationResult], None] | None = None) -> list[GenerationResult]:
    """Decode prompts as ordinary requests of `scheduler` (beside whatever else it runs), at
    most n_parallel of them queued at a time so that the queue stays for the clients, each
    waiting for room when the queue is full (16 searches of four checks each fill it);
    on_finish(index, result) as each one is done, in order. A search's `decode` (search_api,
    the bench's concurrent searches)."""
    results: list = [None] * len(prompts)
    in_flight: deque = deque()
    try:
        for i, (tokens, params) in enumerate(zip(prompts, params_list)):
            if len(in_flight) >= scheduler.slots_total:
                j, handle = in_flight.popleft()
                results[j] = handle.wait()
                if on_finish is not None:
                    on_finish(j, results[j])
            in_flight.append((i, scheduler.submit(tokens, params, wait_for_room=True)))
        while in_flight:
            j, handle = in_flight.popleft()
            results[j] = handle.wait()
            if on_finish is not None:
                on_finish(j, results[j])
    finally:
        for _, handle in in_flight:
            handle.cancel()  # a failed decode: the rest are not needed
    return results
