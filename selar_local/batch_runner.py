"""The batch runner: one step's inputs into the engine's batches, one `llama_decode` for
the live sequences and the next prompt chunk, and the outputs read back.

Inputs are token ids when every one is discrete, otherwise embedding rows: `input_row`
turns any next input (Token, Mixture or Vector, policies.py) into one row, a discrete
input riding as its exact table row (the load-time self-check proves the two paths give
identical logits). A prompt chunk shares the live sequences' decode in a unified KV cache
when their inputs are tokens (a batch holds either token ids or embedding rows);
otherwise it is decoded just before it (see `run` for the measurement).

What comes back (`RunOutput`): a copy of the logits of each prompt that completed (the
first step and later requests of the same prompt read them), and a zero-copy view of the
live inputs' logits rows, valid until the next decode; the final hidden state's rows too
when a policy reads them (`needs_hidden`). Hidden output is the engine's
(`set_hidden_output`, `output_rows`, `hidden_rows`): switched on only around the steps that
read it (a switch rebuilds llama.cpp's graph, and while it is on every input of a batch
is an output), and never for a merged batch, so that a prompt's rows are found by
`output_rows`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from selar_local.policies import Mixture, NextInput, Token, Vector
from selar_local.sequences import Piece, Sequence

TILE_ROWS = 64  # rows of one tile of ggml's CPU matrix kernels (see BatchRunner._decode_tokens)


def input_row(row: np.ndarray, next_input: NextInput, table: Any) -> None:
    """Write one next input into an embedding batch row: a token's table row, a mixture
    of table rows, or the method's own vector."""
    if isinstance(next_input, Token):
        row[:] = table.row(next_input.id)
    elif isinstance(next_input, Mixture):
        table.mix(next_input.ids, next_input.weights, out=row)
    elif isinstance(next_input, Vector):
        row[:] = next_input.values
    else:
        raise TypeError(f"not a next input: {next_input!r}")


class RunOutput(NamedTuple):
    prompt_logits: list[np.ndarray]        # copies, one per completing piece, in piece order
    rows: np.ndarray | None                # the live inputs' logits rows (a view) or None
    hidden: np.ndarray | None = None       # their final hidden state, when asked
    prompt_hidden: list[np.ndarray] | None = None


