"""Decoding methods as pure NumPy step policies (no llama.cpp here).

A policy sees one sequence's step outputs (the next-token logits; the final hidden state
too when it declares `needs_hidden`) and decides two things: the token shown in the output
text, and the next input, one of `Token` (the token itself: a discrete step), `Mixture`
(embedding-table rows and weights that sum to 1: a soft step) or `Vector` (an input
embedding computed by the method). `StepDecision.next_input` names it; the loop's batch
runner turns any of the three into a batch row with one function (batch_runner.input_row).

The loop talks to a policy through four calls, as llama.cpp's server talks to its sampler:
- `propose(logits, hidden)`: the decision of a generated step;
- `forced_step(logits, token)`: the decision of a step whose token is forced (a thinking
  span's close marker, SwiReasoning's injected prefix), with the logits' statistics;
- `accept(token, is_generated)`: every shown token once its decision is final, forced or
  generated (llama.cpp's `common_sampler_accept`);
- the decision's requests: `close_thinking` (Cold Stop: close the span now) and
  `force_next` (tokens to force on the following steps); the loop queues them as `Force`
  segments (segments.py). The loop never writes a policy's fields.

`step(logits)` is the one-sequence driver of the same calls (tests, tools): it plays the
forced tokens a policy asked for and accepts each token, as the loop does.

Thinking state lives in one place: in the loop, the sequence's `SpanTracker` (thinking.py),
which the policy reads through `in_thinking`; a policy used on its own follows the
single-token markers itself (`TokenThinking`). One policy object per sequence: gates,
thinking spans and Cold Stop are per sequence.

A new method is a Policy subclass (its `decide`, or `propose` for one that needs the raw
logits or the hidden state) plus its `Method` entry in methods.py; nothing in the loop
changes (README, "Adding a method").
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, Union

import numpy as np

from selar_local.methods import REGISTRY
from selar_local.params import DecodeParams
from selar_local.sampling import (
    Distribution,
    filter_logits,
    full_vocab_entropy,
    noisy_weights,
    normalized_topk,
    sample,
    softmax,
    top_candidates,
)


@dataclass(frozen=True)
class TokenInfo:
    """What policies must know about the vocabulary (built by the loop from the model)."""

    vocab_size: int
    math_symbol_mask: np.ndarray   # bool[vocab]: tokens that force a discrete step
    think_open: int | None = None  # id of <think>, if the model has one
    think_close: int | None = None  # id of </think>
    answer_prefix: tuple[int, ...] = ()  # "\n\nThe final answer is" (SwiReasoning's budget end)


class Token(NamedTuple):
    """The next input is a token id (a discrete step)."""

    id: int


class Mixture(NamedTuple):
    """The next input is sum_i weights[i] * E[ids[i]] over the embedding table's rows."""

    ids: np.ndarray
    weights: np.ndarray


class Vector(NamedTuple):
    """The next input is this embedding (n_embd floats), computed by the method."""

    values: np.ndarray


NextInput = Union[Token, Mixture, Vector]


@dataclass(frozen=True)
class StepDecision:
    token: int                        # shown in the output text, always
    soft: bool                        # next input is the mixture (or vector) below, not `token`
    mix_ids: np.ndarray | None        # soft steps: rows to mix
    mix_weights: np.ndarray | None    # soft steps: weights (sum 1; may be negative)
    entropy: float                    # the method's gate statistic (normalised entropy)
    top_ids: np.ndarray               # candidates considered, most probable first
    top_probs: np.ndarray
    logprob: float = 0.0              # log p(token) under the sampling distribution (0: forced)
    final: bool = False               # the policy ends the sequence after this token
    vector: np.ndarray | None = None  # soft steps of a method feeding its own embedding (Vector)
    close_thinking: bool = False      # the policy asks that the thinking span close now (Cold Stop)
    force_next: tuple[int, ...] = ()  # tokens the policy asks to force on the following steps

    @property
    def next_input(self) -> NextInput:
        """What the next decode feeds for this sequence."""
        if not self.soft:
            return Token(self.token)
        if self.vector is not None:
            return Vector(self.vector)
        return Mixture(self.mix_ids, self.mix_weights)


class ThinkingState(Protocol):
    """Where a policy reads whether its sequence is inside the thinking span."""

    @property
    def in_thinking(self) -> bool: ...


