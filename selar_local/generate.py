"""The generation loop: joins the engine (llama.cpp) and a step policy (NumPy).

`BatchGenerator` runs several sequences in one llama.cpp context, one `llama_decode`
per step for all live sequences; each sequence keeps its own policy, gate, random
stream and stop conditions. A single streamed generation is the one-sequence case.

Each step: read the logits of every live sequence (zero-copy views), let its policy
decide the shown token and the next input, then feed all next inputs in one batch:
token ids when every input is discrete, otherwise embedding rows, where a discrete
input rides as its exact table row (the load-time self-check proves the two paths
give identical logits, so no graph switch and no second decode are needed).
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from selar_local.errors import ContextOverflowError, DecodeError, InvalidParameterError
from selar_local.params import DecodeParams
from selar_local.policies import Policy, StepDecision, make_policy
from selar_local.sampling import token_logprobs
from selar_local.thinking import SpanTracker

if TYPE_CHECKING:  # pragma: no cover
    from selar_local.runtime import Runtime


@dataclass(frozen=True)
class StepEvent:
    """One generated token of one sequence, as streamed to callers and traces."""

    request_id: int
    index: int                 # 0-based position in the generated text
    token: int
    text: str                  # text released by this step (stop-string holdback applied)
    soft: bool                 # the NEXT input is a soft mixture (not this token)
    entropy: float
    top_ids: tuple[int, ...]
    top_probs: tuple[float, ...]
    mix_ids: tuple[int, ...] = ()
    mix_weights: tuple[float, ...] = ()
    finish_reason: str | None = None  # "stop", "length", or "error" on a sequence's last event
    # Only when the request asked for them (DecodeParams.logprobs): log-probability of the
    # shown token under the filtered distribution, and the most probable alternatives.
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # The thinking span (selar_local/thinking.py): whether this token was generated inside
    # it, and `text` split into reasoning and content (markers in neither). Without
    # thinking markers, content == text.
    thinking: bool = False
    reasoning: str = ""
    content: str = ""

    def trace_record(self, token_text: str) -> dict:
        record = {
            "index": self.index, "token": self.token, "text": token_text, "soft": self.soft,
            "entropy": round(self.entropy, 6),
            "top_ids": list(self.top_ids), "top_probs": [round(p, 6) for p in self.top_probs],
            "thinking": self.thinking,
        }
        if self.soft:
            record["mix_ids"] = list(self.mix_ids)
            record["mix_weights"] = [round(w, 6) for w in self.mix_weights]
        if self.finish_reason:
            record["finish_reason"] = self.finish_reason
        return record


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    soft_steps: int
    entropies: list[float]
    prefill_seconds: float
    decode_seconds: float
    effective_counts: list[float] = field(default_factory=list)  # N_eff of each soft input
    soft_flags: list[bool] = field(default_factory=list)  # per step: was the NEXT input soft
    logprob_sum: float = 0.0  # sum of log p(token) under the sampling distribution

    @property
    def mean_logprob(self) -> float:
        """How confident the sampler was in the text it produced (self-consistency's tie-break)."""
        return self.logprob_sum / len(self.tokens) if self.tokens else 0.0
    # per token, when DecodeParams.logprobs asked: (log p of the token, ((id, log p), ...))
    logprobs: list[tuple[float, tuple]] = field(default_factory=list)
    # Thinking span: the reasoning (markers stripped) and the answer after the span;
    # answer is None for models without thinking markers (the whole text is the answer).
    reasoning: str = ""
    answer: str | None = None
    think_tokens: int = 0  # tokens generated inside the span
    thinking_flags: list[bool] = field(default_factory=list)  # per step: token inside the span

    @property
    def content(self) -> str:
        """The answer: the text after the thinking span (all of it without markers)."""
        return self.text if self.answer is None else self.answer

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def soft_share(self) -> float:
        return self.soft_steps / len(self.tokens) if self.tokens else 0.0

    @property
    def mean_entropy(self) -> float:
        return float(np.mean(self.entropies)) if self.entropies else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.decode_seconds if self.decode_seconds > 0 else 0.0


class _TextStream:
    """Incremental UTF-8 decoding plus stop strings, holding back any tail that could
    still become a stop string so that streamed text never has to be taken back."""

    def __init__(self, stop: Sequence[str], hold: Sequence[str] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        # `hold`: strings held back like stop strings but not stopping (thinking markers).
        self._prefixes = self._stop + tuple(hold)
        self._longest = max((len(s) for s in self._prefixes), default=0)
        self.text = ""
        self.released = 0

    def push(self, data: bytes) -> tuple[str, bool]:
        """Add a token's bytes; returns (text to release now, whether a stop string hit)."""
        self.text += self._decoder.decode(data)
        if self._prefixes:
            search_from = max(0, self.released - self._longest)
            hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._release(len(self.text)), True
            return self._release(len(self.text) - self._holdback()), False
        return self._release(len(self.text)), False

    def finish(self) -> str:
        self.text += self._decoder.decode(b"", final=True)
        return self._release(len(self.text))

    def _holdback(self) -> int:
        tail = self.text[-self._longest:] if self._longest else ""
        for size in range(min(len(tail), self._longest), 0, -1):
            if any(s.startswith(tail[-size:]) for s in self._prefixes):
                return size
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out = self.text[self.released:upto]
        self.released = upto
        return out


@dataclass
class _Sequence:
    request_id: int
    seq_id: int
    params: DecodeParams
    policy: Policy
    prompt_tokens: list[int]
    text: _TextStream
    span: SpanTracker = field(default_factory=lambda: SpanTracker(None))
    forced: list[int] = field(default_factory=list)  # tokens to emit next whatever the logits say
    thinking_flags: list[bool] = field(default_factory=list)
    position: int = 0
    tokens: list[int] = field(default_factory=list)
    soft_steps: int = 0
    entropies: list[float] = field(default_factory=list)
    effective_counts: list[float] = field(default_factory=list)
    soft_flags: list[bool] = field(default_factory=list)
    logprob_sum: float = 0.0
    logprobs: list[tuple[float, tuple]] = field(default_factory=list)
    pending: StepDecision | None = None
    finish_reason: str | None = None
    prefill_seconds: float = 0.0
    started: float = 0.0


class BatchGenerator:
    """Steps up to `runtime.n_parallel` sequences together through one context."""

    # After a soft step, discrete inputs keep riding as table rows for this many steps
    # (when rows are exact) instead of switching back to a token batch: llama.cpp
    # rebuilds its graph whenever the input kind changes between consecutive decodes.
    STICKY_EMBEDDING_STEPS = 16

    def __init__(self, runtime: "Runtime"):
        self.runtime = runtime
        self.context = runtime.context
        check = getattr(runtime, "self_check", None)
        # Rows may stand in for tokens without changing a single logit only where the
        # load-time self-check found the two paths bit-identical (max |diff| == 0).
        self._rows_exact = bool(runtime.table is not None and check is not None and check.passed
                                and check.max_abs_diff == 0.0)
        self._since_soft = self.STICKY_EMBEDDING_STEPS  # steps since the last soft input
        self._eog_ids = runtime.model.eog_ids
        self._eog_list = sorted(self._eog_ids)
        self._free_slots = list(range(runtime.n_parallel))
        self._live: dict[int, _Sequence] = {}
        self._finished: dict[int, _Sequence] = {}
        self._errors: dict[int, BaseException] = {}
        self._next_request = 0

    # -- admission --------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def kv_cells_in_use(self) -> int:
        """KV cells held by all slots (0 when every sequence has ended or been cancelled)."""
        return sum(self.context.sequence_length(slot) for slot in range(self.runtime.n_parallel))

    @property
    def live_requests(self) -> list[int]:
        return list(self._live)

    def submit(self, prompt_tokens: Sequence[int], params: DecodeParams) -> tuple[int, StepEvent | None]:
        """Prefill a prompt in a free slot and take its first step.
        Returns the request id and its first event (None if nothing could be shown)."""
        return self.submit_group(prompt_tokens, [params])[0]

    def submit_group(self, prompt_tokens: Sequence[int],
                     params_list: Sequence[DecodeParams]) -> list[tuple[int, StepEvent | None]]:
        """Start len(params_list) sequences of ONE prompt (OpenAI `n`, several seeds,
        self-consistency): the prompt is prefilled once, its KV cells are copied to the
        other slots (llama_memory_seq_cp), and every sequence takes its first step from
        the same logits with its own policy and random stream.
        Returns (request id, first event) per sequence, in the order of params_list."""
        prompt_tokens = list(prompt_tokens)
        if not params_list:
            raise InvalidParameterError("submit_group needs at least one DecodeParams")
        self.runtime.check_prompt_fits(len(prompt_tokens))
        for params in params_list:
            self.runtime.require_method(params.method)
        if len(params_list) > len(self._free_slots):
            raise RuntimeError(f"{len(params_list)} sequences need as many free slots; {len(self._free_slots)} "
                               "are free: wait for sequences to finish or raise n_parallel")
        for params in params_list:
            self.runtime.check_thinking_params(params)
        in_thinking = self.runtime.thinking_at_end(prompt_tokens)
        span = getattr(self.runtime, "thinking_span", None)
        group = []
        for params in params_list:
            request_id = self._next_request
            self._next_request += 1
            policy = make_policy(params, self.runtime.token_info, in_thinking=in_thinking)
            tracker = SpanTracker(span, bool(in_thinking))
            seq = _Sequence(request_id, self._free_slots.pop(0), params, policy, prompt_tokens,
                            _TextStream(params.stop + self.runtime.stop_strings, tracker.hold_strings), tracker)
            self._live[request_id] = seq
            group.append(seq)
        started = time.perf_counter()
        try:
            self._prefill(group[0])
            for seq in group[1:]:
                self.context.copy_sequence(group[0].seq_id, seq.seq_id)
                seq.position = group[0].position
        except BaseException:
            for seq in group:
                self.cancel(seq.request_id)
            raise
        prefill_seconds = time.perf_counter() - started
        out = []
        for seq in group:
            seq.started, seq.prefill_seconds = started, prefill_seconds
            # the last prompt token's logits: batch index -1 (not an output index), the
            # same buffer for every sequence of the group; each policy only reads it.
            out.append((seq.request_id, self._advance(seq, self.context.logits(-1))))
        return out

    def _prefill(self, seq: _Sequence) -> None:
        ctx, tokens = self.context, seq.prompt_tokens
        ctx.remove_sequence(seq.seq_id)
        for start in range(0, len(tokens), ctx.n_batch):
            chunk = tokens[start:start + ctx.n_batch]
            last = start + len(chunk) == len(tokens)
            want = [False] * len(chunk)
            want[-1] = last
            ctx.decode_tokens(chunk, range(start, start + len(chunk)), [seq.seq_id] * len(chunk), want)
        seq.position = len(tokens)

    def cancel(self, request_id: int) -> None:
        """Stop a sequence now and free its slot and KV cells (client went away)."""
        seq = self._live.pop(request_id, None)
        if seq is not None:
            self._release_slot(seq)

    def _release_slot(self, seq: _Sequence) -> None:
        self.context.remove_sequence(seq.seq_id)
        self._free_slots.append(seq.seq_id)
        self._free_slots.sort()

    # -- stepping ---------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        """Feed every live sequence's pending input in one decode and advance each.

        If the shared decode fails, each sequence is retried alone, so that only the one
        that cannot decode ends (with finish_reason "error"; `pop_error` gives why) and
        its neighbours go on with exactly the logits they would have had."""
        live = [s for s in self._live.values() if s.pending is not None and s.finish_reason is None]
        if not live:
            return []
        try:
            self._decode_inputs(live)
        except (DecodeError, ContextOverflowError, ValueError) as exc:
            if len(live) == 1:
                return [self._fail(live[0], exc)]
            return self._step_alone(live)
        events = []
        for i, s in enumerate(live):
            s.position += 1
            event = self._advance(s, self.context.logits(i))
            if event is not None:
                events.append(event)
        return events

    def _decode_inputs(self, live: list[_Sequence]) -> None:
        ctx = self.context
        n = len(live)
        positions = [s.position for s in live]
        seq_ids = [s.seq_id for s in live]
        want = [True] * n
        any_soft = any(s.pending.soft for s in live)
        if any_soft:
            self._since_soft = 0
        else:
            self._since_soft += 1
        if not any_soft and not (self._rows_exact and self._since_soft <= self.STICKY_EMBEDDING_STEPS
                                 and ctx.last_input_kind == "embeddings"):
            ctx.decode_tokens([s.pending.token for s in live], positions, seq_ids, want)
        else:
            rows = ctx.embedding_buffer(n)
            table = self.runtime.table
            for row, s in zip(rows, live):
                d = s.pending
                if d.soft:
                    table.mix(d.mix_ids, d.mix_weights, out=row)
                else:
                    row[:] = table.row(d.token)
            ctx.decode_embedding_buffer(n, positions, seq_ids, want)

    def _step_alone(self, live: list[_Sequence]) -> list[StepEvent]:
        events = []
        for s in live:
            try:
                self._decode_inputs([s])
            except (DecodeError, ContextOverflowError, ValueError) as exc:
                events.append(self._fail(s, exc))
                continue
            s.position += 1
            event = self._advance(s, self.context.logits(0))
            if event is not None:
                events.append(event)
        return events

    def _fail(self, seq: _Sequence, exc: BaseException) -> StepEvent:
        """End one sequence whose input could not be decoded; its slot is freed."""
        self._errors[seq.request_id] = exc
        decision = seq.pending
        text = seq.text.finish()
        return self._finish(seq, decision, len(seq.tokens), "error", text)

    def pop_error(self, request_id: int) -> BaseException:
        """Why a sequence ended with finish_reason "error" (its result is dropped)."""
        self._finished.pop(request_id, None)
        return self._errors.pop(request_id)

    def _decide(self, seq: _Sequence, logits: np.ndarray) -> StepDecision:
        """The policy's step, unless the thinking span must close: a budget spent
        (max_think_tokens) or Cold Stop. Then the close marker (and the answer's opening)
        is emitted token by token as discrete steps, as the Soft Thinking and
        SwiReasoning code do."""
        policy, span = seq.policy, seq.span
        if seq.forced:
            return policy.forced_step(logits, seq.forced.pop(0))
        budget = seq.params.max_think_tokens
        if budget is not None and span.in_span and span.think_tokens >= budget:
            seq.forced = list(span.span.forced_close)
            return policy.forced_step(logits, seq.forced.pop(0))
        policy.in_thinking = span.in_thinking
        decision = policy.step(logits)
        if getattr(policy, "close_requested", False):
            policy.close_requested = False
            if span.in_span:
                seq.forced = list(span.span.forced_close)
                return policy.forced_step(logits, seq.forced.pop(0))
        return decision

    def _advance(self, seq: _Sequence, logits: np.ndarray) -> StepEvent | None:
        """Ask the policy for the next step; apply stop conditions; build the event."""
        if seq.params.ignore_eos:  # a copy: the buffer may be shared by a group's sequences
            logits = logits.copy()
            logits[self._eog_list] = -np.inf
        decision = self._decide(seq, logits)
        token = decision.token
        index = len(seq.tokens)
        if token in self._eog_ids:  # not part of the output: no log-probability either
            return self._finish(seq, decision, index, "stop", seq.text.finish())
        logprobs = self._logprobs(seq, decision)
        thinking = seq.span.in_span
        seq.tokens.append(token)
        seq.entropies.append(decision.entropy)
        seq.soft_flags.append(False)
        seq.thinking_flags.append(thinking)
        seq.logprob_sum += decision.logprob
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        offset_before = len(seq.text.text)
        text, stopped = seq.text.push(self.runtime.model.token_bytes(token))
        seq.span.push(token, offset_before, seq.text.text)
        if stopped:
            return self._finish(seq, decision, index, "stop", text, logprobs)
        if (decision.final or len(seq.tokens) >= seq.params.max_tokens
                or seq.position + 1 > self.context.n_ctx):
            return self._finish(seq, decision, index, "length", text + seq.text.finish(), logprobs)
        if decision.soft:
            seq.soft_steps += 1
            seq.soft_flags[-1] = True
            w = decision.mix_weights
            seq.effective_counts.append(float(1.0 / np.dot(w, w)))
        seq.pending = decision
        return _event(seq.request_id, index, decision, text, decision.soft, None, logprobs,
                      self._split(seq, thinking))

    def _finish(self, seq: _Sequence, decision: StepDecision, index: int, reason: str, text: str,
                logprobs: tuple[float, tuple] | None = None) -> StepEvent:
        seq.finish_reason = reason
        seq.pending = None
        self._live.pop(seq.request_id, None)
        self._release_slot(seq)
        self._finished[seq.request_id] = seq
        thinking = bool(seq.thinking_flags) and len(seq.thinking_flags) > index and seq.thinking_flags[index]
        return _event(seq.request_id, index, decision, text, False, reason, logprobs,
                      self._split(seq, thinking, final=True))

    @staticmethod
    def _split(seq: _Sequence, thinking: bool, final: bool = False) -> tuple[bool, str, str]:
        reasoning, content = seq.span.route(seq.text.released, seq.text.text, final=final)
        return thinking, reasoning, content

    @staticmethod
    def _logprobs(seq: _Sequence, decision: StepDecision) -> tuple[float, tuple] | None:
        n = seq.params.logprobs
        dist = seq.policy.last_dist
        if n is None or dist is None:
            return None
        return token_logprobs(dist, decision.token, n)

    def pop_result(self, request_id: int) -> GenerationResult:
        """The finished sequence's result (each result can be taken once)."""
        seq = self._finished.pop(request_id)
        decode_seconds = time.perf_counter() - seq.started - seq.prefill_seconds
        reasoning, answer = seq.span.split(seq.text.text)
        return GenerationResult(
            text=seq.text.text, tokens=seq.tokens, prompt_tokens=len(seq.prompt_tokens),
            finish_reason=seq.finish_reason or "stop", soft_steps=seq.soft_steps, entropies=seq.entropies,
            prefill_seconds=seq.prefill_seconds, decode_seconds=decode_seconds,
            effective_counts=seq.effective_counts, soft_flags=seq.soft_flags, logprobs=seq.logprobs,
            reasoning=reasoning, answer=answer, think_tokens=seq.span.think_tokens, thinking_flags=seq.thinking_flags,
            logprob_sum=seq.logprob_sum,
        )


def _event(request_id: int, index: int, d: StepDecision, text: str, soft: bool, reason: str | None,
           logprobs: tuple[float, tuple] | None = None, split: tuple[bool, str, str] = (False, "", "")) -> StepEvent:
    # ndarray.tolist() gives the same Python ints/floats as int()/float() per element,
    # in one C call.
    mix_ids = _ints(d.mix_ids) if soft else ()
    mix_w = _floats(d.mix_weights) if soft else ()
    return StepEvent(
        request_id, index, d.token, text, soft, float(d.entropy),
        _ints(d.top_ids), _floats(d.top_probs), mix_ids, mix_w, reason,
        *(logprobs or (None, ())), *split,
    )


def _ints(values) -> tuple[int, ...]:
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return tuple(values.tolist())
    return tuple(int(v) for v in values)


def _floats(values) -> tuple[float, ...]:
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return tuple(values.tolist())
    return tuple(float(v) for v in values)


def stream_tokens(runtime: "Runtime", prompt_tokens: Sequence[int], params: DecodeParams) -> Iterator[StepEvent]:
    """Stream one sequence; the generator's return value is its GenerationResult."""
    generator = BatchGenerator(runtime)
    request_id, event = generator.submit(prompt_tokens, params)
    try:
        while event is not None:
            yield event
            if event.finish_reason:
                break
            events = generator.step()
            event = events[0] if events else None
    finally:
        generator.cancel(request_id)
    if event is not None and event.finish_reason == "error":
        raise generator.pop_error(request_id)  # one stream: its failed decode is the caller's error
    return generator.pop_result(request_id)


def generate_many(
    runtime: "Runtime", prompts: Sequence[Sequence[int]], params: Sequence[DecodeParams] | DecodeParams,
    *, on_finish=None,
) -> list[GenerationResult]:
    """Run many prompts, up to runtime.n_parallel at a time, in one context.
    `on_finish(index, result)` is called as each one completes (for resumable runs)."""
    if isinstance(params, DecodeParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise InvalidParameterError("one DecodeParams per prompt, or a single one for all")
    generator = BatchGenerator(runtime)
    results: list[GenerationResult | None] = [None] * len(prompts)
    owner: dict[int, int] = {}
    queue = list(range(len(prompts)))

    def collect(event: StepEvent | None) -> None:
        if event is not None and event.finish_reason:
            index = owner.pop(event.request_id)
            results[index] = generator.pop_result(event.request_id)
            if on_finish is not None:
                on_finish(index, results[index])

    while queue or owner:
        while queue and generator.free_slots:
            index = queue.pop(0)
            request_id, first = generator.submit(prompts[index], params[index])
            owner[request_id] = index
            collect(first)
        for event in generator.step():
            collect(event)
    return results  # type: ignore[return-value]


def generate_groups(
    runtime: "Runtime", prompts: Sequence[Sequence[int]], params_lists: Sequence[Sequence[DecodeParams]],
    *, on_finish=None,
) -> list[list[GenerationResult]]:
    """Decode each prompt as a group of sequences, one per DecodeParams (self-consistency):
    the prompt is prefilled once and its KV cells copied (`BatchGenerator.submit_group`).
    Groups are admitted whole as slots free up. `on_finish(index, results)` is called as
    each group completes."""
    if len(params_lists) != len(prompts):
        raise InvalidParameterError("one list of DecodeParams per prompt")
    widest = max((len(p) for p in params_lists), default=0)
    if widest > runtime.n_parallel or any(not p for p in params_lists):
        raise InvalidParameterError(f"groups of 1 to n_parallel ({runtime.n_parallel}) sequences; "
                                    f"got {widest}: raise the parallel sequences to at least the samples")
    generator = BatchGenerator(runtime)
    results: list[list[GenerationResult | None]] = [[None] * len(p) for p in params_lists]
    left = [len(p) for p in params_lists]
    owner: dict[int, tuple[int, int]] = {}
    queue = list(range(len(prompts)))

    def collect(event: StepEvent | None) -> None:
        if event is not None and event.finish_reason:
            index, member = owner.pop(event.request_id)
            results[index][member] = generator.pop_result(event.request_id)
            left[index] -= 1
            if left[index] == 0 and on_finish is not None:
                on_finish(index, results[index])

    while queue or owner:
        while queue and generator.free_slots >= len(params_lists[queue[0]]):
            index = queue.pop(0)
            started = generator.submit_group(prompts[index], params_lists[index])
            for member, (request_id, _) in enumerate(started):
                owner[request_id] = (index, member)
            for _, first in started:
                collect(first)
        for event in generator.step():
            collect(event)
    return results  # type: ignore[return-value]
