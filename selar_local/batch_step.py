"""The batch-wide step: the decisions of N live sequences from one [N, vocab] logits
matrix, identical to each policy's own `step` on its row (state included), or, for the
loop (`accept=False`), to its `propose`: the loop tells each policy its token itself once
the grammar has seen it (decisions.py, `Policy.accept`).

The vocabulary-sized work of a step (the top-k cut, then temperature, softmax, top-p,
min-p) runs as a few NumPy calls over all rows that share a top-k; for cot and selar the
draw, the top-k_s renormalisation and the entropy run batched too, and every row then
ends in its policy's own `conclude` (parameters, noise stream, gate, thinking state), the
very function its per-sequence `decide` ends in: one decision per method, so the
per-sequence policies remain the readable definition of every method. A row is handed to the per-sequence path unchanged when
its answer could depend on a tie (the k-th largest logit equal to one outside the top k:
NumPy's argpartition decides those) or its filter is not a plain top-k (top_k = 0).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from selar_local.policies import CotPolicy, Policy, SelarPolicy, StepDecision
from selar_local.sampling import _MIN_BLOCKED_VOCAB, Distribution, _top_k_ids, filter_logits

WIDE_VOCAB = 100_000  # the vocabulary size from which rows are cut one by one (see _top_k_rows)


def decide_all(policies: Sequence[Policy], logits: np.ndarray, hidden: np.ndarray | None = None, *,
               accept: bool = True) -> list[StepDecision]:
    """policies[i] decides on logits[i]: exactly what policies[i].step(logits[i]) returns,
    state included (accept=True), or what policies[i].propose(logits[i], hidden[i]) returns
    (accept=False: the loop, which accepts each token once the grammar has seen it). A policy
    with tokens of its own to force (`Policy.step`) and one that reads the hidden state take
    their own path."""
    if accept and any(p.forcing for p in policies):  # step() plays those itself
        return [p.step(row) for p, row in zip(policies, logits)]
    dists, tables = _filter_all(logits, [p.params for p in policies])
    out: list[StepDecision | None] = [None] * len(policies)
    for table in tables:  # cot and selar rows that share k_s: their decisions in one pass too
        for ks, members in _decision_groups(policies, table).items():
            for i, decision in zip(members, _cot_selar_rows(policies, table, members, ks)):
                policies[i].last_dist = dists[i]
                out[i] = decision
    for i, (policy, dist, row) in enumerate(zip(policies, dists, logits)):
        if out[i] is not None:
            continue
        if type(policy).propose is not Policy.propose or type(policy).decide is Policy.decide:
            out[i] = policy.propose(row, None if hidden is None else hidden[i])  # its own path
            continue
        policy.last_dist = dist
        out[i] = policy.decide(dist, row)
    if accept:
        for policy, decision in zip(policies, out):
            policy.settle(decision, True)
    return out  # type: ignore[return-value]


def filter_rows(logits: np.ndarray, params: Sequence) -> list[Distribution]:
    """filter_logits(logits[i], T_i, top_k_i, top_p_i, min_p_i) for every row, batched
    over the rows that share a top_k."""
    return _filter_all(logits, params)[0]


class _Table:
    """The filtered candidates of rows that share a top_k: ids [n, k], probabilities
    [n, k] (zero past each row's kept length) and the kept lengths."""

    def __init__(self, rows: list[int], ids: np.ndarray, probs: np.ndarray, keep: np.ndarray):
        self.rows, self.ids, self.probs, self.keep = rows, ids, probs, keep
        self.index = {row: j for j, row in enumerate(rows)}


def _filter_all(logits: np.ndarray, params: Sequence) -> tuple[list[Distribution], list[_Table]]:
    n, vocab = logits.shape
    out: list[Distribution | None] = [None] * n
    tables = []
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
            dists, table = _filter_candidates(logits, chosen, ids[keep_rows], [params[i] for i in chosen])
            tables.append(table)
            for i, dist in zip(chosen, dists):
                out[i] = dist
    return out, tables  # type: ignore[return-value]


def _batchable(k: int, vocab: int) -> bool:
    rows = 32 if vocab < 100_000 else 64
    return vocab >= _MIN_BLOCKED_VOCAB and 0 < k and k * 8 <= vocab // rows


def _top_k_rows(logits: np.ndarray, rows: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the k largest logits of each given row ([len(rows), k], in no order) and
    whether that set is certain (no tie with a logit outside it).

    Wide vocabularies go row by row (`_top_k_ids`, which settles ties itself): in the
    serving loop the filter of 16 rows of 152k logits took 0.95-1.06 ms with one pass over
    all of them and 0.70-0.91 ms row by row, whose gathers find their row still in cache."""
    if logits.shape[1] >= WIDE_VOCAB:
        ids = np.stack([_top_k_ids(logits[i], k) for i in rows])
        return ids, np.ones(len(rows), dtype=bool)
    return _top_k_block(logits, rows, k)


def _top_k_block(logits: np.ndarray, rows: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """_top_k_rows in one pass over all the rows.

    As in sampling._top_k_ids: the head of each row viewed as (r, c); the k columns with
    the largest maxima hold every logit above the k-th largest column maximum, so the
    top k is found among their r * k entries (plus the tail past r * c). The answer is
    certain when no other column reaches the k-th value and no candidate ties it."""
    n_rows = len(rows)
    vocab = logits.shape[1]
    r = 32 if vocab < 100_000 else 64
    c = vocab // r
    head = r * c
    block = logits[rows] if n_rows != logits.shape[0] else np.ascontiguousarray(logits)
    matrix = block[:, :head].reshape(n_rows, r, c)
    col_max = matrix.max(axis=1)                                   # [n, c]
    cols = np.argpartition(col_max, c - k, axis=1)[:, c - k:]      # [n, k]
    cand_ids = (np.arange(r)[None, :, None] * c + cols[:, None, :]).reshape(n_rows, r * k)
    # One flat gather (3x faster than take_along_axis over the [n, r, c] view).
    cand = block.reshape(-1).take(cand_ids + (np.arange(n_rows) * vocab)[:, None])
    if head < vocab:
        cand = np.concatenate((cand, block[:, head:]), axis=1)
        cand_ids = np.concatenate((cand_ids, np.broadcast_to(np.arange(head, vocab), (n_rows, vocab - head))), axis=1)
    top = np.argpartition(cand, cand.shape[1] - k, axis=1)[:, cand.shape[1] - k:]
    values = np.take_along_axis(cand, top, axis=1)
    kth = values.min(axis=1)
    exact = ((np.count_nonzero(col_max >= kth[:, None], axis=1) <= k)
             & (np.count_nonzero(cand >= kth[:, None], axis=1) == k))
    return np.take_along_axis(cand_ids, top, axis=1), exact


def _filter_candidates(logits: np.ndarray, rows: list[int], ids: np.ndarray,
                       params: Sequence) -> tuple[list[Distribution], _Table]:
    """filter_logits after the top-k set is known: the same operations, row-wise."""
    n, k = ids.shape
    values = logits[np.asarray(rows)[:, None], ids]  # float32, as logits[ids]; gathers n * k values only
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
    padded = probs
    for length in np.unique(keep):
        members = np.flatnonzero(keep == length)
        length = int(length)
        if length == k:
            for i in members:
                out[i] = Distribution(ids[i], probs[i])
            continue
        part = probs[members, :length]  # a fresh [m, length] array: each row summed as alone
        part = part / part.sum(axis=1, keepdims=True)
        if padded is probs:
            padded = probs.copy()
        padded[members, :length] = part
        padded[members, length:] = 0.0
        for j, i in enumerate(members):
            out[i] = Distribution(ids[i, :length], part[j])
    return out, _Table(rows, ids, padded, keep)  # type: ignore[return-value]


def _decision_groups(policies: Sequence[Policy], table: _Table) -> dict[int, list[int]]:
    """Rows of this table whose decision runs batched: plain cot or selar policies with
    k_s < 8 (NumPy sums fewer than 8 numbers left to right, so a row-wise sum over a
    zero-padded matrix equals each row's own sum over its kept candidates)."""
    groups: dict[int, list[int]] = {}
    for row in table.rows:
        policy = policies[row]
        ks = policy.params.ks
        if ks < 8 and type(policy) in (CotPolicy, SelarPolicy):
            groups.setdefault(ks, []).append(row)
    return groups


def _cot_selar_rows(policies: Sequence[Policy], table: _Table, members: list[int], ks: int) -> list[StepDecision]:
    """CotPolicy.decide and SelarPolicy.decide for rows that share k_s: the NumPy part in
    one pass (normalized_topk, the inverse-CDF draw, the chosen token's probability), then
    each row's own `conclude`."""
    at = [table.index[i] for i in members]
    ids, probs, keep = table.ids[at], table.probs[at], table.keep[at]
    top = probs[:, :ks]
    q = top / top.sum(axis=1, keepdims=True)
    logs = np.log(np.where(q > 0, q, 1.0))
    h = -(np.where(q > 0, q * logs, 0.0)).sum(axis=1) / math.log(ks)
    h = np.where(h <= 0.0, 0.0, np.minimum(h, 1.0))
    # Tokens: the argmax for greedy rows, else one uniform from the row's own stream.
    u = np.array([0.0 if policies[i].params.greedy else policies[i].rng.random() for i in members])
    cdf = probs.cumsum(axis=1)
    last = np.take_along_axis(cdf, (keep - 1)[:, None], axis=1)[:, 0]
    within = np.arange(probs.shape[1])[None, :] < keep[:, None]
    drawn = np.minimum(np.count_nonzero((cdf <= (u * last)[:, None]) & within, axis=1), keep - 1)
    index = np.where([policies[i].params.greedy for i in members], 0, drawn)
    tokens = np.take_along_axis(ids, index[:, None], axis=1)[:, 0].tolist()
    lengths = np.minimum(keep, ks).tolist()  # a distribution cut below k_s keeps fewer
    chosen = np.take_along_axis(probs, index[:, None], axis=1)[:, 0].tolist()
    top_ids = ids[:, :ks]
    out = []
    for j, i in enumerate(members):
        n = lengths[j]
        top, weights = (top_ids[j], q[j]) if n == ks else (top_ids[j, :n], q[j, :n])
        # math.log of the kept probability: token_logprob's own value (the row's
        # distribution holds exactly these probabilities, and the ids are distinct).
        out.append(policies[i].conclude(tokens[j], math.log(chosen[j]), float(h[j]), top, weights))
    return out
