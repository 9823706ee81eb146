"""The loop's sequences: each one's phase and queue of segments, and the table that owns
them (admission, slots, the prompt cache, waiting for a shared prompt, gap moves).

A sequence's phase is explicit (llama.cpp's server keeps a `slot_state` the same way):

    WAITING     for another sequence's prompt cells, to copy them (llama_memory_seq_cp)
    PREFILLING  prompt chunks still to feed
    READY       its logits are known without a decode (prompt just done, cached or copied)
    DECODING    an input is pending for the next decode
    FINISHED    ended (stop, length, error or cancelled)

and what it does next is the front of its queue of segments:

    Prefill(tokens)  feed these tokens (the prompt), in chunks
    Decode           generate: the policy decides every step, until a stop condition
    Force(tokens)    show and feed these tokens, one a step, whatever the logits say: the
                     thinking span's close marker (thinking budget, Cold Stop) and tokens a
                     policy asks to force (SwiReasoning's answer prefix); pushed in front
    Latent(n)        n steps that show no token: the policy turns each step's final hidden
                     state into the next input (`latent`, latent_policy.py)

A sequence starts as [Prefill(prompt), Decode], or [Prefill(prompt), Latent(m), Decode]
for a policy with latent steps. A prompt of several turns (turns.TurnPrompt, `latentmas`)
queues [Prefill(turn 0), Latent(m), Prefill(turn 1), Latent(m), ..., Prefill(last), Decode]:
after a Latent segment's last input is decoded the sequence is PREFILLING again (that
decode's logits are not needed), and the next turn's tokens go in chunks as a prompt does.
A new kind of step is one more segment class and its branch where the loop reads the
front (decisions.py for decided steps, the table's `next_pieces` for fed ones).

Pure bookkeeping over the engine's KV calls (context.truncate/copy/remove_sequence):
no logits or policies are read here.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from selar_local.constraint import SequenceGrammar
from selar_local.errors import DecodeError, InvalidParameterError
from selar_local.kv_slots import Plan, Slot, SlotTable, common_prefix
from selar_local.outputs import SequenceOutput
from selar_local.params import DecodeParams
from selar_local.policies import Policy, StepDecision
from selar_local.turns import total_prompt_tokens


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    READY = "ready"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Prefill:
    """Tokens to feed; `fed` of them have KV cells already."""

    tokens: list[int]
    fed: int = 0
    turn: int = 0   # 0: the prompt; later turns (TurnPrompt.later) follow latent steps


@dataclass(eq=False)
class Decode:
    """Generate: the policy decides each step until a stop condition."""


@dataclass(eq=False)
class Force:
    """Tokens shown and fed one a step as discrete inputs, whatever the logits say.
    `constrained`: a grammar may still replace them (tokens a policy asked for, which stand
    for its proposals); the loop's own markers (the span's close) pass unchanged."""

    tokens: deque[int]
    constrained: bool = False


@dataclass(eq=False)
class Latent:
    """Steps that show no token: the policy's `latent_step(logits, hidden)` gives each
    one's input. Queued after the prompt for a policy with `latent_steps`."""

    left: int


Segment = Union[Prefill, Decode, Force, Latent]


