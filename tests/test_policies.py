"""Exact tests of the pure NumPy parts: filter, entropy, gate, mixtures (no llama.cpp)."""
import math

import numpy as np
import pytest

from selar_local.errors import InvalidParameterError
from selar_local.mathsym import math_symbol_mask
from selar_local.params import DecodeParams
from selar_local.policies import (
    CotPolicy,
    MixtureOfInputsPolicy,
    SelarPolicy,
    SoftThinkingPolicy,
    TokenInfo,
    contrastive_weights,
)
from selar_local.sampling import (
    Distribution,
    effective_count,
    entropy,
    filter_logits,
    full_vocab_entropy,
    normalized_topk,
    sample,
)

VOCAB = 8


def info(math_ids=(), think=None):
    mask = np.zeros(VOCAB, dtype=bool)
    mask[list(math_ids)] = True
    open_, close = think if think else (None, None)
    return TokenInfo(VOCAB, mask, open_, close)


def logits_from_probs(probs):
    """Logits whose softmax is `probs` (padded with very unlikely tokens)."""
    out = np.full(VOCAB, -1e4, dtype=np.float32)
    out[: len(probs)] = np.log(probs)
    return out


class TestFilter:
    def test_temperature_then_top_k(self):
        logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
        dist = filter_logits(logits, temperature=1.0, top_k=2)
        assert dist.ids.tolist() == [0, 1]
        # softmax over the two kept logits: e/(e+1), 1/(e+1)
        assert dist.probs == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)])

    def test_temperature_sharpens(self):
        logits = np.array([1.0, 0.0], dtype=np.float32)
        dist = filter_logits(logits, temperature=0.5)
        # logits / 0.5 = [2, 0] -> e^2/(e^2+1)
        assert dist.probs[0] == pytest.approx(math.exp(2) / (math.exp(2) + 1))

    def test_top_p_keeps_smallest_prefix_reaching_mass(self):
        logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
        assert len(filter_logits(logits, top_p=0.5)) == 1   # 0.5 reaches 0.5
        assert len(filter_logits(logits, top_p=0.79)) == 2  # 0.8 reaches 0.79
        kept = filter_logits(logits, top_p=0.95)
        assert kept.ids.tolist() == [0, 1, 2]
        assert kept.probs == pytest.approx(np.array([0.5, 0.3, 0.15]) / 0.95)

    def test_min_p_relative_to_top_probability(self):
        logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
        # threshold 0.4 * 0.5 = 0.2 keeps 0.5 and 0.3
        assert filter_logits(logits, min_p=0.4).ids.tolist() == [0, 1]

    def test_ties_broken_by_token_id(self):
        logits = np.array([-1, 0, -1, 0, -1, 0], dtype=np.float32)
        assert filter_logits(logits, top_k=3).ids.tolist() == [1, 3, 5]

    def test_does_not_modify_logits(self):
        logits = np.array([3.0, 1.0, 2.0], dtype=np.float32)
        before = logits.copy()
        filter_logits(logits, temperature=0.6, top_k=2, top_p=0.9, min_p=0.1)
        assert np.array_equal(logits, before)


