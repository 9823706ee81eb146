"""The generation loop: joins the engine (llama.cpp) and a step policy (NumPy).

`BatchGenerator` runs several sequences in one llama.cpp context, one `llama_decode`
per step for all live sequences; each sequence keeps its own policy, gate, random
stream and stop conditions. A single streamed generation is the one-sequence case.

Each step: feed every live sequence's next input and, when a prompt is waiting, the
next chunk of it; then read all the logits rows at once (one zero-copy [N, vocab] view)
and let the batch-wide step (batch_step.py) decide for every sequence. Inputs are token
ids when every one is discrete, otherwise embedding rows, where a discrete input rides
as its exact table row (the load-time self-check proves the two paths give identical
logits). A prompt chunk shares the live sequences' decode in a unified KV cache when
their inputs are tokens (a batch holds either token ids or embedding rows); otherwise
it is decoded just before it (see `_decode_step` for the measurement).

Prompts are never prefilled whole while others decode: a new prompt goes in chunks of
`prefill_chunk` tokens (the whole n_batch when nothing else is live), so no live stream
waits for more than one chunk. Before that, the slot table (kv_slots.py) finds the
longest prefix already in some slot's KV cells (the prompt cache, or another sequence
of the same prompt: `n`, seeds, self-consistency) and only the rest is prefilled; a
sequence whose prompt another one is still prefilling waits for those cells and copies
them (llama_memory_seq_cp) instead of computing them again.

What each sequence has produced (text, stop strings, the thinking split, log-probabilities,
events and its result) is kept by its `SequenceOutput` (outputs.py); the loop hands it each
decision. The policy a sequence gets comes from the method registry (methods.py).

The loop imports nothing from runtime.py: it takes what it needs from the object it is
handed (see `LoopHost`), so the dependency runs one way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from selar_local.batch_step import WIDE_VOCAB, decide_all
from selar_local.constraint import SequenceGrammar
from selar_local.errors import ContextOverflowError, DecodeError, InvalidParameterError
from selar_local.grammar import sampler_for
from selar_local.kv_slots import Plan, Slot, SlotTable, common_prefix
from selar_local.params import DecodeParams
from selar_local.policies import Policy, StepDecision, TokenInfo, make_policy
from selar_local.outputs import GenerationResult, SequenceOutput, StepEvent, TextStream, step_event
from selar_local.sampling import token_logprobs
from selar_local.thinking import SpanTracker

_TextStream = TextStream  # the name tests and speed.py import
__all__ = ["BatchGenerator", "GenerationResult", "StepEvent", "generate_groups", "generate_many", "stream_tokens"]

_DECODE_ERRORS = (DecodeError, ContextOverflowError, ValueError)
TILE_ROWS = 64  # rows of one tile of ggml's CPU matrix kernels (see BatchGenerator._decode_tokens)


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
    def thinking_at_end(self, prompt_tokens: Sequence[int]) -> bool | None: ...


@dataclass
class _Sequence:
    request_id: int
    slot: Slot
    params: DecodeParams
    policy: Policy
    prompt_tokens: list[int]
    out: SequenceOutput                     # tokens, text, thinking split, logprobs (outputs.py)
    position: int = 0                       # position of the next input
    fed: int = 0                            # prompt tokens whose KV cells exist
    source: "_Sequence | None" = None       # waiting for this sequence's prompt cells ...
    wait_upto: int = 0                      # ... up to here
    first_logits: np.ndarray | None = None  # known: the first step needs no decode
    cached_tokens: int = 0                  # prompt tokens not prefilled (cache or copy)
    extends_cache: bool = True              # no soft input fed yet
    forced: list[int] = field(default_factory=list)  # tokens to emit next whatever the logits say
    pending: StepDecision | None = None
    grammar: SequenceGrammar | None = None  # a constrained answer (constraint.py)
    finish_reason: str | None = None
    prefill_seconds: float = 0.0
    started: float = 0.0

    @property
    def seq_id(self) -> int:
        return self.slot.seq_id

    @property
    def prefilling(self) -> bool:
        return self.source is None and self.first_logits is None and self.fed < len(self.prompt_tokens)


@dataclass
class _Piece:
    """Part of one prompt in this step's batch."""

    seq: _Sequence
    start: int
    stop: int

    @property
    def completes(self) -> bool:
        return self.stop == len(self.seq.prompt_tokens)


