"""The batch-wide step decides exactly as each policy alone (pure NumPy, no model)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from selar_local.batch_step import decide_all, filter_rows
from selar_local.params import DecodeParams
from selar_local.policies import TokenInfo, make_policy
from selar_local.sampling import filter_logits

VOCABS = (49_152, 151_936)


def _info(vocab: int, rng) -> TokenInfo:
    return TokenInfo(vocab, rng.random(vocab) < 0.01, think_open=vocab - 2, think_close=vocab - 1)


def _random_params(rng, i: int) -> DecodeParams:
    method = ("cot", "selar", "soft", "moi")[i % 4]
    top_k = int(rng.choice([20, 20, 40, 5, 0])) if i % 7 else 0
    ks = int(rng.integers(2, 5))
    return DecodeParams(
        method=method, seed=int(rng.integers(0, 1000)), greedy=bool(rng.random() < 0.3),
        temperature=float(rng.choice([0.6, 1.0, 0.3, 1.7])), top_k=top_k, ks=min(ks, top_k) if top_k else ks,
        top_p=float(rng.choice([0.95, 1.0, 0.5, 0.8])), min_p=float(rng.choice([0.0, 0.0, 0.05, 0.2])),
        tau=float(rng.choice([0.5, 0.2, 0.9])), lam=float(rng.choice([1.0, 0.5])), soft_topk=int(rng.integers(1, 12)),
        moi_topn=int(rng.integers(2, 10)), cold_stop_steps=int(rng.integers(1, 4)),
        cold_stop_entropy=float(rng.choice([0.01, 5.0])), thinking_only=bool(rng.random() < 0.3),
    )


def _logits(rng, n: int, vocab: int) -> np.ndarray:
    """Realistic rows (a few strong candidates over a flat tail), some with exact ties."""
    rows = rng.normal(0.0, 2.0, size=(n, vocab)).astype(np.float32)
    for i in range(n):
        hot = rng.choice(vocab, size=int(rng.integers(1, 30)), replace=False)
        rows[i, hot] += rng.uniform(4, 14, size=hot.size).astype(np.float32)
        if i % 5 == 3:  # ties across the top-k boundary and inside it
            rows[i, rng.choice(vocab, size=40, replace=False)] = rows[i].max() - 1.0
        if i % 6 == 5:  # sorted input, rounded values (many ties)
            rows[i] = np.round(rows[i])
    return rows


def _same(a, b) -> bool:
    if a.mix_ids is None or b.mix_ids is None:
        mix = a.mix_ids is None and b.mix_ids is None
    else:
        mix = np.array_equal(a.mix_ids, b.mix_ids) and np.array_equal(a.mix_weights, b.mix_weights)
    return (a.token == b.token and a.soft == b.soft and a.entropy == b.entropy and mix
            and np.array_equal(a.top_ids, b.top_ids) and np.array_equal(a.top_probs, b.top_probs))


@pytest.mark.parametrize("vocab", VOCABS)
def test_filtered_distributions_are_bit_identical(vocab):
    rng = np.random.default_rng(vocab)
    for n in range(1, 33):
        logits = _logits(rng, n, vocab)
        params = [_random_params(rng, i + n) for i in range(n)]
        batched = filter_rows(logits, params)
        for row, p, d in zip(logits, params, batched):
            alone = filter_logits(row, p.temperature, p.top_k, p.top_p, p.min_p)
            assert np.array_equal(d.ids, alone.ids)
            assert np.array_equal(d.probs, alone.probs)  # bit for bit, not approximately


@pytest.mark.parametrize("vocab", VOCABS)
def test_decisions_and_states_equal_the_per_sequence_path(vocab):
    """N = 1..32 sequences with mixed methods and parameters, over several steps (random
    streams, gates, thinking spans and Cold Stop counters evolve on both sides alike)."""
    rng = np.random.default_rng(7 + vocab)
    info = _info(vocab, rng)
    for n in range(1, 33):
        params = [_random_params(rng, i * 3 + n) for i in range(n)]
        thinking = [None if i % 3 == 0 else bool(i % 2) for i in range(n)]
        alone = [make_policy(p, info, in_thinking=t) for p, t in zip(params, thinking)]
        batch = [make_policy(p, info, in_thinking=t) for p, t in zip(params, thinking)]
        for _ in range(3):
            logits = _logits(rng, n, vocab)
            expected = [policy.step(row) for policy, row in zip(alone, logits)]
            got = decide_all(batch, logits)
            assert all(_same(a, b) for a, b in zip(expected, got))
            for a, b in zip(alone, batch):
                assert a.in_thinking == b.in_thinking
                assert getattr(a, "low_entropy_run", None) == getattr(b, "low_entropy_run", None)
                assert a.rng.random() == b.rng.random()  # the random streams are at the same point
                assert np.array_equal(a.last_dist.ids, b.last_dist.ids)


def _every_field_equal(a, b) -> bool:
    """Every StepDecision field, the log-probability and `final` included (arrays exactly)."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if x is None or y is None or not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("vocab", VOCABS)
def test_cot_and_selar_decisions_equal_alone_in_every_field(vocab):
    """The rows decide_all takes batch-wide (plain cot / selar, top_k > 0, k_s < 8) give
    the per-sequence decision field for field: the log-probability of the shown token was
    0 on that path, and selar's mixture noise was skipped."""
    rng = np.random.default_rng(11 + vocab)
    info = _info(vocab, rng)
    seen_logprob = 0
    for n in range(2, 17):
        params = [DecodeParams(method=("cot", "selar")[i % 2], seed=int(rng.integers(0, 1000)),
                               greedy=bool(rng.random() < 0.3), temperature=float(rng.choice([0.6, 1.0])),
                               top_k=int(rng.choice([5, 20, 40])), ks=int(rng.integers(2, 5)),
                               top_p=float(rng.choice([0.95, 1.0, 0.8])), min_p=float(rng.choice([0.0, 0.05])),
                               tau=float(rng.choice([0.0, 0.5])), soft_noise=str(rng.choice(["none", "gumbel", "dirichlet"])))
                  for i in range(n)]
        alone = [make_policy(p, info) for p in params]
        batch = [make_policy(p, info) for p in params]
        for _ in range(3):
            logits = _logits(rng, n, vocab)
            expected = [policy.step(row) for policy, row in zip(alone, logits)]
            got = decide_all(batch, logits)
            for a, b in zip(expected, got):
                assert _every_field_equal(a, b), (a, b)
            seen_logprob += sum(d.logprob < 0 for d in got)
            for a, b in zip(alone, batch):
                assert a.noise_rng.random() == b.noise_rng.random()
    assert seen_logprob > 100  # the comparison covered real log-probabilities, not zeros