@dataclass(eq=False)
class Sequence:
    request_id: int
    slot: Slot
    params: DecodeParams
    policy: Policy
    prompt_tokens: list[int]
    out: SequenceOutput                     # tokens, text, thinking split, logprobs (outputs.py)
    grammar: SequenceGrammar | None = None  # a constrained answer (constraint.py)
    started: float = 0.0
    phase: Phase = Phase.PREFILLING
    segments: deque[Segment] = field(default_factory=deque)
    position: int = 0                       # position of the next input
    source: "Sequence | None" = None        # WAITING: for this sequence's prompt cells ...
    wait_upto: int = 0                      # ... up to here
    first_logits: np.ndarray | None = None  # READY: the logits of the first step
    first_hidden: np.ndarray | None = None  # READY, for a policy that reads the hidden state
    cached_tokens: int = 0                  # prompt tokens not prefilled (cache or copy)
    extends_cache: bool = True              # no soft input fed yet: the slot caches the tokens
    pending: StepDecision | None = None     # DECODING: the decision whose input goes next
    finish_reason: str | None = None
    prefill_seconds: float | None = None    # until the first step (a later turn's prefill is decoding time)

    @property
    def seq_id(self) -> int:
        return self.slot.seq_id

    @property
    def prefill(self) -> Prefill | None:
        front = self.segments[0] if self.segments else None
        return front if isinstance(front, Prefill) else None

    @property
    def prompt_total(self) -> int:
        """Prompt tokens over every turn (a TurnPrompt's later ones too)."""
        return total_prompt_tokens(self.prompt_tokens)

    @property
    def prefilling_prompt(self) -> bool:
        """Prefilling its first prompt (whose cells another sequence of it may copy)."""
        front = self.prefill
        return self.phase is Phase.PREFILLING and front is not None and front.turn == 0

    @property
    def latent(self) -> Latent | None:
        front = self.segments[0] if self.segments else None
        return front if isinstance(front, Latent) else None

    def force(self, tokens, *, constrained: bool = False) -> None:
        """Force these tokens next, after any already forced."""
        front = self.segments[0] if self.segments else None
        if isinstance(front, Force) and front.constrained == constrained:
            front.tokens.extend(tokens)
        elif isinstance(front, Force):
            self.segments.insert(1, Force(deque(tokens), constrained))
        else:
            self.segments.appendleft(Force(deque(tokens), constrained))

    def next_forced(self) -> tuple[int, bool] | None:
        """The token a Force segment at the front shows now (taken off it) and whether a
        grammar may replace it, or None."""
        front = self.segments[0] if self.segments else None
        if not isinstance(front, Force):
            return None
        token = front.tokens.popleft()
        if not front.tokens:
            self.segments.popleft()
        return token, front.constrained


@dataclass
class Piece:
    """Part of one sequence's Prefill segment in this step's batch."""

    seq: Sequence
    start: int
    stop: int

    @property
    def completes(self) -> bool:
        return self.stop == len(self.seq.prefill.tokens)

    @property
    def tokens(self) -> list[int]:
        return self.seq.prefill.tokens[self.start:self.stop]


