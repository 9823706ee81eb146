"""One step's decisions for the sequences that have logits: forced tokens first, then the
policies (one batch-wide pass or one by one), then the grammar.

- A sequence whose front segment is `Latent` takes a latent step: its policy turns this
  step's hidden state into the next input (`latent_step`) and no token is shown.
- A sequence whose front segment is `Force` shows its next forced token
  (`Policy.forced_step`: a discrete step with the logits' statistics).
- A thinking budget spent inside the span (`max_think_tokens`) queues the span's close
  marker and the answer's opening as a Force segment, shown from this step.
- Every other sequence's policy proposes (batch_step.decide_all when batch-wide). A
  proposal asking to close the span (`close_thinking`, Cold Stop) is replaced, inside a
  span, by the close marker's Force segment; tokens a proposal asks to force next
  (`force_next`) are queued the same way.
- The grammar (constraint.py, structured output) adjusts what the policy proposed, and the
  tokens a policy asked to force (they stand for its proposals); the loop's own markers
  pass unchanged (they do not advance a grammar).

Returns each decision with whether it was generated (False: forced; None: a latent step,
which shows nothing), which the loop hands to `Policy.accept` once the token is final.
"""
from __future__ import annotations

from typing import Sequence as Seq

import numpy as np

from selar_local.batch_step import decide_all
from selar_local.policies import StepDecision
from selar_local.sequences import Force, Sequence


def decide(seqs: Seq[Sequence], rows, hidden: Seq[np.ndarray | None] | None, *, batch_wide: bool,
           eog_ids: Seq[int]) -> list[tuple[StepDecision, bool | None]]:
    """seqs[i] decides on logits rows[i] (and hidden[i] where its policy reads it)."""
    rows = np.asarray(rows) if not isinstance(rows, np.ndarray) else rows
    banned = [i for i, s in enumerate(seqs) if s.params.ignore_eos]
    if banned:
        # In place: the rows are either llama.cpp's output buffer, read by nobody else
        # before the next decode (kept prompt logits were copied out already), or a fresh
        # stack of kept logits. A copy of 16 x 49k logits cost ~1.5 ms a step.
        if not rows.flags.writeable:
            rows = rows.copy()
        rows[np.ix_(banned, eog_ids)] = -np.inf
    out: list[tuple[StepDecision, bool | None] | None] = [None] * len(seqs)
    plain = []
    for i, s in enumerate(seqs):
        latent = s.latent
        if latent is not None:
            out[i] = (s.policy.latent_step(rows[i], hidden[i]), None)
            latent.left -= 1
            if not latent.left:
                s.segments.popleft()
            continue
        if _budget_spent(s):
            s.force(s.out.span.span.forced_close)
        forced = s.next_forced()
        if forced is None:
            plain.append(i)
            continue
        decision = s.policy.forced_step(rows[i], forced[0])
        if forced[1] and s.grammar is not None:  # a policy's forced token stands for its proposal
            decision = s.grammar.adjust(decision, s.policy, rows[i], s.out.span)
        out[i] = (decision, False)
    if batch_wide and len(plain) > 1:
        decided = decide_all([seqs[i].policy for i in plain], rows[plain],
                             None if hidden is None else [hidden[i] for i in plain], accept=False)
    else:
        decided = [seqs[i].policy.propose(rows[i], None if hidden is None else hidden[i]) for i in plain]
    for i, decision in zip(plain, decided):
        s = seqs[i]
        generated = True
        if decision.close_thinking and s.out.span.in_span:  # Soft Thinking's Cold Stop
            s.force(s.out.span.span.forced_close)
            decision, generated = s.policy.forced_step(rows[i], s.next_forced()[0]), False
        elif s.grammar is not None:  # -- grammar seam (issue 23): constrain what is shown --
            decision = s.grammar.adjust(decision, s.policy, rows[i], s.out.span)
        out[i] = (decision, generated)
    for s, (decision, _) in zip(seqs, out):
        if decision.force_next:
            s.force(decision.force_next, constrained=True)
    return out  # type: ignore[return-value]


def _budget_spent(seq: Sequence) -> bool:
    """The max_think_tokens budget is spent inside the span and no close is queued yet."""
    budget = seq.params.max_think_tokens
    span = seq.out.span
    return (budget is not None and span.in_span and span.think_tokens >= budget
            and not isinstance(seq.segments[0], Force))