class TestEntropy:
    def test_normalised_topk_entropy(self):
        dist = Distribution(np.arange(4), np.array([0.4, 0.2, 0.2, 0.2]))
        ids, q, h = normalized_topk(dist, 3)
        assert ids.tolist() == [0, 1, 2]
        assert q == pytest.approx([0.5, 0.25, 0.25])
        # H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2; normalised by ln 3
        assert h == pytest.approx(1.5 * math.log(2) / math.log(3))

    def test_uniform_topk_is_one_and_single_token_is_zero(self):
        assert normalized_topk(Distribution(np.arange(3), np.ones(3) / 3), 3)[2] == pytest.approx(1.0)
        assert normalized_topk(Distribution(np.arange(1), np.ones(1)), 3)[2] == 0.0

    def test_entropy_and_full_vocab_entropy_agree(self):
        logits = np.array([1.0, 0.5, -2.0, 0.0])
        p = np.exp(logits) / np.exp(logits).sum()
        assert full_vocab_entropy(logits) == pytest.approx(entropy(p))
        assert entropy(np.array([0.5, 0.5])) == pytest.approx(math.log(2))

    def test_full_vocab_entropy_of_a_wide_float32_row_with_banned_tokens(self):
        # float32 exp (relative error ~1e-7 a term), float64 sums: within 1e-6 of the float64 value
        logits = (np.random.default_rng(5).standard_normal(151_936) * 3).astype(np.float32)
        logits[[0, 7, 151_935]] = -np.inf  # ignore_eos bans: p = 0, no nan
        finite = logits[np.isfinite(logits)].astype(np.float64)
        p = np.exp(finite - finite.max())
        p /= p.sum()
        reference = float(-(p * np.log(p)).sum())
        assert full_vocab_entropy(logits) == pytest.approx(reference, rel=1e-6)
        assert np.isinf(logits[[0, 7, 151_935]]).all()  # the row itself is untouched
        one_hot = np.full(151_936, -np.inf, dtype=np.float32)
        one_hot[3] = 2.0
        assert full_vocab_entropy(one_hot) == 0.0

    def test_effective_count(self):
        assert effective_count(np.array([0.5, 0.5])) == pytest.approx(2.0)
        assert effective_count(np.array([1.0])) == pytest.approx(1.0)


class TestSampling:
    def test_inverse_cdf_uses_one_uniform(self):
        dist = Distribution(np.array([7, 3, 5]), np.array([0.5, 0.3, 0.2]))
        rng = np.random.default_rng(0)
        u = np.random.default_rng(0).random(50)
        expected = [7 if x < 0.5 else 3 if x < 0.8 else 5 for x in u]
        assert [sample(dist, rng) for _ in range(50)] == expected

    def test_frequencies_follow_probabilities(self):
        dist = Distribution(np.array([0, 1]), np.array([0.8, 0.2]))
        rng = np.random.default_rng(1)
        draws = np.array([sample(dist, rng) for _ in range(4000)])
        assert abs((draws == 0).mean() - 0.8) < 0.03


