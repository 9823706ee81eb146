"""Pure NumPy sampling primitives shared by every decoding method.

The filter order is the one of the published runs (and of HF transformers' warpers):
temperature -> top-k -> top-p -> min-p -> softmax. Functions take the raw logits row
(possibly a zero-copy view of llama.cpp's buffer) and never modify it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Distribution:
    """The kept tokens, most probable first, and their renormalised probabilities."""

    ids: np.ndarray    # int64, sorted by probability, descending
    probs: np.ndarray  # float64, sums to 1

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def top_candidates(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and logits of the k largest logits, descending; k <= 0 or k >= V means all.

    argpartition is O(V): a full sort of a 152k vocabulary each step would dominate.
    Kept tokens with equal logits are ordered by token id, so the order is reproducible.
    """
    vocab = logits.shape[0]
    if 0 < k < vocab:
        ids = np.argpartition(logits, vocab - k)[vocab - k:]
    else:
        ids = np.arange(vocab)
    values = logits[ids]
    order = np.lexsort((ids, -values))
    return ids[order].astype(np.int64, copy=False), values[order].astype(np.float64)


def filter_logits(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> Distribution:
    ids, values = top_candidates(logits, top_k)
    probs = softmax(values / temperature)
    keep = len(probs)
    if top_p < 1.0:
        # Smallest prefix whose mass reaches top_p (at least one token).
        keep = min(keep, int(np.searchsorted(np.cumsum(probs), top_p, side="left")) + 1)
    if min_p > 0.0:
        keep = min(keep, int(np.count_nonzero(probs[:keep] >= min_p * probs[0])))
    if keep < len(probs):
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return Distribution(ids, probs)


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - np.max(values))
    return shifted / shifted.sum()


def entropy(probs: np.ndarray) -> float:
    """Shannon entropy in nats; zero-probability entries contribute nothing."""
    nonzero = probs[probs > 0]
    return float(-(nonzero * np.log(nonzero)).sum())


def normalized_topk(dist: Distribution, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-k of a distribution renormalised, with its entropy divided by log(k), clamped
    to [0, 1]. Dividing by log(k) (not log(len)) is the paper's definition: a
    distribution cut to fewer than k tokens by top-p counts as confident."""
    ids = dist.ids[:k]
    weights = dist.probs[:k] / dist.probs[:k].sum()
    h = entropy(weights) / math.log(k)
    return ids, weights, (0.0 if h <= 0.0 else min(h, 1.0))  # no -0.0 in traces


def full_vocab_entropy(logits: np.ndarray) -> float:
    """Entropy of softmax(logits) over the whole vocabulary (Soft Thinking's Cold Stop)."""
    shifted = logits - np.max(logits)
    exp = np.exp(shifted, dtype=np.float64)
    total = exp.sum()
    return float(math.log(total) - (exp * shifted).sum() / total)


def sample(dist: Distribution, rng: np.random.Generator) -> int:
    """Inverse-CDF draw with exactly one uniform per call, so every method that samples
    consumes the random stream identically (same seed -> same token sequence)."""
    u = rng.random()
    cdf = np.cumsum(dist.probs)
    index = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(dist) - 1)
    return int(dist.ids[index])


def effective_count(weights: np.ndarray) -> float:
    """N_eff = 1 / sum w_i^2: how many tokens a soft input superposes."""
    return float(1.0 / np.square(weights).sum())