class TokenThinking:
    """The thinking state of a policy used on its own: follows the single-token markers
    it is told of (`Policy.accept`). In the loop a policy reads its sequence's SpanTracker
    instead, which also knows multi-token and text markers."""

    def __init__(self, info: "TokenInfo", in_thinking: bool | None):
        self._open, self._close = info.think_open, info.think_close
        # Models without thinking tags: the whole answer counts as the thinking span.
        self.in_thinking = (info.think_open is None) if in_thinking is None else in_thinking

    def follow(self, token: int) -> None:
        if token == self._open:
            self.in_thinking = True
        elif token == self._close:
            self.in_thinking = False


class Policy:
    """Base: sampling plus the calls the loop makes (see the module docstring)."""

    # A policy that reads the final hidden state of its step sets this; the loop then asks
    # the engine for those rows and passes each policy its row as `propose(..., hidden)`.
    needs_hidden = False

    def __init__(self, params: DecodeParams, info: TokenInfo, *, in_thinking: bool | None = None,
                 thinking: ThinkingState | None = None):
        self.params = params
        self.info = info
        self.rng = np.random.default_rng(params.seed)
        # Mixture noise has its own stream, so that the token draws stay those of the
        # noise-free run (same seed -> same tokens until a noisy input changes the logits).
        self.noise_rng = np.random.default_rng([params.seed, 1])
        self.last_dist: Distribution | None = None  # the last step's filtered distribution (logprobs)
        self._own_thinking = TokenThinking(info, in_thinking) if thinking is None else None
        self.thinking: ThinkingState = self._own_thinking if thinking is None else thinking
        self._forced: deque[int] = deque()  # step(): tokens this policy asked to force

    @property
    def in_thinking(self) -> bool:
        return self.thinking.in_thinking

    def step(self, logits: np.ndarray, hidden: np.ndarray | None = None) -> StepDecision:
        """One step on its own: the forced tokens this policy asked for first, then its
        proposals; every token accepted (what the loop does for a sequence without a
        grammar or a thinking budget)."""
        generated = not self._forced
        decision = self.propose(logits, hidden) if generated else self.forced_step(logits, self._forced.popleft())
        self.settle(decision, generated)
        return decision

    @property
    def forcing(self) -> bool:
        """step() has tokens this policy asked to force still to play."""
        return bool(self._forced)

    def settle(self, decision: StepDecision, is_generated: bool) -> None:
        """step()'s bookkeeping after a decision: queue the tokens it asks to force, accept
        its token (the loop does the same with Force segments)."""
        self._forced.extend(decision.force_next)
        self.accept(decision.token, is_generated)

    def propose(self, logits: np.ndarray, hidden: np.ndarray | None = None) -> StepDecision:
        """The decision of a generated step: filter the logits and decide. The batch-wide
        step (batch_step.py) computes the filtered distributions of many sequences at once
        and calls `decide` itself."""
        return self.decide(self._filtered(logits), logits)

    def accept(self, token: int, is_generated: bool) -> None:
        """Told of every shown token once its decision is final (after the grammar), forced
        or generated, as llama.cpp's `common_sampler_accept`."""
        if self._own_thinking is not None:
            self._own_thinking.follow(token)

    def decide(self, dist: Distribution, logits: np.ndarray) -> StepDecision:
        """The method proper, given this step's filtered distribution."""
        raise NotImplementedError

    def _filtered(self, logits: np.ndarray) -> Distribution:
        p = self.params
        self.last_dist = filter_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p)
        return self.last_dist

    def forced_step(self, logits: np.ndarray, token: int) -> StepDecision:
        """A discrete step showing `token` whatever the logits say (a Force segment's
        token), with the usual statistics of the logits for traces."""
        dist = self._filtered(logits)
        ids, weights, h = normalized_topk(dist, self.params.ks)
        return _discrete(token, h, ids, weights)

    def _choose(self, dist: Distribution) -> int:
        return int(dist.ids[0]) if self.params.greedy else sample(dist, self.rng)

    def _noisy(self, probs: np.ndarray) -> np.ndarray:
        p = self.params
        return noisy_weights(probs, p.soft_noise, self.noise_rng, gumbel_tau=p.gumbel_tau,
                             dirichlet_alpha=p.dirichlet_alpha)


def token_logprob(dist: Distribution, token: int) -> float:
    """log p(token) in the filtered distribution; 0.0 for a token outside it (a forced one)."""
    hit = np.flatnonzero(dist.ids == token)
    return float(math.log(dist.probs[hit[0]])) if hit.size else 0.0