class SequenceTable:
    """The live sequences and their slots: admission with prefix reuse, waiting for a
    prompt another sequence is prefilling, which prompt chunk goes next, gap moves, and
    giving slots back (their cells kept as prompt cache)."""

    def __init__(self, context: Any, slots: SlotTable, *, prefill_chunk: int, whole_prompts_only: bool,
                 close_gaps: bool):
        self.context = context
        self.slots = slots
        self.prefill_chunk = prefill_chunk
        # Reuse cells only for a whole prompt with its logits (exact), never a partial prefix
        # (the rest would be batched differently from a fresh prefill): batch jobs.
        self.whole_prompts_only = whole_prompts_only
        # Move live sequences into free slots so that their seq_ids stay consecutive (_close_gaps).
        self.close_gaps = close_gaps
        self.live: dict[int, Sequence] = {}  # admitted and not ended, in admission order

    # -- admission --------------------------------------------------------------------
    def plan(self, prompt_tokens: list[int]) -> Plan:
        """A slot for this prompt (taken now) and what of it can be reused."""
        plan = self.slots.plan(prompt_tokens, whole_only=self.whole_prompts_only)
        self.slots.take(plan.slot)
        return plan

    def admit(self, seq: Sequence, plan: Plan, segments: list[Segment] | None = None) -> None:
        """`segments`: its queue (queued_segments, made before the slot was taken, since it
        can refuse the request); by default the prompt then Decode."""
        seq.segments.extend(segments if segments is not None else (Prefill(seq.prompt_tokens), Decode()))
        self.live[seq.request_id] = seq
        source, upto = self._prefilling_source(seq, plan.reuse)
        if source is not None:  # the group's first sequence, or another request of this prompt
            seq.source, seq.wait_upto, seq.phase = source, upto, Phase.WAITING
        else:
            self._start_from(seq, plan)

    def check_free_caches(self) -> None:
        """Trust a free slot's cache only while llama.cpp holds exactly its cells (code
        outside the loop may have used the sequence)."""
        for slot in self.slots.slots:
            if not slot.busy and slot.tokens and self.context.sequence_length(slot.seq_id) != len(slot.tokens):
                self.context.remove_sequence(slot.seq_id)
                slot.forget(0)

    def _prefilling_source(self, seq: Sequence, reuse: int) -> tuple[Sequence | None, int]:
        """A live sequence still prefilling a longer prefix of this prompt than any slot
        holds now: worth waiting for (its cells are then copied, not computed twice)."""
        best, best_n = None, reuse
        for other in self.live.values():
            if other is seq or not other.prefilling_prompt:
                continue
            n = common_prefix(seq.prompt_tokens, other.prompt_tokens)
            whole = n == len(seq.prompt_tokens) == len(other.prompt_tokens)  # its logits come too
            if self.whole_prompts_only and not whole:
                continue
            usable = n if whole else min(n, len(seq.prompt_tokens) - 1)
            if usable > best_n and usable > other.prefill.fed:
                best, best_n = other, usable
        return best, best_n

    def _start_from(self, seq: Sequence, plan: Plan) -> None:
        """Apply a plan: keep or copy the reusable cells; the rest is prefilled by step()."""
        if plan.logits is not None and seq.policy.needs_hidden:
            # Slots keep a prompt's logits, not its hidden state: decode its last token again.
            plan = Plan(plan.slot, plan.reuse - 1, plan.source)
        slot = seq.slot
        if plan.source is None:
            self.context.truncate_sequence(slot.seq_id, plan.reuse)
            slot.forget(plan.reuse)
        else:
            self.context.copy_sequence(plan.source.seq_id, slot.seq_id, keep=plan.reuse)
            slot.tokens = plan.source.tokens[:plan.reuse]
            slot.logits, slot.logits_at = (plan.logits, plan.reuse) if plan.logits is not None else (None, 0)
        seq.prefill.fed = seq.position = seq.cached_tokens = plan.reuse
        seq.phase = Phase.PREFILLING
        if plan.logits is not None:  # the whole prompt: its cells and its logits
            seq.segments.popleft()
            seq.first_logits, seq.phase = plan.logits, Phase.READY

    def resolve_waiting(self) -> None:
        for seq in list(self.live.values()):
            source = seq.source
            if source is None:
                continue
            if (source.request_id in self.live and source.prefilling_prompt
                    and source.prefill.fed < seq.wait_upto):
                continue
            seq.source = None
            self._start_from(seq, self.slots.plan(seq.prompt_tokens, slot=seq.slot,
                                                  whole_only=self.whole_prompts_only))

    # -- planning a step --------------------------------------------------------------
    def ready(self) -> list[Sequence]:
        """Sequences whose logits are known without a decode, in admission order."""
        return [s for s in self.live.values() if s.phase is Phase.READY]

    def decoding(self) -> list[Sequence]:
        """The live inputs of this step in seq_id order, gaps closed first.

        With one KV stream per sequence llama.cpp puts only runs of consecutive seq_ids into
        one ubatch (llama_batch_allocr::split_equal), and each extra ubatch is another pass
        through the model (16 live sequences in admission order [12..15, 0..11]: 2 ubatches,
        100 ms a step against 85; benchmarks/ubatch_split.py)."""
        decoding = sorted((s for s in self.live.values() if s.phase is Phase.DECODING), key=_by_seq_id)
        if self.close_gaps and self._close_gaps(decoding):
            decoding.sort(key=_by_seq_id)
        return decoding

    def next_pieces(self, n_decoding: int) -> list[Piece]:
        """The next prompt tokens to feed: one chunk while others decode (so no stream
        waits for a whole prompt), a full batch when nothing else is live. One prompt per
        step, the oldest first, so that each prompt's chunks start at multiples of the
        chunk size from where its prefill began (see BatchRunner._decode_tokens for why)."""
        budget = min(self.prefill_chunk if n_decoding else self.context.n_batch, self.context.n_batch)
        for seq in self.live.values():  # admission order
            if seq.phase is Phase.PREFILLING:
                fed = seq.prefill.fed
                return [Piece(seq, fed, min(len(seq.prefill.tokens), fed + budget))]
        return []

    def _close_gaps(self, decoding: list[Sequence]) -> bool:
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

    def _move(self, seq: Sequence, dst: Slot) -> None:
        src = seq.slot
        self.context.copy_sequence(src.seq_id, dst.seq_id)  # what dst cached is given up
        dst.tokens, dst.logits, dst.logits_at = list(src.tokens), src.logits, src.logits_at
        self.slots.take(dst)
        seq.slot = dst
        self._give_back(src, keep_cache=True)  # the old cells stay as the cache of the tokens so far

    # -- after a decode ---------------------------------------------------------------
    def record_prompt(self, pieces: list[Piece], logits: list[np.ndarray],
                      hidden: list[np.ndarray] | None = None) -> None:
        """The pieces' cells exist now; a completed prompt's logits (copies, one per
        completing piece) make its sequence READY and stay in its slot as prompt cache."""
        j = 0
        for p in pieces:
            seq, segment = p.seq, p.seq.prefill
            if seq.extends_cache and len(seq.slot.tokens) == seq.position:
                seq.slot.tokens.extend(p.tokens)
            segment.fed = p.stop
            seq.position += p.stop - p.start
            if p.completes:
                if segment.turn == 0:  # a later turn's logits follow latent inputs: nothing to cache
                    seq.slot.logits, seq.slot.logits_at = logits[j], seq.position
                seq.first_logits = logits[j]
                seq.first_hidden = hidden[j] if hidden is not None else None
                seq.segments.popleft()
                seq.phase = Phase.READY
                j += 1

    @staticmethod
    def advance(decoding: list[Sequence]) -> set[int] | None:
        """The pending inputs were decoded: the next position; the slot caches the token
        (until the first soft input, see kv_slots). A sequence whose next segment is a
        later turn is PREFILLING again: the indices of those, or None (every step but a
        latentmas turn's end)."""
        to_prefill = None
        for i, s in enumerate(decoding):
            d = s.pending
            if s.extends_cache:
                if d.soft:
                    s.extends_cache = False
                elif len(s.slot.tokens) == s.position:
                    s.slot.tokens.append(d.token)
            s.position += 1
            if d.token < 0 and s.prefill is not None:  # a latent input, the last before a later turn
                s.phase, s.pending = Phase.PREFILLING, None
                to_prefill = (to_prefill or set()) | {i}
        return to_prefill

    def room_was_made(self, exc: BaseException) -> bool:
        """A unified KV cache without free cells: give back the free slots' cached cells
        and let the caller retry once."""
        if not (isinstance(exc, DecodeError) and exc.status == 1):
            return False
        for slot in self.slots.slots:
            if not slot.busy and slot.tokens:
                self.context.remove_sequence(slot.seq_id)
        return self.slots.forget_free() > 0

    # -- ending -----------------------------------------------------------------------
    def end(self, seq: Sequence, *, keep_cache: bool) -> None:
        """The sequence leaves the table; its slot is free (its cells kept as prompt cache
        up to its cached tokens, or dropped)."""
        seq.phase, seq.pending = Phase.FINISHED, None
        self.live.pop(seq.request_id, None)
        if seq.source is not None:  # never started: the slot still holds its old cache intact
            self.slots.release(seq.slot, keep_cache=keep_cache)
            return
        self._give_back(seq.slot, keep_cache=keep_cache)

    def _give_back(self, slot: Slot, *, keep_cache: bool) -> None:
        """Free a slot whose cells hold its tokens and maybe more: the cells past the cached
        tokens (soft inputs and what followed them) are dropped, or all of them."""
        keep_cache = keep_cache and self.slots.enabled
        self.context.truncate_sequence(slot.seq_id, len(slot.tokens) if keep_cache else 0)
        self.slots.release(slot, keep_cache=keep_cache)

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


