"""The batch-wide step: the decisions of N live sequences from one [N, vocab] logits
matrix, identical to each policy's own `step` on its row.

The vocabulary-sized work of a step (the top-k cut, then temperature, softmax, top-p,
min-p) runs as a few NumPy calls over all rows that share a top-k; what follows works on
k numbers per sequence and stays each policy's own `decide` (its parameters, random
stream, gate and thinking state), so the per-sequence policies remain the readable
definition of every method. A row is handed to the per-sequence path unchanged when
its answer could depend on a tie (the k-th largest logit equal to one outside the top k:
NumPy's argpartition decides those) or its filter is not a plain top-k (top_k = 0).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from selar_local.policies import Policy, StepDecision
from selar_local.sampling import _MIN_BLOCKED_VOCAB, Distribution, filter_logits


def decide_all(policies: Sequence[Policy], logits: np.ndarray) -> list[StepDecision]:
    """policies[i] decides on logits[i]; exactly what policies[i].step(logits[i]) returns."""
    dists = filter_rows(logits, [p.params for p in policies])
    out = []
    for policy, dist, row in zip(policies, dists, logits):
        if type(policy).decide is Policy.decide:  # a policy that only defines step()
            out.append(policy.step(row))
            continue
        policy.last_dist = dist
        out.append(policy.decide(dist, row))
    return out


def filter_rows(logits: np.ndarray, params: Sequence) -> list[Distribution]:
    """filter_logits(logits[i], T_i, top_k_i, top_p_i, min_p_i) for every row, batched
    over the rows that share a top_k."""
    n, vocab = logits.shape
    out: list[Distribution | None] = [None] * n
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        if _batchable(p.top_k, vocab):
            groups.setdefault(p.top_k, []).append(i)
        else:
            out[i] = filter_logits(logits[i], p.temperature, p.top_k, p.top_p, p.min_p)
    for k, rows in groups.items():
        ids, exact = _top_k_rows(logits, rows, k)
        for j in np.flatnonzero(~exact):  # a tie at the boundary: argpartition's own choice
            p = params[rows[j]]
            out[rows[j]] = filter_logits(logits[rows[j]], p.temperature, p.top_k, p.top_p, p.min_p)
        keep_rows = np.flatnonzero(exact)
        if keep_rows.size:
            chosen = [rows[j] for j in keep_rows]
            dists = _filter_candidates(logits, chosen, ids[keep_rows], [params[i] for i in chosen])
            for i, dist in zip(chosen, dists):
                out[i] = dist
    return out  # type: ignore[return-value]


def _batchable(k: int, vocab: int) -> bool:
    rows = 32 if vocab < 100_000 else 64
    return vocab >= _MIN_BLOCKED_VOCAB and 0 < k and k * 8 <= vocab // rows


def _top_k_rows(logits: np.ndarray, rows: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the k largest logits of each given row ([len(rows), k], in no order) and
    whether that set is certain (no tie with a logit outside it).

    As in sampling._top_k_ids: the head of each row viewed as (r, c); the k columns with
    the largest maxima hold every logit above the k-th largest column maximum, so the
    top k is found among their r * k entries (plus the tail past r * c). The answer is
    certain when no other column reaches the k-th value and no candidate ties it."""
    n_rows = len(rows)
    vocab = logits.shape[1]
    r = 32 if vocab < 100_000 else 64
    c = vocab // r
    head = r * c
    block = logits[rows] if n_rows != logits.shape[0] else logits
    matrix = block[:, :head].reshape(n_rows, r, c)
    col_max = matrix.max(axis=1)                                   # [n, c]
    cols = np.argpartition(col_max, c - k, axis=1)[:, c - k:]      # [n, k]
    cand = np.take_along_axis(matrix, cols[:, None, :], axis=2).reshape(n_rows, r * k)
    cand_ids = (np.arange(r)[None, :, None] * c + cols[:, None, :]).reshape(n_rows, r * k)
    if head < vocab:
        cand = np.concatenate((cand, block[:, head:]), axis=1)
        cand_ids = np.concatenate((cand_ids, np.broadcast_to(np.arange(head, vocab), (n_rows, vocab - head))), axis=1)
    top = np.argpartition(cand, cand.shape[1] - k, axis=1)[:, cand.shape[1] - k:]
    values = np.take_along_axis(cand, top, axis=1)
    kth = values.min(axis=1)
    exact = ((np.count_nonzero(col_max >= kth[:, None], axis=1) <= k)
             & (np.count_nonzero(cand >= kth[:, None], axis=1) == k))
    return np.take_along_axis(cand_ids, top, axis=1), exact


def _filter_candidates(logits: np.ndarray, rows: list[int], ids: np.ndarray, params: Sequence) -> list[Distribution]:
    """filter_logits after the top-k set is known: the same operations, row-wise."""
    n, k = ids.shape
    values = np.take_along_axis(logits[rows], ids, axis=1)  # float32, as logits[ids]
    order = np.lexsort((ids, -values), axis=1)
    ids = np.take_along_axis(ids, order, axis=1).astype(np.int64, copy=False)
    values = np.take_along_axis(values, order, axis=1).astype(np.float64)
    temperature = np.array([p.temperature for p in params], dtype=np.float64)
    scaled = values / temperature[:, None]
    shifted = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    keep = np.full(n, k)
    top_p = np.array([p.top_p for p in params])
    cut_p = top_p < 1.0
    if cut_p.any():
        below = np.count_nonzero(probs.cumsum(axis=1) < top_p[:, None], axis=1) + 1
        keep = np.where(cut_p, np.minimum(keep, below), keep)
    min_p = np.array([p.min_p for p in params])
    cut_m = min_p > 0.0
    if cut_m.any():
        within = np.arange(k)[None, :] < keep[:, None]
        count = np.count_nonzero((probs >= min_p[:, None] * probs[:, :1]) & within, axis=1)
        keep = np.where(cut_m, np.minimum(keep, count), keep)
    out: list[Distribution | None] = [None] * n
    for length in np.unique(keep):
        members = np.flatnonzero(keep == length)
        length = int(length)
        if length == k:
            for i in members:
                out[i] = Distribution(ids[i], probs[i])
            continue
        part = probs[members, :length]  # a fresh [m, length] array: each row summed as alone
        part = part / part.sum(axis=1, keepdims=True)
        for j, i in enumerate(members):
            out[i] = Distribution(ids[i, :length], part[j])
    return out  # type: ignore[return-value]