def _discrete(token: int, entropy: float, top_ids: np.ndarray, top_probs: np.ndarray,
              logprob: float = 0.0) -> StepDecision:
    return StepDecision(token, False, None, None, entropy, top_ids, top_probs, logprob)


class CotPolicy(Policy):
    """Plain chain-of-thought: the filtered sample (or argmax) is shown and fed back."""

    def decide(self, dist: Distribution, logits: np.ndarray) -> StepDecision:
        token = self._choose(dist)
        ids, weights, h = normalized_topk(dist, self.params.ks)
        return self.conclude(token, token_logprob(dist, token), h, ids, weights)

    def conclude(self, token: int, logprob: float, entropy: float, ids: np.ndarray,
                 weights: np.ndarray) -> StepDecision:
        """The decision once the step's numbers are known: the chosen token, its
        log-probability and the normalised top-k_s (the batch-wide step computes these for
        many rows at once and ends here too, so both paths decide alike)."""
        return _discrete(token, entropy, ids, weights, logprob)


class SelarPolicy(Policy):
    """SeLaR: entropy-gated soft steps with a contrastive push off the dominant token."""

    def decide(self, dist: Distribution, logits: np.ndarray) -> StepDecision:
        ids, q, h = normalized_topk(dist, self.params.ks)
        token = self._choose(dist)  # drawn from the full filtered p, always shown
        return self.conclude(token, token_logprob(dist, token), h, ids, q)

    def conclude(self, token: int, logprob: float, h: float, ids: np.ndarray, q: np.ndarray) -> StepDecision:
        """The gate and the mixture once the step's numbers are known (see CotPolicy.conclude)."""
        p = self.params
        gate_open = h >= p.tau and (self.in_thinking or not p.thinking_only)
        forced_discrete = bool(self.info.math_symbol_mask[token])
        if not gate_open or forced_discrete:
            return _discrete(token, h, ids, q, logprob)
        # Stochastic variant: noise on the candidates' weights; the gate, h and the pushed-off
        # token v1 stay those of the clean distribution.
        weights = contrastive_weights(self._noisy(q), p.lam * h)
        return StepDecision(token, True, ids, weights, h, ids, q, logprob)


def contrastive_weights(q: np.ndarray, push: float) -> np.ndarray:
    """e' = e + push (e - E[v1]) with e = sum q_i E[v_i], expressed as row weights:
    (1 + push) q, minus push on v1. Still sums to 1; v1's weight may go negative."""
    weights = (1.0 + push) * q
    weights[0] -= push
    return weights


class SoftThinkingPolicy(Policy):
    """Soft Thinking: every step inside the thinking span is a soft mixture of the top
    `soft_topk` filtered tokens and shows the argmax; Cold Stop ends thinking early."""

    def __init__(self, params: DecodeParams, info: TokenInfo, *, in_thinking: bool | None = None,
                 thinking: ThinkingState | None = None):
        super().__init__(params, info, in_thinking=in_thinking, thinking=thinking)
        self.low_entropy_run = 0
        self.cold_stopped = False

    def decide(self, dist: Distribution, logits: np.ndarray) -> StepDecision:
        p = self.params
        top_ids, top_w, h = normalized_topk(dist, p.ks)
        if not self.in_thinking or self.cold_stopped:
            token = self._choose(dist)
            return _discrete(token, h, top_ids, top_w, token_logprob(dist, token))
        if self._cold_stop_due(logits):
            # Emit </think> (or, without thinking tags, simply continue discretely), and ask
            # the loop to close the span: it forces the model's whole close marker there.
            self.cold_stopped = True
            if self.info.think_close is not None:
                return replace(_discrete(self.info.think_close, h, top_ids, top_w), close_thinking=True)
            token = self._choose(dist)
            return replace(_discrete(token, h, top_ids, top_w, token_logprob(dist, token)), close_thinking=True)
        token = int(dist.ids[0])
        logprob = float(math.log(dist.probs[0]))
        if token == self.info.think_close:  # the argmax ends thinking: leave soft mode on a discrete step
            return _discrete(token, h, top_ids, top_w, logprob)
        mix_ids = dist.ids[: p.soft_topk]
        mix_w = self._noisy(dist.probs[: p.soft_topk] / dist.probs[: p.soft_topk].sum())
        return StepDecision(token, True, mix_ids, mix_w, h, top_ids, top_w, logprob)

    def _cold_stop_due(self, logits: np.ndarray) -> bool:
        if full_vocab_entropy(logits) < self.params.cold_stop_entropy:
            self.low_entropy_run += 1
        else:
            self.low_entropy_run = 0
        return self.low_entropy_run >= self.params.cold_stop_steps