class TestSelar:
    def test_contrastive_weights_formula(self):
        q = np.array([0.5, 0.3, 0.2])
        # (1 + 0.5) q - 0.5 e1 = [0.25, 0.45, 0.3]
        assert contrastive_weights(q.copy(), 0.5) == pytest.approx([0.25, 0.45, 0.3])
        w = contrastive_weights(np.array([0.6, 0.3, 0.1]), 1.0)
        assert w == pytest.approx([0.2, 0.6, 0.2]) and w.sum() == pytest.approx(1.0)
        assert contrastive_weights(np.array([0.4, 0.35, 0.25]), 2.0)[0] < 0  # leaves the hull

    def test_soft_step_weights_for_uncertain_logits(self):
        probs = [0.4, 0.35, 0.25]
        params = DecodeParams(method="selar", greedy=True, temperature=1.0, top_k=0, top_p=1.0, tau=0.5, lam=1.0)
        decision = SelarPolicy(params, info()).step(logits_from_probs(probs))
        q = np.array(probs)
        h = entropy(q) / math.log(3)
        assert decision.soft and decision.token == 0
        assert decision.entropy == pytest.approx(h)
        assert decision.mix_ids.tolist() == [0, 1, 2]
        assert decision.mix_weights == pytest.approx((1 + h) * q - h * np.array([1, 0, 0]))

    def test_confident_step_is_discrete(self):
        params = DecodeParams(method="selar", greedy=True, temperature=1.0, top_k=0, top_p=1.0)
        decision = SelarPolicy(params, info()).step(logits_from_probs([0.97, 0.02, 0.01]))
        assert not decision.soft and decision.mix_ids is None

    def test_math_symbol_forces_discrete(self):
        params = DecodeParams(method="selar", greedy=True, temperature=1.0, top_k=0, top_p=1.0)
        logits = logits_from_probs([0.4, 0.35, 0.25])
        assert SelarPolicy(params, info()).step(logits).soft
        assert not SelarPolicy(params, info(math_ids=[0])).step(logits).soft

    def test_tau_above_one_reproduces_cot_exactly(self):
        rng = np.random.default_rng(3)
        steps = [rng.normal(size=VOCAB).astype(np.float32) * 2 for _ in range(200)]
        params = DecodeParams(method="selar", tau=1.01, seed=7, top_k=5)
        selar = SelarPolicy(params, info())
        cot = CotPolicy(params.replace(method="cot"), info())
        decisions = [selar.step(x) for x in steps]
        assert not any(d.soft for d in decisions)
        assert [d.token for d in decisions] == [cot.step(x).token for x in steps]

    def test_soft_share_falls_as_tau_rises(self):
        rng = np.random.default_rng(4)
        steps = [rng.normal(size=VOCAB).astype(np.float32) * 1.5 for _ in range(300)]
        shares = []
        for tau in (0.0, 0.3, 0.6, 0.9, 1.1):
            policy = SelarPolicy(DecodeParams(method="selar", tau=tau, top_k=5), info())
            shares.append(np.mean([policy.step(x).soft for x in steps]))
        assert shares[0] == 1.0 and shares[-1] == 0.0
        assert all(a >= b for a, b in zip(shares, shares[1:]))
        assert shares[1] > shares[3]

    def test_thinking_only_gates_outside_span(self):
        params = DecodeParams(method="selar", greedy=True, temperature=1.0, top_k=0, top_p=1.0, thinking_only=True)
        logits = logits_from_probs([0.4, 0.35, 0.25])
        tags = info(think=(6, 7))
        assert not SelarPolicy(params, tags, in_thinking=False).step(logits).soft
        assert SelarPolicy(params, tags, in_thinking=True).step(logits).soft

    def test_closing_think_tag_ends_the_span(self):
        params = DecodeParams(method="selar", greedy=True, temperature=1.0, top_k=0, top_p=1.0, thinking_only=True)
        policy = SelarPolicy(params, info(think=(6, 7)), in_thinking=True)
        closing = np.full(VOCAB, -10.0, dtype=np.float32)
        closing[7] = 10.0
        assert policy.step(closing).token == 7
        assert not policy.step(logits_from_probs([0.4, 0.35, 0.25])).soft


class TestSoftThinking:
    def test_mixture_of_top_tokens_shows_argmax(self):
        params = DecodeParams(method="soft", temperature=1.0, top_k=0, top_p=1.0, soft_topk=2)
        decision = SoftThinkingPolicy(params, info()).step(logits_from_probs([0.5, 0.3, 0.2]))
        assert decision.soft and decision.token == 0
        assert decision.mix_ids.tolist() == [0, 1]
        assert decision.mix_weights == pytest.approx([0.5 / 0.8, 0.3 / 0.8])

    def test_cold_stop_emits_think_close(self):
        params = DecodeParams(method="soft", cold_stop_entropy=0.01, cold_stop_steps=3)
        policy = SoftThinkingPolicy(params, info(think=(6, 7)), in_thinking=True)
        confident = np.full(VOCAB, -30.0, dtype=np.float32)
        confident[2] = 30.0
        tokens = [policy.step(confident) for _ in range(4)]
        assert [d.soft for d in tokens[:2]] == [True, True]
        assert tokens[2].token == 7 and not tokens[2].soft
        assert not tokens[3].soft

    def test_outside_thinking_is_discrete(self):
        params = DecodeParams(method="soft")
        policy = SoftThinkingPolicy(params, info(think=(6, 7)), in_thinking=False)
        assert not policy.step(logits_from_probs([0.4, 0.35, 0.25])).soft


class TestMixtureOfInputs:
    def test_weights_formula(self):
        params = DecodeParams(method="moi", greedy=True, temperature=1.0, top_k=0, top_p=1.0, moi_topn=3, moi_beta=1.0)
        probs = np.array([0.5, 0.3, 0.2])
        decision = MixtureOfInputsPolicy(params, info()).step(logits_from_probs(probs))
        h = entropy(probs) / math.log(3)
        onehot = np.array([1.0, 0, 0])
        expected = h * (probs + onehot) / 2 + (1 - h) * onehot
        assert decision.soft and decision.mix_weights == pytest.approx(expected)
        assert decision.mix_weights.sum() == pytest.approx(1.0)


