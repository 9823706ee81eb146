"""A grammar on what is shown and committed: the step decision, adjusted (pure NumPy).

The grammar itself is llama.cpp's (engine.GrammarSampler); here it is only a callable
`allowed(ids) -> bool mask` for the tokens its current state may take next. The drawn
token is checked first (one id: cheap); the filtered distribution is masked only when it
is rejected, and the whole vocabulary only when no filtered candidate is allowed, as
llama.cpp's common sampler does.

- A discrete step whose token is rejected is redrawn from the allowed part of the
  filtered distribution (its argmax when greedy).
- A soft step's mixture keeps only allowed candidates (weights renormalised); a step whose
  top candidate is rejected, or whose mixture keeps fewer than two candidates, is discrete.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import numpy as np

from selar_local.errors import InvalidParameterError
from selar_local.policies import StepDecision
from selar_local.sampling import Distribution, filter_logits, sample, top_candidates

AllowedFn = Callable[[np.ndarray], np.ndarray]
HEAD_PER_K = 16  # the head of the vocabulary checked before the whole of it (masked_distribution)


def allowed_part(dist: Distribution, allowed: AllowedFn) -> Distribution | None:
    """The filtered distribution restricted to allowed tokens, renormalised (None: none)."""
    mask = np.asarray(allowed(dist.ids), dtype=bool) & (dist.probs > 0)
    if not mask.any():
        return None
    probs = dist.probs[mask]
    return Distribution(dist.ids[mask], probs / probs.sum())


def masked_distribution(logits: np.ndarray, allowed: AllowedFn, *, temperature: float, top_k: int,
                        top_p: float, min_p: float) -> Distribution:
    """The filter applied to the logits with every token the grammar rejects at -inf.

    With a top-k filter, the grammar first sees only the HEAD_PER_K * top_k most likely
    tokens: when top_k of them are allowed, they are the top k of the masked logits, so the
    result is the whole vocabulary's (ties at the head's edge aside), at a fraction of the
    cost (masking 152k tokens takes the grammar ~20-45 ms)."""
    vocab = logits.shape[0]
    masked = np.full(vocab, -np.inf, dtype=np.float64)
    if 0 < top_k and HEAD_PER_K * top_k < vocab:
        ids, _ = top_candidates(logits, HEAD_PER_K * top_k)
        keep = ids[np.asarray(allowed(ids), dtype=bool)]
        if keep.size >= top_k:
            masked[keep] = logits[keep]
            return _filtered(masked, temperature, top_k, top_p, min_p)
    mask = np.asarray(allowed(np.arange(vocab)), dtype=bool)
    if not mask.any():
        raise InvalidParameterError("grammar: no token of the vocabulary can continue the answer here")
    masked[mask] = logits[mask]
    return _filtered(masked, temperature, top_k, top_p, min_p)


def _filtered(masked: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> Distribution:
    dist = filter_logits(masked, temperature, top_k, top_p, min_p)
    keep = dist.probs > 0
    return Distribution(dist.ids[keep], dist.probs[keep] / dist.probs[keep].sum())


def redraw(dist: Distribution, logits: np.ndarray, allowed: AllowedFn, rng: np.random.Generator, *,
           greedy: bool, temperature: float, top_k: int, top_p: float, min_p: float) -> tuple[int, float]:
    """A token the grammar accepts, and its log-probability in the distribution drawn from."""
    part = allowed_part(dist, allowed)
    if part is None:
        part = masked_distribution(logits, allowed, temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p)
    token = int(part.ids[int(np.argmax(part.probs))]) if greedy else sample(part, rng)
    prob = float(part.probs[np.flatnonzero(part.ids == token)[0]])
    return token, math.log(prob)


def constrain(decision: StepDecision, dist: Distribution, logits: np.ndarray, allowed: AllowedFn,
              rng: np.random.Generator, *, greedy: bool, temperature: float, top_k: int, top_p: float,
              min_p: float) -> StepDecision:
    """`decision` with its shown token and its mixture made grammatical. The grammar is
    asked once for the shown token, the top candidate and the mixture together (each ask
    is a pass of llama.cpp's grammar sampler); the vocabulary only when the token fails."""
    filters = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if decision.soft:
        top = decision.top_ids[:1] if len(decision.top_ids) else decision.mix_ids[:1]
        ok = np.asarray(allowed(np.concatenate(([decision.token], top, decision.mix_ids))), dtype=bool)
        token_ok = bool(ok[0])
        decision = _constrain_mixture(decision, bool(ok[1]), ok[2:])
    else:
        token_ok = bool(np.asarray(allowed(np.array([decision.token])), dtype=bool)[0])
    if token_ok:
        return decision
    token, logprob = redraw(dist, logits, allowed, rng, **filters)
    if decision.soft and decision.mix_ids is not None and token not in set(decision.mix_ids.tolist()):
        decision = replace(decision, soft=False, mix_ids=None, mix_weights=None)
    return replace(decision, token=token, logprob=logprob)


def _constrain_mixture(decision: StepDecision, top_ok: bool, mask: np.ndarray) -> StepDecision:
    """The mixture restricted to the rows the grammar allows (`mask`); discrete when the top
    candidate is not allowed or fewer than two rows with weight remain."""
    discrete = replace(decision, soft=False, mix_ids=None, mix_weights=None)
    if not top_ok:
        return discrete
    if mask.all():
        return decision
    weights = decision.mix_weights[mask]
    total = float(weights.sum())
    if mask.sum() < 2 or not total > 0:
        return discrete
    return replace(decision, mix_ids=decision.mix_ids[mask], mix_weights=weights / total)


class SequenceGrammar:
    """One sequence's grammar in the loop. Lazy, as llama-server's lazy grammar: it starts
    after the thinking span closes, so the reasoning is free, whether the template opened
    the span or the model opens it itself (the open marker is free as the very first
    tokens), and the answer header a template's close brings (R1's "\\n\\n") is free where
    the grammar rejects it. Once started it holds to the end, and no span reopens.
    `commit` advances it past the token the step showed."""

    def __init__(self, sampler, params):
        self.sampler = sampler  # allowed_mask(ids) -> bool array, accept(token)
        self.params = params
        self.started = False
        self._before: list[int] = []  # tokens shown before the grammar started
        self._decided: int | None = None
        self._free = False  # the decided token is a marker, outside the grammar

    def _marker_token(self, span) -> tuple[int | None, bool]:
        """A marker token allowed beside the grammar now, and whether it goes first."""
        markers = getattr(span, "span", None)
        if markers is None:
            return None, False
        opening = markers.open_ids
        n = len(self._before)
        if n < len(opening) and tuple(self._before) == opening[:n]:
            return opening[n], True
        return span.answer_header_next, False

    def adjust(self, decision: StepDecision, policy, logits: np.ndarray, span) -> StepDecision:
        """`span`: the sequence's thinking.SpanTracker."""
        self._decided, self._free = None, False
        if span.in_span and not self.started:
            return decision
        p = self.params
        dist = policy.last_dist if policy.last_dist is not None else filter_logits(
            logits, p.temperature, p.top_k, p.top_p, p.min_p)
        marker, marker_first = (None, False) if self.started else self._marker_token(span)
        # Part of a marker of several tokens shown already: should the model leave it, that
        # part is answer and must pass the grammar first (else the marker must go on).
        grammar = self._replayed() if marker_first and self._before else self.sampler
        if marker is None:
            allowed = grammar.allowed_mask
        else:
            def allowed(ids):
                ids = np.asarray(ids)
                inside = np.asarray(grammar.allowed_mask(ids), dtype=bool) if grammar is not None else False
                return inside | (ids == marker)
        decision = constrain(decision, dist, logits, allowed, policy.rng, greedy=p.greedy,
                             temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
        self._decided = decision.token
        self._free = decision.token == marker and (marker_first or not self.sampler.allows(marker))
        if grammar is not self.sampler and grammar is not None:
            if self._free:
                grammar.close()
            else:  # the marker was left: the grammar goes on from past its shown part
                self.sampler.close()
                self.sampler = grammar
        if not self._free:
            span.stay_in_answer()  # the constrained answer starts with this token
        return decision

    def _replayed(self):
        """A copy of the grammar past the tokens shown so far, or None where it rejects them."""
        copy = self.sampler.clone()
        for token in self._before:
            if not copy.allows(token):
                copy.close()
                return None
            copy.accept(token, checked=True)
        return copy

    def commit(self, token: int) -> None:
        """Called with every shown token; only tokens decided under the grammar advance it
        (markers, and tokens the loop injects such as a forced span close, do not)."""
        if self._decided is not None and token == self._decided and not self._free:
            self.sampler.accept(token, checked=True)  # `adjust` made it an allowed token
            self.started = True
        elif not self.started:
            self._before.append(token)
        self._decided = None