class BatchRunner:
    """Assembles and decodes one step's batch in one context."""

    # After a soft step, discrete inputs keep riding as table rows for this many steps
    # (when rows are exact) instead of switching back to a token batch: llama.cpp
    # rebuilds its graph whenever the input kind changes between consecutive decodes.
    STICKY_EMBEDDING_STEPS = 16

    def __init__(self, context: Any, table: Any, *, rows_exact: bool):
        self.context = context
        self.table = table
        # Rows may stand in for tokens without changing a single logit only where the
        # load-time self-check found the two paths bit-identical (max |diff| == 0).
        self.rows_exact = rows_exact
        self._since_soft = self.STICKY_EMBEDDING_STEPS  # steps since the last soft input

    def run(self, decoding: list[Sequence], pieces: list[Piece]) -> RunOutput:
        """Decode the live sequences' pending inputs and the prompt pieces. Hidden output is
        on for a part of the step only where a policy reads it (`needs_hidden`): the live
        inputs of such a sequence, or a prompt such a sequence completes now."""
        ctx = self.context
        n_prompt = sum(p.stop - p.start for p in pieces)
        # One decode for both only in a unified KV cache: with one KV stream per sequence
        # llama.cpp splits a batch that spans streams unevenly into several ubatches, and a
        # 64-token chunk plus 4 live inputs took 519 ms merged against 320 + 30 ms apart
        # (SmolLM2, 1 thread); unified, 347 ms merged against 314 + 31 ms apart.
        # Merged, the live rows must stay off the 64-row tiles (see `_decode_tokens`).
        live_hidden = any(s.policy.needs_hidden for s in decoding)
        prompt_hidden_read = any(p.completes and p.seq.policy.needs_hidden for p in pieces)
        merged = (pieces and ctx.kv_unified and not live_hidden and not prompt_hidden_read
                  and not any(s.pending.soft for s in decoding)
                  and len(decoding) + n_prompt <= ctx.n_batch
                  and (n_prompt % TILE_ROWS == 0 or n_prompt + len(decoding) < TILE_ROWS)
                  and len(decoding) < TILE_ROWS)
        if merged:  # one token batch: the chunk first, then the live inputs
            self._set_hidden(False)
            self._decode_tokens(decoding, pieces)
            self._since_soft += 1
            completing = sum(p.completes for p in pieces)
            prompt_logits, prompt_hidden = self._prompt_outputs(completing, False)
            return RunOutput(prompt_logits, *self._live_outputs(completing, len(decoding), False),
                             prompt_hidden)
        prompt_logits, prompt_hidden = [], None
        if pieces:  # copied before the next decode overwrites them
            prompt_logits, prompt_hidden = self._prefill(pieces, prompt_hidden_read)
        if not decoding:
            return RunOutput(prompt_logits, None, None, prompt_hidden)
        self._set_hidden(live_hidden)
        self._decode_inputs(decoding)
        return RunOutput(prompt_logits, *self._live_outputs(0, len(decoding), live_hidden), prompt_hidden)

    def _set_hidden(self, on: bool) -> None:
        # The context's own state (another generator may have left it on). A switch costs
        # nothing measurable on CPU (docs/PERFORMANCE.md), so each decode of a step gets its own.
        if on != self.context.hidden_output:
            self.context.set_hidden_output(on)

    def _prefill(self, pieces: list[Piece], hidden: bool) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Decode prompt pieces; with `hidden`, a completing piece's last token goes in a decode
        of its own with hidden output on and the rest without: with it on, every token of a
        batch is an output, and the output layer over a whole chunk cost 1.13-1.43x the
        prompt's time (docs/PERFORMANCE.md); a later latentmas turn is 130-150 tokens."""
        if hidden and len(pieces) == 1 and pieces[0].stop - pieces[0].start > 1:
            p = pieces[0]
            self._set_hidden(False)
            self._decode_tokens([], [Piece(p.seq, p.start, p.stop - 1)])
            pieces = [Piece(p.seq, p.stop - 1, p.stop)]
        self._set_hidden(hidden)
        self._decode_tokens([], pieces)
        return self._prompt_outputs(sum(p.completes for p in pieces), hidden)

    def _prompt_outputs(self, completing: int, hidden: bool) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        if not completing:
            return [], None
        if hidden:  # every input was an output: the engine's map finds the prompts' last tokens
            at = self.context.output_rows()[:completing]
            rows = self.context.logits_rows(int(at.max()) + 1)[at]
        else:
            rows = self.context.logits_rows(completing)
        logits = []
        for row in rows:
            copy = row.copy()
            copy.flags.writeable = False
            logits.append(copy)
        if not hidden:
            return logits, None
        return logits, list(self.context.hidden_rows(int(at.max()) + 1)[at])  # fancy index: copies

    def _live_outputs(self, first: int, n: int, hidden: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not n:
            return None, None
        rows = self.context.logits_rows(first + n)[first:]
        # Live inputs are all outputs, so with hidden output on (never merged) their rows are 0..n-1.
        return rows, self.context.hidden_rows(first + n)[first:] if hidden else None

    def _decode_tokens(self, decoding: list[Sequence], pieces: list[Piece]) -> None:
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
            tokens += p.tokens
            first = p.seq.position + p.start - p.seq.prefill.fed  # a piece may be the tail of this step's chunk
            positions += range(first, first + n)
            seq_ids += [p.seq.seq_id] * n
            want += [False] * (n - 1) + [p.completes]
        tokens += [s.pending.token for s in decoding]
        positions += [s.position for s in decoding]
        seq_ids += [s.seq_id for s in decoding]
        want += [True] * len(decoding)
        self.context.decode_tokens(tokens, positions, seq_ids, want)

    def _decode_inputs(self, live: list[Sequence]) -> None:
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
        if not any_soft and not (self.rows_exact and self._since_soft <= self.STICKY_EMBEDDING_STEPS
                                 and ctx.last_input_kind == "embeddings"):
            ctx.decode_tokens([s.pending.token for s in live], positions, seq_ids, want)
        else:
            table = self.table
            for row, s in zip(ctx.embedding_buffer(n), live):
                input_row(row, s.pending.next_input, table)
            ctx.decode_embedding_buffer(n, positions, seq_ids, want)