class TestParams:
    @pytest.mark.parametrize(
        "changes, name",
        [({"tau": -0.1}, "tau"), ({"tau": float("nan")}, "tau"), ({"lam": -1}, "lam"), ({"ks": 1}, "ks"),
         ({"ks": 30}, "ks"), ({"temperature": 0}, "temperature"), ({"top_p": 0}, "top_p"),
         ({"min_p": 1.0}, "min_p"), ({"method": "beam"}, "method"), ({"max_tokens": 0}, "max_tokens"),
         ({"ks": 2.5}, "ks"), ({"stop": [""]}, "stop")],
    )
    def test_invalid_values_name_the_parameter(self, changes, name):
        with pytest.raises(InvalidParameterError, match=f"invalid {name}="):
            DecodeParams(**changes)

    def test_published_defaults(self):
        p = DecodeParams()
        assert (p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (0.6, 20, 0.95, 0.0, 41)
        assert (p.tau, p.lam, p.ks) == (0.5, 1.0, 3)

    def test_from_dict_rejects_unknown_keys(self):
        with pytest.raises(InvalidParameterError, match="taux"):
            DecodeParams.from_dict({"taux": 0.5})
        assert DecodeParams.from_dict({"tau": 0.7, "lam": None}).tau == 0.7


def test_math_symbol_mask_keeps_single_token_symbols():
    table = {"1": [5], "x": [3], "\\frac": [1, 2]}
    mask = math_symbol_mask(lambda s: table.get(s, []), VOCAB, symbols=table)
    assert mask.tolist() == [False, False, False, True, False, True, False, False]



def _fully_sorted_filter(logits, temperature, top_k, top_p, min_p):
    """The definition: sort every candidate by (-logit, id), then cut."""
    from selar_local.sampling import softmax

    vocab = len(logits)
    k = top_k if 0 < top_k < vocab else vocab
    order = np.lexsort((np.arange(vocab), -logits.astype(np.float64)))[:k]
    probs = softmax(logits[order].astype(np.float64) / temperature)
    keep = len(probs)
    if top_p < 1.0:
        keep = min(keep, int(probs.cumsum().searchsorted(top_p, side="left")) + 1)
    if min_p > 0.0:
        keep = min(keep, int(np.count_nonzero(probs[:keep] >= min_p * probs[0])))
    return order[:keep], probs[:keep] / probs[:keep].sum()


@pytest.mark.parametrize("vocab", [300, 5000, 49152])
@pytest.mark.parametrize("settings", [(1.0, 0, 1.0, 0.0), (0.6, 0, 0.95, 0.0), (1.5, 0, 0.99, 0.0),
                                      (1.0, 0, 1.0, 0.01), (0.7, 1000, 0.9, 0.0), (0.6, 0, 0.5, 0.05)])
@pytest.mark.parametrize("ties", [False, True])
def test_wide_filter_keeps_exactly_the_fully_sorted_set(vocab, settings, ties):
    """Wide candidate sets (top_k=0 or > SORTED_HEAD) sort only their head: the kept set and
    probabilities equal the full sort's, and the first SORTED_HEAD come in the same order
    (ties, made by integer logits, broken by token id)."""
    from selar_local.sampling import SORTED_HEAD

    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal(vocab).astype(np.float32) * 3
    if ties:
        logits = np.round(logits).astype(np.float32)
    dist = filter_logits(logits, *settings)
    ref_ids, ref_probs = _fully_sorted_filter(logits, *settings)
    assert sorted(dist.ids.tolist()) == sorted(ref_ids.tolist())
    assert dist.ids[:SORTED_HEAD].tolist() == ref_ids[:SORTED_HEAD].tolist()
    by_id = dict(zip(ref_ids.tolist(), ref_probs))
    # the same numbers, summed in another order: float64 rounding, far below 1e-12
    assert max(abs(by_id[i] - p) for i, p in zip(dist.ids.tolist(), dist.probs)) < 1e-12
    assert abs(dist.probs.sum() - 1.0) < 1e-12