def queued_segments(prompt: list[int], later_turns: tuple[list[int], ...], policy: Policy) -> list[Segment]:
    """A new sequence's queue: its prompt, and for a prompt of several turns each later turn
    after `latent_steps_per_turn` latent steps; a policy's `latent_steps` that are not
    spread over turns come after the last turn, before the text."""
    per_turn = getattr(policy, "latent_steps_per_turn", 0)
    if getattr(policy, "takes_turns", False) and not later_turns:
        raise InvalidParameterError("method 'latentmas' runs its roles' turns over one sequence: it needs a chat "
                                    "request (messages), not a raw prompt")
    if later_turns and not getattr(policy, "takes_turns", False):
        raise InvalidParameterError(f"a prompt of {1 + len(later_turns)} turns needs a method that takes turns (latentmas)")
    if later_turns and per_turn < 1:  # two Prefills in a row would leave the first one's logits undecided
        raise InvalidParameterError("a prompt of several turns needs at least one latent step between turns")
    segments: list[Segment] = [Prefill(prompt)]
    for turn, tokens in enumerate(later_turns, start=1):
        segments += [Latent(per_turn), Prefill(tokens, turn=turn)]
    after = getattr(policy, "latent_steps", 0) - per_turn * len(later_turns)
    if after:
        segments.append(Latent(after))
    segments.append(Decode())
    return segments


def _by_seq_id(seq: Sequence) -> int:
    return seq.seq_id