class BatchGenerator:
    """Steps up to `runtime.n_parallel` sequences together through one context."""

    # After a soft step, discrete inputs keep riding as table rows for this many steps
    # (when rows are exact) instead of switching back to a token batch: llama.cpp
    # rebuilds its graph whenever the input kind changes between consecutive decodes.
    STICKY_EMBEDDING_STEPS = 16

    def __init__(self, runtime: LoopHost, *, batch_wide: bool | None = None, prefill_chunk: int | None = None,
                 whole_prompts_only: bool = False, close_gaps: bool = True):
        self.runtime = runtime
        self.context = runtime.context
        self.slots = runtime.slots
        self.prefill_chunk = max(1, int(prefill_chunk or runtime.prefill_chunk))
        # False: each policy steps on its own row (the reference path). By default the batch-wide
        # step runs below WIDE_VOCAB, where it is the faster of the two (16 rows of 49k: 0.66 against
        # 0.79 ms host work a step); at 152k one row at a time was faster (1.24 against 1.57 ms).
        if batch_wide is None:
            batch_wide = self.context.model.n_vocab < WIDE_VOCAB
        self.batch_wide = batch_wide
        # Reuse cells only for a whole prompt with its logits (exact), never a partial prefix
        # (the rest would be batched differently from a fresh prefill): batch jobs.
        self.whole_prompts_only = whole_prompts_only
        # Move live sequences into free slots so that their seq_ids stay consecutive (_close_gaps).
        self.close_gaps = close_gaps
        check = runtime.self_check
        # Rows may stand in for tokens without changing a single logit only where the
        # load-time self-check found the two paths bit-identical (max |diff| == 0).
        self._rows_exact = bool(runtime.table is not None and check is not None and check.passed
                                and check.max_abs_diff == 0.0)
        self._since_soft = self.STICKY_EMBEDDING_STEPS  # steps since the last soft input
        self._eog_ids = runtime.model.eog_ids
        self._eog_list = sorted(self._eog_ids)
        self._live: dict[int, _Sequence] = {}  # admitted and not ended: waiting, prefilling or decoding
        self._finished: dict[int, _Sequence] = {}
        self._errors: dict[int, BaseException] = {}
        self._next_request = 0

    # -- admission --------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.slots.n_free

    def kv_cells_in_use(self) -> int:
        """KV cells held for live sequences, plus any a free slot holds past its cached
        tokens (a leak): 0 when every sequence has ended or been cancelled."""
        total = 0
        for slot in self.slots.slots:
            cells = self.context.sequence_length(slot.seq_id)
            total += cells if slot.busy else max(0, cells - len(slot.tokens))
        return total

    def kv_cells_cached(self) -> int:
        """KV cells free slots keep as prompt cache."""
        return sum(len(slot.tokens) for slot in self.slots.slots if not slot.busy)

    @property
    def live_requests(self) -> list[int]:
        return list(self._live)

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
        prompt_tokens = list(prompt_tokens)
        if not params_list:
            raise InvalidParameterError("submit_group needs at least one DecodeParams")
        self.runtime.check_prompt_fits(len(prompt_tokens))
        for params in params_list:
            self.runtime.require_method(params.method)
        from selar_local.frac import use_control_vector  # the context's control vector (--method frac)

        use_control_vector(self.runtime, params_list, [seq.params for seq in self._live.values()])
        if len(params_list) > self.free_slots:
            raise RuntimeError(f"{len(params_list)} sequences need as many free slots; {self.free_slots} "
                               "are free: wait for sequences to finish or raise n_parallel")
        for params in params_list:
            self.runtime.check_thinking_params(params)
        self._check_free_caches()
        in_thinking = self.runtime.thinking_at_end(prompt_tokens)
        span = getattr(self.runtime, "thinking_span", None)
        started = time.perf_counter()
        samplers = [sampler_for(self.runtime.model, params) for params in params_list]  # bad GBNF: raises here
        out = []
        for params, sampler in zip(params_list, samplers):
            policy = make_policy(params, self.runtime.token_info, in_thinking=in_thinking)
            plan = self.slots.plan(prompt_tokens, whole_only=self.whole_prompts_only)
            self.slots.take(plan.slot)
            tracker = SpanTracker(span, bool(in_thinking))
            seq = _Sequence(self._next_request, plan.slot, params, policy, prompt_tokens,
                            SequenceOutput(TextStream(params.stop + self.runtime.stop_strings,
                                                      tracker.hold_strings), tracker),
                            started=started,
                            grammar=SequenceGrammar(sampler, params) if sampler is not None else None)
            self._next_request += 1
            self._live[seq.request_id] = seq
            source, upto = self._prefilling_source(seq, plan.reuse)
            if source is not None:  # the group's first sequence, or another request of this prompt
                seq.source, seq.wait_upto = source, upto
            else:
                self._start_from(seq, plan)
            out.append((seq.request_id, None))
        return out

    def _check_free_caches(self) -> None:
        """Trust a free slot's cache only while llama.cpp holds exactly its cells (code
        outside the loop may have used the sequence)."""
        for slot in self.slots.slots:
            if not slot.busy and slot.tokens and self.context.sequence_length(slot.seq_id) != len(slot.tokens):
                self.context.remove_sequence(slot.seq_id)
                slot.forget(0)

    def _prefilling_source(self, seq: _Sequence, reuse: int) -> tuple[_Sequence | None, int]:
        """A live sequence still prefilling a longer prefix of this prompt than any slot
        holds now: worth waiting for (its cells are then copied, not computed twice)."""
        best, best_n = None, reuse
        for other in self._live.values():
            if other is seq or not other.prefilling:
                continue
            n = common_prefix(seq.prompt_tokens, other.prompt_tokens)
            whole = n == len(seq.prompt_tokens) == len(other.prompt_tokens)  # its logits come too
            if self.whole_prompts_only and not whole:
                continue
            usable = n if whole else min(n, len(seq.prompt_tokens) - 1)
            if usable > best_n and usable > other.fed:
                best, best_n = other, usable
        return best, best_n

    def _start_from(self, seq: _Sequence, plan: Plan) -> None:
        """Apply a plan: keep or copy the reusable cells; the rest is prefilled by step()."""
        slot = seq.slot
        if plan.source is None:
            self.context.truncate_sequence(slot.seq_id, plan.reuse)
            slot.forget(plan.reuse)
        else:
            self.context.copy_sequence(plan.source.seq_id, slot.seq_id, keep=plan.reuse)
            slot.tokens = plan.source.tokens[:plan.reuse]
            slot.logits, slot.logits_at = (plan.logits, plan.reuse) if plan.logits is not None else (None, 0)
        seq.fed = seq.position = seq.cached_tokens = plan.reuse
        if plan.logits is not None:
            seq.first_logits = plan.logits

    def _resolve_waiting(self) -> None:
        for seq in list(self._live.values()):
            source = seq.source
            if source is None:
                continue
            if source.request_id in self._live and source.prefilling and source.fed < seq.wait_upto:
                continue
            seq.source = None
            self._start_from(seq, self.slots.plan(seq.prompt_tokens, slot=seq.slot,
                                                  whole_only=self.whole_prompts_only))

    def cancel(self, request_id: int) -> None:
        """Stop a sequence now and free its slot (its cells stay as prompt cache)."""
        seq = self._live.pop(request_id, None)
        if seq is not None:
            self._release_slot(seq, keep_cache=True)

    def close(self) -> None:
        """Cancel every sequence still live (their slots go back to the runtime)."""
        for request_id in list(self._live):
            self.cancel(request_id)

    def _release_slot(self, seq: _Sequence, *, keep_cache: bool) -> None:
        slot = seq.slot
        if seq.source is not None:  # never started: the slot still holds its old cache intact
            self.slots.release(slot, keep_cache=keep_cache)
            return
        self._give_back(slot, keep_cache=keep_cache)

    def _give_back(self, slot: Slot, *, keep_cache: bool) -> None:
        """Free a slot whose cells hold its tokens and maybe more: the cells past the cached
        tokens (soft inputs and what followed them) are dropped, or all of them."""
        keep_cache = keep_cache and self.slots.enabled
        self.context.truncate_sequence(slot.seq_id, len(slot.tokens) if keep_cache else 0)
        self.slots.release(slot, keep_cache=keep_cache)

    # -- stepping ---------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        """One decode for every live sequence's pending input plus the next prompt chunk
        (if any); then each sequence that has logits takes its step.

        If the shared decode fails, its parts are retried alone, so that only the one
        that cannot decode ends (with finish_reason "error"; `pop_error` gives why) and
        its neighbours go on with exactly the logits they would have had."""
        self._resolve_waiting()
        events = self._first_steps()
        # In seq_id order: with one KV stream per sequence llama.cpp puts only runs of
        # consecutive seq_ids into one ubatch (llama_batch_allocr::split_equal), and each
        # extra ubatch is another pass through the model (16 live sequences in admission
        # order [12..15, 0..11]: 2 ubatches, 100 ms a step against 85; benchmarks/ubatch_split.py).
        decoding = sorted((s for s in self._live.values() if s.pending is not None), key=_by_seq_id)
        if self.close_gaps and self._close_gaps(decoding):
            decoding.sort(key=_by_seq_id)
        pieces = self._next_pieces(len(decoding))
        if decoding or pieces:
            try:
                events += self._decode_step(decoding, pieces)
            except _DECODE_ERRORS as exc:
                if not self._room_was_made(exc):
                    events += self._step_separately(decoding, pieces)
                else:
                    events += self._decode_step(decoding, pieces)
            self._resolve_waiting()
            events += self._first_steps()
        return events

    def _close_gaps(self, decoding: list[_Sequence]) -> bool:
        """Make the live inputs' seq_ids one consecutive run, moving as few sequences as
        possible into free slots (a gap left by a finished request costs an extra ubatch
        every step: 8 live sequences with gaps took 58 against 49 ms a step, SmolLM2, one
        thread, benchmarks/ubatch_split.py; on a GPU each ubatch reads the weights again).
        A move copies the sequence's KV stream (llama_memory_seq_cp, done by llama.cpp at
        the next decode) and leaves its old slot as prompt cache of the same tokens.
        Returns whether anything moved."""
        if len(decoding) < 2 or self.context.kv_unified:
            return False
        ids = {s.seq_id for s in decoding}
        if max(ids) - min(ids) + 1 == len(ids):
            return False
        slots = self.slots.slots
        best: tuple[int, int, int] | None = None  # (moves, cached tokens given up, first seq_id)
        for start in range(len(slots) - len(ids) + 1):
            window = range(start, start + len(ids))
            if all(i in ids or not slots[i].busy for i in window):
                taken = [slots[i] for i in window if i not in ids]
                cost = (len(taken), sum(len(slot.tokens) for slot in taken), start)
                best = cost if best is None or cost < best else best
        if best is None:  # busy slots that are not decoding (prefilling, waiting) split every window
            return False
        window = range(best[2], best[2] + len(ids))
        free = [slots[i] for i in window if i not in ids]
        for seq, slot in zip([s for s in decoding if s.seq_id not in window], free):
            self._move(seq, slot)
        return True

    def _move(self, seq: _Sequence, dst: Slot) -> None:
        src = seq.slot
        self.context.copy_sequence(src.seq_id, dst.seq_id)  # what dst cached is given up
        dst.tokens, dst.logits, dst.logits_at = list(src.tokens), src.logits, src.logits_at
        self.slots.take(dst)
        seq.slot = dst
        self._give_back(src, keep_cache=True)  # the old cells stay as the cache of the tokens so far

    def _next_pieces(self, n_decoding: int) -> list[_Piece]:
        """The next prompt tokens to feed: one chunk while others decode (so no stream
        waits for a whole prompt), a full batch when nothing else is live. One prompt per
        step, the oldest first, so that each prompt's chunks start at multiples of the
        chunk size from where its prefill began (see `_decode_tokens` for why)."""
        budget = min(self.prefill_chunk if n_decoding else self.context.n_batch, self.context.n_batch)
        for seq in self._live.values():  # admission order
            if seq.prefilling:
                return [_Piece(seq, seq.fed, min(len(seq.prompt_tokens), seq.fed + budget))]
        return []

    def _decode_step(self, decoding: list[_Sequence], pieces: list[_Piece]) -> list[StepEvent]:
        ctx = self.context
        n_prompt = sum(p.stop - p.start for p in pieces)
        # One decode for both only in a unified KV cache: with one KV stream per sequence
        # llama.cpp splits a batch that spans streams unevenly into several ubatches, and a
        # 64-token chunk plus 4 live inputs took 519 ms merged against 320 + 30 ms apart
        # (SmolLM2, 1 thread); unified, 347 ms merged against 314 + 31 ms apart.
        # Merged, the live rows must stay off the 64-row tiles (see `_decode_tokens`).
        merged = (pieces and ctx.kv_unified and not any(s.pending.soft for s in decoding)
                  and len(decoding) + n_prompt <= ctx.n_batch
                  and (n_prompt % TILE_ROWS == 0 or n_prompt + len(decoding) < TILE_ROWS)
                  and len(decoding) < TILE_ROWS)
        if merged:  # one token batch: the chunk first, then the live inputs
            self._decode_tokens(decoding, pieces)
            self._since_soft += 1
            n_completing = sum(p.completes for p in pieces)
            self._after_prompt(pieces, 0)
            return self._after_inputs(decoding, n_completing)
        if pieces:
            self._decode_tokens([], pieces)
            self._after_prompt(pieces, 0)  # copies the logits it keeps before the next decode
        if not decoding:
            return []
        self._decode_inputs(decoding)
        return self._after_inputs(decoding, 0)

    def _decode_tokens(self, decoding: list[_Sequence], pieces: list[_Piece]) -> None:
        """Prompt pieces first, live inputs last. The order matters for exactness: ggml's
        CPU matrix kernels split a batch's rows into tiles and leftover rows, computed
        along paths whose results differ in the last bits. Chunks of a multiple of 64
        tokens from where a prefill began reproduced an unchunked prefill's logits exactly
        on the tests' prompts (16-48-token chunks moved them by up to 0.6), though not in
        every case (see generate_many); live inputs placed after the chunk keep the path
        of a plain decode step."""
        tokens, positions, seq_ids, want = [], [], [], []
        for p in pieces:
            n = p.stop - p.start
            tokens += p.seq.prompt_tokens[p.start:p.stop]
            positions += range(p.start, p.stop)
            seq_ids += [p.seq.seq_id] * n
            want += [False] * (n - 1) + [p.completes]
        tokens += [s.pending.token for s in decoding]
        positions += [s.position for s in decoding]
        seq_ids += [s.seq_id for s in decoding]
        want += [True] * len(decoding)
        self.context.decode_tokens(tokens, positions, seq_ids, want)

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

    def _after_prompt(self, pieces: list[_Piece], first_output: int) -> None:
        """Record the prompt cells just computed; keep the logits of each finished prompt
        (a copy: the first step, and later requests of the same prompt, read it)."""
        completing = [p for p in pieces if p.completes]
        rows = self.context.logits_rows(first_output + len(completing)) if completing else None
        j = first_output
        for p in pieces:
            seq = p.seq
            seq.fed = seq.position = p.stop
            seq.slot.tokens.extend(seq.prompt_tokens[p.start:p.stop])
            if p.completes:
                logits = rows[j].copy()
                logits.flags.writeable = False
                seq.slot.logits, seq.slot.logits_at = logits, p.stop
                seq.first_logits = logits
                j += 1

    def _after_inputs(self, decoding: list[_Sequence], first_output: int) -> list[StepEvent]:
        """The live sequences' outputs are first_output.. first_output + len(decoding) - 1."""
        if not decoding:
            return []
        for s in decoding:
            d = s.pending
            if s.extends_cache:
                if d.soft:
                    s.extends_cache = False
                elif len(s.slot.tokens) == s.position:
                    s.slot.tokens.append(d.token)
            s.position += 1
        rows = self.context.logits_rows(first_output + len(decoding))[first_output:]
        events = []
        for s, d in zip(decoding, self._decide(decoding, rows)):
            event = self._apply(s, d)
            if event is not None:
                events.append(event)
        return events

    def _decide(self, seqs: list[_Sequence], rows) -> list[StepDecision]:
        """Each sequence's policy on its logits row: one batch-wide pass, or one by one.
        A thinking span that must close (budget spent, close marker pending, Cold Stop)
        overrides the policy with the marker's tokens."""
        rows = np.asarray(rows) if not isinstance(rows, np.ndarray) else rows
        banned = [i for i, s in enumerate(seqs) if s.params.ignore_eos]
        if banned:
            # In place: the rows are either llama.cpp's output buffer, read by nobody else
            # before the next decode (kept prompt logits were copied out already), or a fresh
            # stack of kept logits. A copy of 16 x 49k logits cost ~1.5 ms a step.
            if not rows.flags.writeable:
                rows = rows.copy()
            rows[np.ix_(banned, self._eog_list)] = -np.inf
        out: list[StepDecision | None] = [None] * len(seqs)
        plain = []
        for i, s in enumerate(seqs):
            if self._must_close(s):
                out[i] = self._forced_close(s, rows[i])
            else:
                s.policy.in_thinking = s.out.span.in_thinking
                plain.append(i)
        if self.batch_wide and len(plain) > 1:
            decided = decide_all([seqs[i].policy for i in plain], rows[plain])
        else:
            decided = [seqs[i].policy.step(rows[i]) for i in plain]
        for i, decision in zip(plain, decided):
            policy = seqs[i].policy
            if getattr(policy, "close_requested", False):  # Soft Thinking's Cold Stop
                policy.close_requested = False
                if seqs[i].out.span.in_span:
                    decision = self._forced_close(seqs[i], rows[i])
            if seqs[i].grammar is not None:  # -- grammar seam (issue 23): constrain what is shown --
                decision = seqs[i].grammar.adjust(decision, policy, rows[i], seqs[i].out.span)
            out[i] = decision
        return out  # type: ignore[return-value]

    def _first_steps(self) -> list[StepEvent]:
        """Sequences whose prompt logits are known (just prefilled, cached, or copied)."""
        ready = [s for s in self._live.values() if s.first_logits is not None]
        if not ready:
            return []
        now = time.perf_counter()
        rows = [s.first_logits for s in ready]
        for seq in ready:
            seq.first_logits, seq.prefill_seconds = None, now - seq.started
        events = []
        for seq, decision in zip(ready, self._decide(ready, np.stack(rows) if len(rows) > 1 else rows)):
            event = self._apply(seq, decision)
            if event is not None:
                events.append(event)
        return events

    def _room_was_made(self, exc: BaseException) -> bool:
        """A unified KV cache without free cells: give back the free slots' cached cells
        and let the caller retry once."""
        if not (isinstance(exc, DecodeError) and exc.status == 1):
            return False
        freed = [s for s in self.slots.slots if not s.busy and s.tokens]
        for slot in freed:
            self.context.remove_sequence(slot.seq_id)
        return self.slots.forget_free() > 0

    def _step_separately(self, decoding: list[_Sequence], pieces: list[_Piece]) -> list[StepEvent]:
        """The shared decode failed: each prompt piece alone, then the live inputs
        together, then each alone; only what cannot decode ends, with an error."""
        events = []
        for piece in pieces:
            try:
                self._decode_tokens([], [piece])
            except _DECODE_ERRORS as exc:
                events.append(self._fail(piece.seq, exc))
                continue
            self._after_prompt([piece], 0)
        if not decoding:
            return events
        try:
            self._decode_inputs(decoding)
            return events + self._after_inputs(decoding, 0)
        except _DECODE_ERRORS as exc:
            if len(decoding) == 1:
                return events + [self._fail(decoding[0], exc)]
        for s in decoding:
            try:
                self._decode_inputs([s])
            except _DECODE_ERRORS as exc:
                events.append(self._fail(s, exc))
                continue
            events += self._after_inputs([s], 0)
        return events

    def _fail(self, seq: _Sequence, exc: BaseException) -> StepEvent:
        """End one sequence whose input could not be decoded; its slot and cells are freed."""
        self._errors[seq.request_id] = exc
        seq.finish_reason = "error"
        seq.pending = None
        self._live.pop(seq.request_id, None)
        self._release_slot(seq, keep_cache=False)
        self._finished[seq.request_id] = seq
        return StepEvent(seq.request_id, len(seq.out.tokens), -1, seq.out.text.finish(), False, 0.0, (), (),
                         finish_reason="error")

    def pop_error(self, request_id: int) -> BaseException:
        """Why a sequence ended with finish_reason "error" (its result is dropped)."""
        self._finished.pop(request_id, None)
        return self._errors.pop(request_id)

    def _must_close(self, seq: _Sequence) -> bool:
        """The thinking span must close now: close-marker tokens pending, or the
        max_think_tokens budget spent."""
        budget = seq.params.max_think_tokens
        return bool(seq.forced) or (budget is not None and seq.out.span.in_span and seq.out.span.think_tokens >= budget)

    def _forced_close(self, seq: _Sequence, logits: np.ndarray) -> StepDecision:
        """Emit the close marker (and the answer's opening) token by token as discrete
        steps, as the Soft Thinking and SwiReasoning code do."""
        if not seq.forced:
            seq.forced = list(seq.out.span.span.forced_close)
        return seq.policy.forced_step(logits, seq.forced.pop(0))

    def _apply(self, seq: _Sequence, decision: StepDecision) -> StepEvent | None:
        """Take the policy's decision: stop conditions, the output, the event."""
        out = seq.out
        index = len(out.tokens)
        if seq.grammar is not None:  # -- grammar seam (issue 23): advance past the shown token --
            seq.grammar.commit(decision.token)
        if decision.token in self._eog_ids:  # not part of the output: no log-probability either
            return self._finish(seq, decision, index, "stop", out.text.finish())
        logprobs = self._logprobs(seq, decision)
        thinking = out.span.in_span
        text, stopped = out.add(decision, self.runtime.model.token_bytes(decision.token), logprobs)
        if stopped:
            return self._finish(seq, decision, index, "stop", text, logprobs)
        if (decision.final or len(out.tokens) >= seq.params.max_tokens
                or seq.position + 1 > self.context.n_ctx):
            return self._finish(seq, decision, index, "length", text + out.text.finish(), logprobs)
        if decision.soft:
            out.add_soft_input(decision.mix_weights)
        seq.pending = decision
        return step_event(seq.request_id, index, decision, text, decision.soft, None, logprobs,
                          out.split(thinking))

    def _finish(self, seq: _Sequence, decision: StepDecision, index: int, reason: str, text: str,
                logprobs: tuple[float, tuple] | None = None) -> StepEvent:
        seq.finish_reason = reason
        seq.pending = None
        self._live.pop(seq.request_id, None)
        self._release_slot(seq, keep_cache=True)
        self._finished[seq.request_id] = seq
        return step_event(seq.request_id, index, decision, text, False, reason, logprobs,
                          seq.out.split(seq.out.thinking_at(index), final=True))

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
        return seq.out.result(prompt_tokens=len(seq.prompt_tokens), finish_reason=seq.finish_reason or "stop",
                              prefill_seconds=seq.prefill_seconds, decode_seconds=decode_seconds,
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
            for event in generator.step():
                collect(event)
    finally:
        generator.close()  # the other sequences' slots go back to the runtime
    return results  # type: ignore[return-value]


def _by_seq_id(seq: _Sequence) -> int:
    return seq.seq_id
