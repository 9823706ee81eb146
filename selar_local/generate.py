"""The generation loop: joins the engine (llama.cpp) and the step policies (NumPy).

`BatchGenerator` runs several sequences in one llama.cpp context, one `llama_decode` per
step for all live sequences and the next prompt chunk; each sequence keeps its own policy,
gate, random stream and stop conditions. A single streamed generation is the one-sequence
case. `step()` reads like vLLM's `EngineCore.step`, in three parts with one owner each:

- plan (sequences.py, `SequenceTable`): admission with prefix reuse, waiting for a prompt
  another sequence is prefilling, which sequences decode (gaps between their seq_ids
  closed), which prompt chunk goes next. Each sequence has an explicit `Phase` and a
  queue of segments (`Prefill`, `Decode`, `Force`).
- run (batch_runner.py, `BatchRunner`): the pending inputs (token ids, table rows,
  mixtures or vectors, one function `input_row`) and the chunk into the engine's
  batches, one decode, the logits rows read back (and the hidden state, for a policy that
  declares `needs_hidden`).
- update: each sequence with logits decides (decisions.py: forced tokens, the policies,
  batch-wide when that is faster, the grammar), every final token is told to its policy
  (`Policy.accept`) and recorded by its output accumulator (outputs.py: text, stop
  strings, thinking split, log-probabilities, events, the result).

Prompts are never prefilled whole while others decode: a new prompt goes in chunks of
`prefill_chunk` tokens (the whole n_batch when nothing else is live), so no live stream
waits for more than one chunk. Before that, the slot table (kv_slots.py) finds the
longest prefix already in some slot's KV cells (the prompt cache, or another sequence of
the same prompt: `n`, seeds, self-consistency) and only the rest is prefilled.

A method plugs in without touching the loop: its policy (policies.py's calls) and its
entry in the method registry (methods.py); see README, "Adding a method".

The loop imports nothing from runtime.py: it takes what it needs from the object it is
handed (see `LoopHost`), so the dependency runs one way.
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from selar_local.batch_runner import BatchRunner, RunOutput
from selar_local.batch_step import WIDE_VOCAB
from selar_local.constraint import SequenceGrammar
from selar_local.decisions import decide
from selar_local.errors import ContextOverflowError, DecodeError, InvalidParameterError
from selar_local.grammar import sampler_for
from selar_local.kv_slots import SlotTable
from selar_local.methods import refuse_search
from selar_local.outputs import GenerationResult, SequenceOutput, StepEvent, TextStream
from selar_local.params import DecodeParams
from selar_local.policies import StepDecision, TokenInfo, make_policy
from selar_local.sequences import Phase, Piece, Sequence as LoopSequence, SequenceTable, queued_segments
from selar_local.thinking import SpanTracker
from selar_local.turns import keep_turns, later_turns, total_prompt_tokens

_TextStream = TextStream  # the name tests and speed.py import
__all__ = ["BatchGenerator", "GenerationResult", "StepEvent", "generate_groups", "generate_many", "stream_tokens"]

_DECODE_ERRORS = (DecodeError, ContextOverflowError, ValueError)


class LoopHost(Protocol):
    """What the loop needs from the object it is handed (a `Runtime`)."""

    context: Any            # engine.LlamaContext
    model: Any              # engine.LlamaModel
    table: Any              # embeddings.EmbeddingTable or None
    self_check: Any         # runtime.SelfCheck
    token_info: TokenInfo
    stop_strings: tuple[str, ...]
    slots: SlotTable
    prefill_chunk: int
    thinking_span: Any      # thinking.ThinkingSpan or None

    def check_prompt_fits(self, n_prompt_tokens: int) -> None: ...
    def check_thinking_params(self, params: DecodeParams) -> None: ...
    def require_method(self, method: str) -> None: ...
    def latent_alignment(self, kind: str) -> Any: ...
    def thinking_at_end(self, prompt_tokens: Sequence[int]) -> bool | None: ...


class BatchGenerator:
    """Steps up to `runtime.n_parallel` sequences together through one context."""

    def __init__(self, runtime: LoopHost, *, batch_wide: bool | None = None, prefill_chunk: int | None = None,
                 whole_prompts_only: bool = False, close_gaps: bool = True):
        self.runtime = runtime
        self.context = runtime.context
        self.slots = runtime.slots
        # False: each policy steps on its own row (the reference path). By default the batch-wide
        # step runs below WIDE_VOCAB, where it is the faster of the two (16 rows of 49k: 0.66 against
        # 0.79 ms host work a step); at 152k one row at a time was faster (1.24 against 1.57 ms).
        if batch_wide is None:
            batch_wide = self.context.model.n_vocab < WIDE_VOCAB
        self.batch_wide = batch_wide
        self.table = SequenceTable(self.context, self.slots,
                                   prefill_chunk=max(1, int(prefill_chunk or runtime.prefill_chunk)),
                                   whole_prompts_only=whole_prompts_only, close_gaps=close_gaps)
        check = runtime.self_check
        self.runner = BatchRunner(self.context, runtime.table, rows_exact=bool(
            runtime.table is not None and check is not None and check.passed and check.max_abs_diff == 0.0))
        self._eog_ids = runtime.model.eog_ids
        self._eog_list = sorted(self._eog_ids)
        self._token_bytes = runtime.model.token_bytes
        self._finished: dict[int, LoopSequence] = {}
        self._errors: dict[int, BaseException] = {}
        self._next_request = 0

    # -- admission --------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.slots.n_free

    @property
    def _live(self) -> dict[int, LoopSequence]:
        return self.table.live

    def kv_cells_in_use(self) -> int:
        """KV cells held for live sequences, plus any a free slot holds past its cached
        tokens (a leak): 0 when every sequence has ended or been cancelled."""
        return self.table.kv_cells_in_use()

    def kv_cells_cached(self) -> int:
        """KV cells free slots keep as prompt cache."""
        return self.table.kv_cells_cached()

    @property
    def live_requests(self) -> list[int]:
        return list(self.table.live)

    def submit(self, prompt_tokens: Sequence[int], params: DecodeParams) -> tuple[int, StepEvent | None]:
        """Admit a prompt to a free slot. Returns the request id and None: the prompt is
        prefilled (in chunks, beside the live sequences) by the following `step()` calls,
        which also bring its first event."""
        return self.submit_group(prompt_tokens, [params])[0]

    def submit_group(self, prompt_tokens: Sequence[int],
                     params_list: Sequence[DecodeParams]) -> list[tuple[int, StepEvent | None]]:
        """Start len(params_list) sequences of ONE prompt (OpenAI `n`, several seeds,
        self-consistency): the prompt is prefilled once, its KV cells are copied to the
        other slots (llama_memory_seq_cp), and every sequence takes its first step from
        the same logits with its own policy and random stream.
        Returns (request id, None) per sequence, in the order of params_list."""
        prompt_tokens = keep_turns(prompt_tokens)  # a TurnPrompt keeps its later turns (latentmas)
        later = later_turns(prompt_tokens)
        if not params_list:
            raise InvalidParameterError("submit_group needs at least one DecodeParams")
        self.runtime.check_prompt_fits(total_prompt_tokens(prompt_tokens))
        for params in params_list:
            self.runtime.require_method(params.method)
            refuse_search(params.method)  # latentseek searches whole answers above the loop (search_api)
        from selar_local.frac import use_control_vector  # the context's control vector (--method frac)

        use_control_vector(self.runtime, params_list, [seq.params for seq in self._live.values()])
        if len(params_list) > self.free_slots:
            raise RuntimeError(f"{len(params_list)} sequences need as many free slots; {self.free_slots} "
                               "are free: wait for sequences to finish or raise n_parallel")
        for params in params_list:
            self.runtime.check_thinking_params(params)
        self.table.check_free_caches()
        in_thinking = self.runtime.thinking_at_end(prompt_tokens)
        span = getattr(self.runtime, "thinking_span", None)
        started = time.perf_counter()
        samplers = [sampler_for(self.runtime.model, params) for params in params_list]  # bad GBNF: raises here
        made = []
        for params in params_list:  # every policy made and checked before any sequence is admitted
            tracker = SpanTracker(span, bool(in_thinking))  # the one thinking state: the policy reads it
            policy = make_policy(params, self.runtime.token_info, thinking=tracker)
            if getattr(policy, "reads_alignment", False):  # it feeds aligned hidden states (alignment.py)
                self.runtime.check_prompt_fits(total_prompt_tokens(prompt_tokens) + getattr(policy, "latent_steps", 0))
                policy.alignment = self.runtime.latent_alignment(params.latent_align)
                policy.table = self.runtime.table
            elif getattr(policy, "reads_table", False):  # it computes its own vectors from the input rows
                policy.table = self.runtime.table
            made.append((tracker, policy, queued_segments(prompt_tokens, later, policy)))  # may refuse: no slot yet
        out = []
        for params, sampler, (tracker, policy, segments) in zip(params_list, samplers, made):
            plan = self.table.plan(prompt_tokens)
            seq = LoopSequence(self._next_request, plan.slot, params, policy, prompt_tokens,
                               SequenceOutput(TextStream(params.stop + self.runtime.stop_strings,
                                                         tracker.hold_strings), tracker),
                               grammar=SequenceGrammar(sampler, params) if sampler is not None else None,
                               started=started)
            self._next_request += 1
            self.table.admit(seq, plan, segments)
            out.append((seq.request_id, None))
        return out

    def cancel(self, request_id: int) -> None:
        """Stop a sequence now and free its slot (its cells stay as prompt cache)."""
        seq = self.table.live.get(request_id)
        if seq is not None:
            self.table.end(seq, keep_cache=True)

    def close(self) -> None:
        """Cancel every sequence still live (their slots go back to the runtime)."""
        for request_id in list(self.table.live):
            self.cancel(request_id)

    # -- stepping ---------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        """One decode for every live sequence's pending input plus the next prompt chunk
        (if any); then each sequence that has logits takes its step.

        If the shared decode fails, its parts are retried alone, so that only the one
        that cannot decode ends (with finish_reason "error"; `pop_error` gives why) and
        its neighbours go on with exactly the logits they would have had."""
        table = self.table
        table.resolve_waiting()
        events = self._first_steps()
        decoding = table.decoding()                      # plan
        pieces = table.next_pieces(len(decoding))
        if decoding or pieces:
            events += self._run(decoding, pieces)        # run, update
            table.resolve_waiting()
            events += self._first_steps()
        return events

    def _run(self, decoding: list[LoopSequence], pieces: list[Piece]) -> list[StepEvent]:
        try:
            result = self.runner.run(decoding, pieces)
        except _DECODE_ERRORS as exc:
            if not self.table.room_was_made(exc):
                return self._run_separately(decoding, pieces)
            result = self.runner.run(decoding, pieces)
        return self._update(decoding, pieces, result)

    def _run_separately(self, decoding: list[LoopSequence], pieces: list[Piece]) -> list[StepEvent]:
        """The shared decode failed: each prompt piece alone, then the live inputs
        together, then each alone; only what cannot decode ends, with an error."""
        events = []
        for piece in pieces:
            try:
                result = self.runner.run([], [piece])
            except _DECODE_ERRORS as exc:
                events.append(self._fail(piece.seq, exc))
                continue
            self._update([], [piece], result)
        if not decoding:
            return events
        try:
            result = self.runner.run(decoding, [])
        except _DECODE_ERRORS as exc:
            if len(decoding) == 1:
                return events + [self._fail(decoding[0], exc)]
        else:
            return events + self._update(decoding, [], result)
        for s in decoding:
            try:
                result = self.runner.run([s], [])
            except _DECODE_ERRORS as exc:
                events.append(self._fail(s, exc))
                continue
            events += self._update([s], [], result)
        return events

    def _update(self, decoding: list[LoopSequence], pieces: list[Piece], result: RunOutput) -> list[StepEvent]:
        self.table.record_prompt(pieces, result.prompt_logits, result.prompt_hidden)
        if not decoding:
            return []
        to_prefill = self.table.advance(decoding)
        rows, hidden = result.rows, result.hidden
        if to_prefill:  # some go on to a later turn's prefill (latentmas)
            deciding = [i for i in range(len(decoding)) if i not in to_prefill]
            decoding = [decoding[i] for i in deciding]
            rows = rows[deciding]
            hidden = None if hidden is None else hidden[deciding]
            if not decoding:
                return []
        return self._take_all(decoding, rows, hidden)

    def _first_steps(self) -> list[StepEvent]:
        """Sequences whose prompt logits are known (just prefilled, cached, or copied)."""
        ready = self.table.ready()
        if not ready:
            return []
        now = time.perf_counter()
        rows = [s.first_logits for s in ready]
        hidden = None
        if any(s.policy.needs_hidden for s in ready):
            hidden = [s.first_hidden for s in ready]
        for seq in ready:
            seq.first_logits, seq.first_hidden = None, None
            if seq.prefill_seconds is None:  # the prompt's; a later turn's prefill counts as decoding
                seq.prefill_seconds = now - seq.started
        return self._take_all(ready, np.stack(rows) if len(rows) > 1 else rows, hidden)

    def _take_all(self, seqs: list[LoopSequence], rows, hidden) -> list[StepEvent]:
        decided = decide(seqs, rows, hidden, batch_wide=self.batch_wide, eog_ids=self._eog_list)
        events = (self._take(s, d, generated) for s, (d, generated) in zip(seqs, decided))
        return [e for e in events if e is not None]

    def _take(self, seq: LoopSequence, decision: StepDecision, generated: bool | None) -> StepEvent | None:
        """A final decision: the grammar and the policy are told its token, the output
        records it; the sequence decodes its input next, or ends. A latent step (generated
        None) has no event: the output keeps its marker for the next token's event."""
        if generated is None:  # a latent step: nothing shown, its input decodes next
            seq.out.add_latent(decision)
            seq.pending, seq.phase = decision, Phase.DECODING
            return None
        token = decision.token
        if seq.grammar is not None:  # -- grammar seam (issue 23): advance past the shown token --
            seq.grammar.commit(token)
        seq.policy.accept(token, generated)
        eog = token in self._eog_ids
        event = seq.out.take(seq.request_id, decision, b"" if eog else self._token_bytes(token),
                             end_of_generation=eog, max_tokens=seq.params.max_tokens,
                             context_full=seq.position + 1 > self.context.n_ctx,
                             dist=seq.policy.last_dist, n_logprobs=seq.params.logprobs)
        if event.finish_reason is None:
            seq.pending, seq.phase = decision, Phase.DECODING
        else:
            seq.finish_reason = event.finish_reason
            self.table.end(seq, keep_cache=True)
            self._finished[seq.request_id] = seq
        return event

    def _fail(self, seq: LoopSequence, exc: BaseException) -> StepEvent:
        """End one sequence whose input could not be decoded; its slot and cells are freed."""
        self._errors[seq.request_id] = exc
        seq.finish_reason = "error"
        self.table.end(seq, keep_cache=False)
        self._finished[seq.request_id] = seq
        return seq.out.error_event(seq.request_id)

    def pop_error(self, request_id: int) -> BaseException:
        """Why a sequence ended with finish_reason "error" (its result is dropped)."""
        self._finished.pop(request_id, None)
        return self._errors.pop(request_id)

    def pop_result(self, request_id: int) -> GenerationResult:
        """The finished sequence's result (each result can be taken once)."""
        seq = self._finished.pop(request_id)
        prefill_seconds = seq.prefill_seconds or 0.0
        decode_seconds = time.perf_counter() - seq.started - prefill_seconds
        return seq.out.result(prompt_tokens=seq.prompt_total, finish_reason=seq.finish_reason or "stop",
                              prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                              cached_tokens=seq.cached_tokens)


