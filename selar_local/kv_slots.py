"""What each sequence slot of a context holds in its KV cells: the prompt cache.

A slot keeps its cells after its request ends (like llama-server's `cache_prompt`): it
remembers the token ids whose cells it holds at positions 0..n-1 and, when it has them,
the logits that followed its last prompt token. A new request goes to the free slot whose
cached tokens share the longest prefix with its prompt (least recently used on a tie), or
copies that prefix from another slot that holds more of it, and prefills only the rest.

Soft steps end the cached history: a soft input is a mixture of embedding rows, which
no later prompt (token ids, the shown text re-rendered) can name, and keeping cells that
came from it would make the next turn's answer depend on how the previous one was
decoded. So a slot's tokens are its prompt plus the discrete inputs fed before the first
soft one, and its cells past that point are dropped when the request ends.

Pure bookkeeping, no llama.cpp: the generation loop applies the plans to the context and
checks the cell counts against llama.cpp's (`sequence_length`) before trusting a cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    if n < 64:
        for i in range(n):
            if a[i] != b[i]:
                return i
        return n
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


@dataclass
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # ids whose cells the slot holds, positions 0..n-1
    logits: np.ndarray | None = None  # the logits that followed tokens[:logits_at] (a copy)
    logits_at: int = 0
    busy: bool = False
    last_used: int = 0

    def forget(self, keep: int = 0) -> None:
        """Keep only the first `keep` tokens (their logits too, if they end there or later)."""
        del self.tokens[keep:]
        if self.logits_at > keep:
            self.logits, self.logits_at = None, 0


@dataclass(frozen=True)
class Plan:
    """Where a new prompt starts: `reuse` tokens need no prefill; they are already in the
    chosen slot (source None), or are copied from the source slot. `logits` is set when the
    whole prompt is reused and its last logits are known: no decode at all before the
    first step."""

    slot: Slot
    reuse: int
    source: Slot | None = None
    logits: np.ndarray | None = None


class SlotTable:
    """The slots of one context and what each holds (see the module docstring)."""

    def __init__(self, n_slots: int, *, enabled: bool = True):
        self.slots = [Slot(i) for i in range(n_slots)]
        # False: no prompt cache; a request's cells go when it ends (live sequences of one
        # prompt still share theirs: n, seeds, self-consistency)
        self.enabled = enabled
        self._clock = 0

    @property
    def n_free(self) -> int:
        return sum(not s.busy for s in self.slots)

    def reusable(self, slot: Slot, prompt: Sequence[int], *, whole_only: bool = False) -> tuple[int, np.ndarray | None]:
        """Tokens of `prompt` this slot's cells can stand for, and the logits after them
        when the whole prompt is covered. At least the last prompt token is decoded again
        unless its logits were kept (the first step needs them)."""
        if not self.enabled and not slot.busy:  # no cache: only live sequences share cells
            return 0, None
        n = common_prefix(slot.tokens, prompt)
        if n == len(prompt) and slot.logits is not None and slot.logits_at == n:
            return n, slot.logits
        if whole_only:  # a partial prefix changes how the rest is batched, hence the last bits
            return 0, None
        return min(n, len(prompt) - 1), None

    def plan(self, prompt: Sequence[int], slot: Slot | None = None, *, whole_only: bool = False) -> Plan:
        """The slot for `prompt` (the given one, or the free slot that can reuse the most,
        see `_preference` for ties) and the longest prefix it can start from: its own
        cells, or cells copied from another slot that holds more (busy ones included:
        their cells up to len(tokens) are computed). Does not mark the slot busy."""
        if slot is None:
            free = [s for s in self.slots if not s.busy]
            if not free:
                raise RuntimeError("no free sequence slot")
            scored = [(self.reusable(s, prompt, whole_only=whole_only), s) for s in free]
            (reuse, logits), slot = max(scored, key=lambda item: _preference(*item))
        else:
            reuse, logits = self.reusable(slot, prompt, whole_only=whole_only)
        best = Plan(slot, reuse, None, logits)
        for other in self.slots:
            if other is slot:
                continue
            n, other_logits = self.reusable(other, prompt, whole_only=whole_only)
            if n > best.reuse or (n == best.reuse and other_logits is not None and best.logits is None):
                best = Plan(slot, n, other, other_logits)
        return best

    def take(self, slot: Slot) -> None:
        self._clock += 1
        slot.busy, slot.last_used = True, self._clock

    def release(self, slot: Slot, *, keep_cache: bool) -> None:
        slot.busy = False
        if not keep_cache or not self.enabled:
            slot.forget(0)

    def forget_free(self) -> int:
        """Drop every free slot's cache (a unified KV cache ran out of cells); returns how
        many slots had cells to give back."""
        dropped = 0
        for slot in self.slots:
            if not slot.busy and slot.tokens:
                slot.forget(0)
                dropped += 1
        return dropped


def _preference(reusable: tuple[int, np.ndarray | None], slot: Slot) -> tuple:
    """Among free slots: the most reusable prefix, then known logits; on a tie, an empty
    slot (nothing cached is lost) with the lowest seq_id, else the least recently used
    cache. Lowest ids first keep the live seq_ids consecutive: with one KV stream per
    sequence llama.cpp decodes each run of consecutive seq_ids as its own ubatch."""
    reuse, logits = reusable
    empty = not slot.tokens
    return reuse, logits is not None, empty, -slot.seq_id if empty else -slot.last_used
