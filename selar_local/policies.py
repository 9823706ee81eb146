"""Decoding methods as pure NumPy step policies (no llama.cpp here).

A policy sees one sequence's next-token logits and decides two things: the token shown
in the output text, and the next input: that token itself (a discrete step) or a
mixture of embedding rows (a soft step), given as token ids and weights that sum to 1.
One policy object per sequence: gates, thinking spans and Cold Stop are per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from selar_local.params import DecodeParams
from selar_local.sampling import (
    Distribution,
    filter_logits,
    full_vocab_entropy,
    normalized_topk,
    sample,
)


@dataclass(frozen=True)
class TokenInfo:
    """What policies must know about the vocabulary (built by the loop from the model)."""

    vocab_size: int
    math_symbol_mask: np.ndarray   # bool[vocab]: tokens that force a discrete step
    think_open: int | None = None  # id of <think>, if the model has one
    think_close: int | None = None  # id of </think>


@dataclass(frozen=True)
class StepDecision:
    token: int                        # shown in the output text, always
    soft: bool                        # next input is the mixture below, not `token`
    mix_ids: np.ndarray | None        # soft steps: rows to mix
    mix_weights: np.ndarray | None    # soft steps: weights (sum 1; may be negative)
    entropy: float                    # the method's gate statistic (normalised entropy)
    top_ids: np.ndarray               # candidates considered, most probable first
    top_probs: np.ndarray


class Policy:
    """Base: sampling plus thinking-span bookkeeping."""

    def __init__(self, params: DecodeParams, info: TokenInfo, *, in_thinking: bool | None = None):
        self.params = params
        self.info = info
        self.rng = np.random.default_rng(params.seed)
        self.last_dist: Distribution | None = None  # the last step's filtered distribution (logprobs)
        # Models without thinking tags: the whole answer counts as the thinking span.
        self.in_thinking = (info.think_open is None) if in_thinking is None else in_thinking

    def step(self, logits: np.ndarray) -> StepDecision:
        raise NotImplementedError

    def _filtered(self, logits: np.ndarray) -> Distribution:
        p = self.params
        self.last_dist = filter_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p)
        return self.last_dist

    def _choose(self, dist: Distribution) -> int:
        return int(dist.ids[0]) if self.params.greedy else sample(dist, self.rng)

    def _track_thinking(self, token: int) -> None:
        if token == self.info.think_open:
            self.in_thinking = True
        elif token == self.info.think_close:
            self.in_thinking = False


def _discrete(token: int, entropy: float, top_ids: np.ndarray, top_probs: np.ndarray) -> StepDecision:
    return StepDecision(token, False, None, None, entropy, top_ids, top_probs)


class CotPolicy(Policy):
    """Plain chain-of-thought: the filtered sample (or argmax) is shown and fed back."""

    def step(self, logits: np.ndarray) -> StepDecision:
        dist = self._filtered(logits)
        token = self._choose(dist)
        ids, weights, h = normalized_topk(dist, self.params.ks)
        self._track_thinking(token)
        return _discrete(token, h, ids, weights)


class SelarPolicy(Policy):
    """SeLaR: entropy-gated soft steps with a contrastive push off the dominant token."""

    def step(self, logits: np.ndarray) -> StepDecision:
        p = self.params
        dist = self._filtered(logits)
        ids, q, h = normalized_topk(dist, p.ks)
        token = self._choose(dist)  # drawn from the full filtered p, always shown
        gate_open = h >= p.tau and (self.in_thinking or not p.thinking_only)
        forced_discrete = bool(self.info.math_symbol_mask[token])
        self._track_thinking(token)
        if not gate_open or forced_discrete:
            return _discrete(token, h, ids, q)
        return StepDecision(token, True, ids, contrastive_weights(q, p.lam * h), h, ids, q)


def contrastive_weights(q: np.ndarray, push: float) -> np.ndarray:
    """e' = e + push (e - E[v1]) with e = sum q_i E[v_i], expressed as row weights:
    (1 + push) q, minus push on v1. Still sums to 1; v1's weight may go negative."""
    weights = (1.0 + push) * q
    weights[0] -= push
    return weights


class SoftThinkingPolicy(Policy):
    """Soft Thinking: every step inside the thinking span is a soft mixture of the top
    `soft_topk` filtered tokens and shows the argmax; Cold Stop ends thinking early."""

    def __init__(self, params: DecodeParams, info: TokenInfo, *, in_thinking: bool | None = None):
        super().__init__(params, info, in_thinking=in_thinking)
        self.low_entropy_run = 0
        self.cold_stopped = False

    def step(self, logits: np.ndarray) -> StepDecision:
        p = self.params
        dist = self._filtered(logits)
        top_ids, top_w, h = normalized_topk(dist, p.ks)
        if not self.in_thinking or self.cold_stopped:
            token = self._choose(dist)
            self._track_thinking(token)
            return _discrete(token, h, top_ids, top_w)
        if self._cold_stop_due(logits):
            # Emit </think> (or, without thinking tags, simply continue discretely).
            self.cold_stopped = True
            if self.info.think_close is not None:
                self.in_thinking = False
                return _discrete(self.info.think_close, h, top_ids, top_w)
            token = self._choose(dist)
            return _discrete(token, h, top_ids, top_w)
        token = int(dist.ids[0])
        self._track_thinking(token)
        if not self.in_thinking:  # the argmax was </think>: leave soft mode on a discrete step
            return _discrete(token, h, top_ids, top_w)
        mix_ids = dist.ids[: p.soft_topk]
        mix_w = dist.probs[: p.soft_topk] / dist.probs[: p.soft_topk].sum()
        return StepDecision(token, True, mix_ids, mix_w, h, top_ids, top_w)

    def _cold_stop_due(self, logits: np.ndarray) -> bool:
        if full_vocab_entropy(logits) < self.params.cold_stop_entropy:
            self.low_entropy_run += 1
        else:
            self.low_entropy_run = 0
        return self.low_entropy_run >= self.params.cold_stop_steps


class MixtureOfInputsPolicy(Policy):
    """Mixture of Inputs: every step feeds h * sum w_i E[v_i] + (1 - h) E[x], with the
    posterior w = (p + beta onehot(x)) / (1 + beta) over the top-N tokens."""

    def step(self, logits: np.ndarray) -> StepDecision:
        p = self.params
        dist = self._filtered(logits)
        token = self._choose(dist)
        self._track_thinking(token)
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
        return StepDecision(token, True, ids, weights, h, ids[: p.ks], probs[: p.ks])


POLICIES: dict[str, type[Policy]] = {
    "cot": CotPolicy,
    "selar": SelarPolicy,
    "soft": SoftThinkingPolicy,
    "moi": MixtureOfInputsPolicy,
}


def make_policy(params: DecodeParams, info: TokenInfo, *, in_thinking: bool | None = None) -> Policy:
    return POLICIES[params.method](params, info, in_thinking=in_thinking)