class MixtureOfInputsPolicy(Policy):
    """Mixture of Inputs: every step feeds h * sum w_i E[v_i] + (1 - h) E[x], with the
    posterior w = (p + beta onehot(x)) / (1 + beta) over the top-N tokens."""

    def decide(self, dist: Distribution, logits: np.ndarray) -> StepDecision:
        p = self.params
        token = self._choose(dist)
        ids, probs, h = normalized_topk(dist, p.moi_topn)
        hit = np.flatnonzero(ids == token)
        if hit.size == 0:  # sampled outside the top-N: give it a zero-probability slot
            ids = np.append(ids, token)
            probs = np.append(probs, 0.0)
            hit = np.array([len(ids) - 1])
        onehot = np.zeros_like(probs)
        onehot[hit[0]] = 1.0
        posterior = (probs + p.moi_beta * onehot) / (1.0 + p.moi_beta)
        weights = h * posterior + (1.0 - h) * onehot
        return StepDecision(token, True, ids, weights, h, ids[: p.ks], probs[: p.ks], token_logprob(dist, token))

# -- SwiReasoning ------------------------------------------------------------------------------

SWIR_ANSWER_TOKENS = 32  # tokens allowed after the injected answer prefix (past 2 C_max switches)


class SwirSwitch(NamedTuple):
    latent: bool
    ref_entropy: float
    steps_in_mode: int
    to_explicit: bool
    to_latent: bool


def swir_switch(latent: bool, ref_entropy: float, steps_in_mode: int, entropy: float, window: int,
                locked: bool) -> SwirSwitch:
    """SwiReasoning's switch rule for one step. The reference entropy is set on the first step
    (ref_entropy NaN) and at every switch. Latent -> explicit at once when the entropy falls
    below the reference (confidence rose); explicit -> latent when it rises above it, after at
    least `window` steps in explicit mode, and never once thinking has ended (`locked`)."""
    if math.isnan(ref_entropy):
        return SwirSwitch(latent, entropy, 0, False, False)
    steps = steps_in_mode + 1
    to_explicit = latent and entropy < ref_entropy
    to_latent = not latent and not locked and entropy > ref_entropy and steps >= window
    if to_explicit or to_latent:
        return SwirSwitch(not latent, entropy, 0, to_explicit, to_latent)
    return SwirSwitch(latent, ref_entropy, steps, False, False)