def stream_tokens(runtime: LoopHost, prompt_tokens: Sequence[int], params: DecodeParams) -> Iterator[StepEvent]:
    """Stream one sequence; the generator's return value is its GenerationResult."""
    generator = BatchGenerator(runtime)
    request_id, _ = generator.submit(prompt_tokens, params)
    try:
        while True:
            for event in generator.step():
                if event.finish_reason == "error":
                    raise generator.pop_error(request_id)
                yield event
                if event.finish_reason:
                    return generator.pop_result(request_id)
    finally:
        generator.cancel(request_id)
    if event is not None and event.finish_reason == "error":
        raise generator.pop_error(request_id)  # one stream: its failed decode is the caller's error
    return generator.pop_result(request_id)


def generate_many(
    runtime: LoopHost, prompts: Sequence[Sequence[int]], params: Sequence[DecodeParams] | DecodeParams,
    *, on_finish=None,
) -> list[GenerationResult]:
    """Run many prompts, up to runtime.n_parallel at a time, in one context.
    `on_finish(index, result)` is called as each one completes (for resumable runs).
    A prompt shared by several items (seeds, methods) is prefilled once: later ones copy
    its cells and logits (see BatchGenerator). For results that do not depend on the order
    or on what ran before, to the bit, prompts go in whole batches (nobody watches a batch
    job's streams) and only whole prompts are reused: a partial prefix or 64-token chunks
    would batch the rest differently from a fresh prefill and move the last bits of its
    logits (greedy answers of `selar bench` changed)."""
    if isinstance(params, DecodeParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise InvalidParameterError("one DecodeParams per prompt, or a single one for all")
    generator = BatchGenerator(runtime, prefill_chunk=runtime.context.n_batch, whole_prompts_only=True)
    results: list[GenerationResult | None] = [None] * len(prompts)
    owner: dict[int, int] = {}
    queue = list(range(len(prompts)))

    def collect(event: StepEvent | None) -> None:
        if event is not None and event.finish_reason:
            if event.finish_reason == "error":
                raise generator.pop_error(event.request_id)
            index = owner.pop(event.request_id)
            results[index] = generator.pop_result(event.request_id)
            if on_finish is not None:
                on_finish(index, results[index])

    try:
        while queue or owner:
            while queue and generator.free_slots:
                index = queue.pop(0)
                request_id, first = generator.submit(prompts[index], params[index])
                owner[request_id] = index
                collect(first)
            if queue and not owner:  # nothing live and no free slot: another user holds them all (it would spin)
                raise RuntimeError(f"no free slot for the next prompt: all {runtime.n_parallel} are held outside "
                                   "this batch")
            for event in generator.step():
                collect(event)
    finally:
        generator.close()
    return results  # type: ignore[return-value]


def generate_groups(
    runtime: LoopHost, prompts: Sequence[Sequence[int]], params_lists: Sequence[Sequence[DecodeParams]],
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
            if event.finish_reason == "error":  # as generate_many: the failure, not a result
                raise generator.pop_error(event.request_id)
            index, member = owner.pop(event.request_id)
            results[index][member] = generator.pop_result(event.request_id)
            left[index] -= 1
            if left[index] == 0 and on_finish is not None:
                on_finish(index, results[index])

    try:
        while queue or owner:
            while queue and generator.free_slots >= len(params_lists[queue[0]]):
                index = queue.pop(0)
                started = generator.submit_group(prompts[index], params_lists[index])
                for member, (request_id, _) in enumerate(started):
                    owner[request_id] = (index, member)
                for _, first in started:
                    collect(first)
            if queue and not owner:  # as generate_many: it would spin
                raise RuntimeError(f"no free slots for the next group: all {runtime.n_parallel} are held outside "
                                   "this batch")
            for event in generator.step():
                collect(event)
    finally:
        generator.close()  # the other sequences' slots go back to the runtime
    return results  # type: ignore[return-value]
