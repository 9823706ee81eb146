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
    """The kept tokens, most probable first, and their renormalised probabilities.
    Past the first SORTED_HEAD entries the order is by token id, not by probability."""

    ids: np.ndarray    # int64, sorted by probability, descending (the first SORTED_HEAD)
    probs: np.ndarray  # float64, sums to 1

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def top_candidates(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and logits of the k largest logits, descending; k <= 0 or k >= V means all.

    A full sort of a 152k vocabulary each step would dominate, and even argpartition
    (O(V)) costs 0.15 ms at 49k and 0.65 ms at 152k; `_top_k_ids` finds the same set
    about 4x / 10x faster. Kept tokens with equal logits are ordered by token id, so
    the order is reproducible.
    """
    vocab = logits.shape[0]
    if 0 < k < vocab:
        ids = _top_k_ids(logits, k)
    else:
        ids = np.arange(vocab)
    values = logits[ids]
    order = np.lexsort((ids, -values))
    return ids[order].astype(np.int64, copy=False), values[order].astype(np.float64)


_MIN_BLOCKED_VOCAB = 4096


def _top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits (in no particular order): exactly the set that
    `np.argpartition(logits, V - k)[V - k:]` keeps.

    The head of the vocabulary is viewed as a (rows, cols) matrix; the column maxima
    (a fast contiguous reduction) bound the answer: t = the k-th largest column maximum
    is reached by at least k logits, so every one of the k largest is >= t and lies in
    a column whose maximum is >= t. Only those few columns are searched exactly. When
    the k-th largest value is tied with logits outside the top k, the choice among the
    tied ids is argpartition's own, so that case is handed to argpartition unchanged.
    """
    vocab = logits.shape[0]
    rows = 32 if vocab < 100_000 else 64
    if vocab < _MIN_BLOCKED_VOCAB or k * 8 > vocab // rows or logits.ndim != 1:
        return np.argpartition(logits, vocab - k)[vocab - k:]
    cols = vocab // rows
    head = rows * cols
    matrix = logits[:head].reshape(rows, cols)
    col_max = matrix.max(axis=0)
    threshold = np.partition(col_max, cols - k)[cols - k]
    if head < vocab:  # the tail (fewer than `rows` logits) may raise the threshold only
        tail = logits[head:]
    else:
        tail = None
    hit_cols = np.flatnonzero(col_max >= threshold)
    r, c = np.nonzero(matrix[:, hit_cols] >= threshold)
    ids = r * cols + hit_cols[c]
    if tail is not None:
        ids = np.concatenate((ids, head + np.flatnonzero(tail >= threshold)))
    if ids.shape[0] > k:
        values = logits[ids]
        kth = np.partition(values, ids.shape[0] - k)[ids.shape[0] - k]
        keep = values >= kth
        if np.count_nonzero(keep) != k:  # tie at the boundary: argpartition decides
            return np.argpartition(logits, vocab - k)[vocab - k:]
        ids = ids[keep]
    return ids


# Candidate sets wider than this are not sorted whole: only their most probable SORTED_HEAD
# tokens are (every consumer reads at most 64 from the front: mixtures, the gate, logprobs).
# A full sort of a 152k vocabulary costs ~30 ms per step; this way top_k=0 costs ~2 ms.
SORTED_HEAD = 256


def filter_logits(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> Distribution:
    vocab = logits.shape[0]
    if not 0 < top_k <= SORTED_HEAD or top_k >= vocab:
        if vocab > SORTED_HEAD:
            return _filter_wide(logits, top_k if 0 < top_k < vocab else vocab, temperature, top_p, min_p)
    ids, values = top_candidates(logits, top_k)
    probs = softmax(values / temperature)
    keep = len(probs)
    if top_p < 1.0:
        # Smallest prefix whose mass reaches top_p (at least one token).
        keep = min(keep, int(probs.cumsum().searchsorted(top_p, side="left")) + 1)
    if min_p > 0.0:
        keep = min(keep, int(np.count_nonzero(probs[:keep] >= min_p * probs[0])))
    if keep < len(probs):
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return Distribution(ids, probs)


def _filter_wide(logits: np.ndarray, k: int, temperature: float, top_p: float, min_p: float) -> Distribution:
    """The same kept set and probabilities as sorting all k candidates (ties by id), but
    only the SORTED_HEAD most probable come sorted; the rest follow in candidate order."""
    ids = _top_k_ids(logits, k) if k < logits.shape[0] else np.arange(logits.shape[0])
    if k < logits.shape[0]:
        ids = np.sort(ids)  # candidate order = id order, as for the whole vocabulary
    probs = softmax(logits[ids].astype(np.float64) / temperature)
    keep = np.ones(len(ids), dtype=bool)
    if top_p < 1.0:
        descending = np.sort(probs)[::-1]
        count = min(len(probs), int(descending.cumsum().searchsorted(top_p, side="left")) + 1)
        threshold = descending[count - 1]
        keep = probs > threshold
        ties = np.flatnonzero(probs == threshold)  # lowest ids first, as a (-p, id) sort keeps them
        keep[ties[: count - int(np.count_nonzero(keep))]] = True
    if min_p > 0.0:
        keep &= probs >= min_p * probs.max()
    kept = np.flatnonzero(keep)
    ids, probs = ids[kept], probs[kept]
    probs = probs / probs.sum()
    n_head = min(SORTED_HEAD, len(ids))
    if n_head < len(ids):  # the n_head most probable; ties at the edge: lowest ids (arrays are in id order)
        edge = np.partition(probs, len(probs) - n_head)[len(probs) - n_head]
        above = np.flatnonzero(probs > edge)
        head = np.concatenate((above, np.flatnonzero(probs == edge)[: n_head - len(above)]))
    else:
        head = np.arange(len(ids))
    head = head[np.lexsort((ids[head], -probs[head]))]
    if n_head < len(ids):
        rest = np.ones(len(ids), dtype=bool)
        rest[head] = False
        order = np.concatenate((head, np.flatnonzero(rest)))
    else:
        order = head
    return Distribution(ids[order].astype(np.int64, copy=False), probs[order])


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
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


# Logits further than this below the largest have p = 0 exactly (exp underflows).
_NO_MASS = -1e4


def full_vocab_entropy(logits: np.ndarray) -> float:
    """Entropy of softmax(logits) over the whole vocabulary (Soft Thinking's Cold Stop,
    SwiReasoning's switches): exp in the logits' precision, sums in float64 (2e-9 relative
    from the all-float64 value at 152k).

    No BLAS: np.dot of two 152k vectors runs in NumPy's multi-threaded OpenBLAS, whose
    threads compete with llama.cpp's; it took 8 ms a call on a busy 2-core machine (0.03 ms
    on one thread). This takes ~0.25 ms (all in float64: 1.35 ms)."""
    shifted = logits - np.max(logits)
    # -inf logits (banned tokens, ignore_eos) have p = 0 and add nothing (0 * floor = 0, not
    # 0 * -inf = nan); every logit below the floor has p = 0 anyway.
    np.maximum(shifted, _NO_MASS, out=shifted)
    exp = np.exp(shifted)
    total = exp.sum(dtype=np.float64)
    exp *= shifted
    return float(math.log(total) - exp.sum(dtype=np.float64) / total)


def sample(dist: Distribution, rng: np.random.Generator) -> int:
    """Inverse-CDF draw with exactly one uniform per call, so every method that samples
    consumes the random stream identically (same seed -> same token sequence)."""
    u = rng.random()
    cdf = dist.probs.cumsum()
    index = min(int(cdf.searchsorted(u * cdf[-1], side="right")), len(dist) - 1)
    return int(dist.ids[index])


# OpenAI's convention for a log-probability that is effectively minus infinity (JSON has no -inf).
LOGPROB_FLOOR = -9999.0


def token_logprobs(dist: Distribution, token: int, n_top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """log p(token) under the filtered distribution (LOGPROB_FLOOR if the filter dropped
    it, e.g. an injected </think>), and the n_top most probable (id, log p) pairs."""
    hit = np.flatnonzero(dist.ids == token)
    prob = float(dist.probs[hit[0]]) if hit.size else 0.0
    k = min(n_top, len(dist))
    top = tuple(zip(dist.ids[:k].tolist(), [_safe_log(p) for p in dist.probs[:k].tolist()]))
    return _safe_log(prob), top


def _safe_log(prob: float) -> float:
    return max(math.log(prob), LOGPROB_FLOOR) if prob > 0.0 else LOGPROB_FLOOR


def effective_count(weights: np.ndarray) -> float:
    """N_eff = 1 / sum w_i^2: how many tokens a soft input superposes."""
    return float(1.0 / np.square(weights).sum())


# -- Stochastic Soft Thinking (Wu et al. 2025): noise on a soft input's mixture weights ----------

def gumbel_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Standard Gumbel draws g = -log(-log U)."""
    return -np.log(-np.log(rng.random(size)))


def gumbel_softmax_weights(probs: np.ndarray, gumbels: np.ndarray, tau: float) -> np.ndarray:
    """w = softmax((log p + g) / tau). With g = 0 and tau = 1 this is p itself; as tau -> 0
    it becomes the one-hot of argmax(log p + g), which is a draw from p (Gumbel-max)."""
    with np.errstate(divide="ignore"):
        scores = (np.log(probs) + gumbels) / tau
    return softmax(scores)


def dirichlet_weights(probs: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """w ~ Dir(alpha p): its mean is p for every alpha; larger alpha, less spread."""
    weights = rng.dirichlet(alpha * probs)
    total = weights.sum()
    if not np.isfinite(total) or total <= 0:  # every component underflowed: keep p
        return probs.copy()
    return weights / total


def noisy_weights(probs: np.ndarray, noise: str, rng: np.random.Generator, *, gumbel_tau: float,
                  dirichlet_alpha: float) -> np.ndarray:
    """The mixture weights of a soft input after the chosen noise ("none" returns `probs`)."""
    if noise == "gumbel":
        return gumbel_softmax_weights(probs, gumbel_noise(rng, len(probs)), gumbel_tau)
    if noise == "dirichlet":
        return dirichlet_weights(probs, dirichlet_alpha, rng)
    return probs