def blend_with_row(ids: np.ndarray, weights: np.ndarray, keep: float, row: int | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """keep * mixture + (1 - keep) * E[row], as row weights (the mixture unchanged without a row)."""
    if row is None or keep >= 1.0:
        return ids, weights
    hit = np.flatnonzero(ids == row)
    if hit.size:
        weights = keep * weights
        weights[hit[0]] += 1.0 - keep
        return ids, weights
    return np.append(ids, row), np.append(keep * weights, 1.0 - keep)


def linear_schedule(start: float, step: int, max_tokens: int) -> float:
    """SwiReasoning's blend weights rise linearly from start to 1 over the token budget."""
    return start + (1.0 - start) * min(step, max_tokens) / max_tokens


@dataclass
class SwirState:
    """One sequence's SwiReasoning state (plain fields, so that a batched form can hold them
    as arrays)."""

    latent: bool = True               # starts latent
    ref_entropy: float = math.nan     # set on the first step and at every switch
    steps_in_mode: int = 0
    switches: int = 0                 # latent -> explicit switches, for the C_max budget
    locked: bool = False              # </think> was shown: explicit for good
    step: int = 0
    answer_budget: int = -1           # steps left before the sequence ends; -1: no limit


class SwiReasoningPolicy(Policy):
    """SwiReasoning: alternate latent blocks (input softmax(l) @ E, restricted to the top
    `swir_topk` tokens of the raw distribution) and explicit blocks (the sampled token), on
    the normalised full-vocabulary entropy (see `swir_switch`). Switches blend in the
    <think> / </think> rows where the model has them; past `swir_max_switches` (C_max)
    latent -> explicit switches it asks for </think> to be forced (`force_next`), past
    2 C_max the answer prefix too, and ends 32 tokens later. Forced tokens still advance
    the switch rule (`forced_step`). Math-symbol tokens and everything after </think> are
    discrete. The shown token is always the sample of the filtered distribution."""

    def __init__(self, params: DecodeParams, info: TokenInfo, *, in_thinking: bool | None = None,
                 thinking: ThinkingState | None = None):
        super().__init__(params, info, in_thinking=in_thinking, thinking=thinking)
        self.state = SwirState()
        self._log_vocab = math.log(max(info.vocab_size, 2))

    def propose(self, logits: np.ndarray, hidden: np.ndarray | None = None) -> StepDecision:
        dist = self._filtered(logits)
        return self._advance(logits, dist, self._choose(dist), forced=False)

    def forced_step(self, logits: np.ndarray, token: int) -> StepDecision:
        return self._advance(logits, self._filtered(logits), token, forced=True)

    def _advance(self, logits: np.ndarray, dist: Distribution, token: int, *, forced: bool) -> StepDecision:
        p, info, st = self.params, self.info, self.state
        top_ids, top_w, _ = normalized_topk(dist, p.ks)
        h = min(max(full_vocab_entropy(logits) / self._log_vocab, 0.0), 1.0)
        logprob = 0.0 if forced else token_logprob(dist, token)
        if token == info.think_close and not forced:
            # A sampled </think> ends thinking; an injected one only nudges (as in the published code).
            st.locked = True
        switch = swir_switch(st.latent and not st.locked, st.ref_entropy, st.steps_in_mode, h,
                             p.swir_window, st.locked)
        st.latent, st.ref_entropy, st.steps_in_mode = switch.latent, switch.ref_entropy, switch.steps_in_mode
        final = self._spend_answer_budget()  # before a new budget can be set on this step
        force = self._count_switch() if switch.to_explicit else ()
        st.step += 1
        if forced or (bool(info.math_symbol_mask[token]) and not switch.to_explicit):
            return StepDecision(token, False, None, None, h, top_ids, top_w, logprob, final, force_next=force)
        if switch.to_explicit and info.think_close is not None:
            ids, w = blend_with_row(*self._latent_mixture(logits),
                                    linear_schedule(p.swir_beta, st.step - 1, p.max_tokens), info.think_close)
            return StepDecision(token, True, ids, w, h, top_ids, top_w, logprob, final, force_next=force)
        if not st.latent:
            return StepDecision(token, False, None, None, h, top_ids, top_w, logprob, final, force_next=force)
        ids, w = self._latent_mixture(logits)
        if switch.to_latent:
            ids, w = blend_with_row(ids, w, linear_schedule(p.swir_alpha, st.step - 1, p.max_tokens),
                                    info.think_open)
        return StepDecision(token, True, ids, w, h, top_ids, top_w, logprob, final, force_next=force)

    def _latent_mixture(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, values = top_candidates(logits, self.params.swir_topk)
        return ids, softmax(values)  # softmax(l) restricted to the top tokens, renormalised

    def _count_switch(self) -> tuple[int, ...]:
        """Count a latent -> explicit switch; the tokens the budget forces next (C_max)."""
        st, c_max, info = self.state, self.params.swir_max_switches, self.info
        st.switches += 1
        if not c_max:
            return ()
        close = () if info.think_close is None else (info.think_close,)
        if c_max <= st.switches <= 2 * c_max:
            return close
        if st.switches > 2 * c_max and st.answer_budget < 0:
            force = close + tuple(info.answer_prefix)
            st.answer_budget = len(force) + SWIR_ANSWER_TOKENS
            return force
        return ()

    def _spend_answer_budget(self) -> bool:
        st = self.state
        if st.answer_budget < 0:
            return False
        st.answer_budget -= 1
        return st.answer_budget == 0


def make_policy(params: DecodeParams, info: TokenInfo, *, in_thinking: bool | None = None,
                thinking: ThinkingState | None = None) -> Policy:
    """The registered policy of params.method (selar_local/methods.py) for one sequence;
    `thinking`: where it reads the thinking state (the loop's SpanTracker)."""
    return _policy_class(params)(params, info, in_thinking=in_thinking, thinking=thinking)


_CLASSES: dict[tuple, type[Policy]] = {}


def _policy_class(params: DecodeParams) -> type[Policy]:
    method = REGISTRY[params.method]
    key = (params.method, getattr(params, method.variants[0]) if method.variants else None)
    cls = _CLASSES.get(key)
    if cls is None:
        cls = _CLASSES[key] = method.policy_class(params)
    return cls
