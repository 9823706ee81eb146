"""Exact tests of SwiReasoning and Stochastic Soft Thinking on hand-made logits (no llama.cpp)."""
import math

import numpy as np
import pytest

from selar_local.params import DecodeParams
from selar_local.policies import (
    SWIR_ANSWER_TOKENS,
    CotPolicy,
    SelarPolicy,
    SoftThinkingPolicy,
    SwiReasoningPolicy,
    TokenInfo,
    blend_with_row,
    contrastive_weights,
    linear_schedule,
    swir_switch,
)
from selar_local.sampling import (
    dirichlet_weights,
    full_vocab_entropy,
    gumbel_noise,
    gumbel_softmax_weights,
    noisy_weights,
    softmax,
)

VOCAB = 8
THINK_OPEN, THINK_CLOSE = 6, 7
ANSWER_PREFIX = (4, 5)


def info(math_ids=(), think=True, answer_prefix=ANSWER_PREFIX):
    mask = np.zeros(VOCAB, dtype=bool)
    mask[list(math_ids)] = True
    if think:
        return TokenInfo(VOCAB, mask, THINK_OPEN, THINK_CLOSE, answer_prefix)
    return TokenInfo(VOCAB, mask, None, None, answer_prefix)


def spread(level: float) -> np.ndarray:
    """Logits over tokens 0..3 (tags and prefix tokens unlikely): `level` 0 is uniform over
    them (high entropy), larger values concentrate on token 0 (lower entropy)."""
    out = np.full(VOCAB, -30.0, dtype=np.float32)
    out[:4] = [level, 0.0, 0.0, 0.0]
    return out


def normalised_entropy(logits) -> float:
    return full_vocab_entropy(logits) / math.log(VOCAB)


SWIR = dict(method="swir", temperature=1.0, top_k=0, top_p=1.0, swir_topk=4)


class TestSwitchRule:
    def test_first_step_sets_the_reference(self):
        assert swir_switch(True, math.nan, 0, 0.7, 512, False) == (True, 0.7, 0, False, False)

    def test_latent_to_explicit_at_once_when_entropy_falls(self):
        assert swir_switch(True, 0.7, 0, 0.69, 512, False) == (False, 0.69, 0, True, False)
        assert swir_switch(True, 0.7, 0, 0.7, 512, False) == (True, 0.7, 1, False, False)  # not below
        assert swir_switch(True, 0.7, 5, 0.9, 512, False) == (True, 0.7, 6, False, False)

    def test_explicit_to_latent_needs_the_window_and_a_rise(self):
        assert swir_switch(False, 0.5, 2, 0.9, 4, False) == (False, 0.5, 3, False, False)  # 3 < W
        assert swir_switch(False, 0.5, 3, 0.9, 4, False) == (True, 0.9, 0, False, True)    # 4 >= W
        assert swir_switch(False, 0.5, 3, 0.5, 4, False) == (False, 0.5, 4, False, False)  # not above
        assert swir_switch(False, 0.5, 3, 0.9, 4, True) == (False, 0.5, 4, False, False)   # after </think>


class TestBlends:
    def test_blend_adds_the_tag_row(self):
        ids, w = blend_with_row(np.array([0, 1]), np.array([0.75, 0.25]), 0.8, THINK_CLOSE)
        assert ids.tolist() == [0, 1, THINK_CLOSE]
        assert w == pytest.approx([0.6, 0.2, 0.2]) and w.sum() == pytest.approx(1.0)

    def test_blend_onto_a_row_already_mixed_and_without_a_row(self):
        ids, w = blend_with_row(np.array([0, THINK_OPEN]), np.array([0.5, 0.5]), 0.7, THINK_OPEN)
        assert ids.tolist() == [0, THINK_OPEN] and w == pytest.approx([0.35, 0.65])
        ids, w = blend_with_row(np.array([0, 1]), np.array([0.5, 0.5]), 0.7, None)
        assert w.tolist() == [0.5, 0.5]

    def test_linear_schedule(self):
        assert linear_schedule(0.7, 0, 100) == 0.7
        assert linear_schedule(0.7, 50, 100) == pytest.approx(0.85)
        assert linear_schedule(0.7, 100, 100) == 1.0


class TestSwiReasoning:
    def test_starts_latent_with_the_softmax_mixture(self):
        logits = spread(1.0)
        d = SwiReasoningPolicy(DecodeParams(**SWIR), info()).step(logits)
        assert d.soft
        assert d.mix_ids.tolist() == [0, 1, 2, 3]
        assert d.mix_weights == pytest.approx(softmax(logits[:4].astype(np.float64)))
        assert d.entropy == pytest.approx(normalised_entropy(logits))

    def test_top_k_restriction_renormalises(self):
        logits = spread(1.0)
        d = SwiReasoningPolicy(DecodeParams(**{**SWIR, "swir_topk": 2}), info()).step(logits)
        e = math.exp(1.0)
        assert d.mix_ids.tolist() == [0, 1] and d.mix_weights == pytest.approx([e / (e + 1), 1 / (e + 1)])

    def test_switch_to_explicit_blends_think_close_then_goes_discrete(self):
        params = DecodeParams(**SWIR, swir_beta=0.6, max_tokens=10)
        policy = SwiReasoningPolicy(params, info())
        policy.step(spread(0.0))                    # step 0: reference = the uniform entropy
        d = policy.step(spread(2.0))                # step 1: entropy falls -> explicit, blended
        beta = 0.6 + 0.4 * 1 / 10
        mix = softmax(spread(2.0)[:4].astype(np.float64))
        assert d.soft and d.mix_ids.tolist() == [0, 1, 2, 3, THINK_CLOSE]
        assert d.mix_weights == pytest.approx(np.append(beta * mix, 1 - beta))
        assert not policy.step(spread(0.0)).soft    # explicit: the token itself
        assert policy.state.switches == 1

    def test_switch_to_latent_blends_think_open(self):
        params = DecodeParams(**SWIR, swir_window=2, swir_alpha=0.5, max_tokens=100)
        policy = SwiReasoningPolicy(params, info())
        policy.step(spread(1.0))                    # ref = H(1.0)
        policy.step(spread(3.0))                    # -> explicit, ref = H(3.0)
        assert not policy.step(spread(0.0)).soft    # 1 step in explicit mode: < W, stays
        d = policy.step(spread(0.0))                # 2 steps and a rise: -> latent
        alpha = 0.5 + 0.5 * 3 / 100
        mix = softmax(spread(0.0)[:4].astype(np.float64))
        assert d.soft and d.mix_ids.tolist() == [0, 1, 2, 3, THINK_OPEN]
        assert d.mix_weights == pytest.approx(np.append(alpha * mix, 1 - alpha))
        assert policy.step(spread(0.0)).mix_ids.tolist() == [0, 1, 2, 3]  # plain latent step

    def test_no_tags_no_blends(self):
        policy = SwiReasoningPolicy(DecodeParams(**SWIR), info(think=False))
        policy.step(spread(0.0))
        assert not policy.step(spread(2.0)).soft    # explicit at once, the token itself

    def test_math_symbol_forces_an_explicit_step(self):
        logits = spread(5.0)  # token 0 all but certain
        assert not SwiReasoningPolicy(DecodeParams(**SWIR), info(math_ids=[0])).step(logits).soft
        assert SwiReasoningPolicy(DecodeParams(**SWIR), info()).step(logits).soft

    def test_sampled_think_close_ends_latent_mode(self):
        closing = np.full(VOCAB, -30.0, dtype=np.float32)
        closing[THINK_CLOSE] = 10.0
        policy = SwiReasoningPolicy(DecodeParams(**SWIR, swir_window=1), info())
        assert policy.step(closing).token == THINK_CLOSE
        assert policy.state.locked
        assert not any(policy.step(spread(x)).soft for x in (0.0, 0.0, 3.0, 0.0, 0.0))

    def test_shown_tokens_are_the_cot_samples(self):
        rng = np.random.default_rng(5)
        steps = [rng.normal(size=VOCAB).astype(np.float32) * 2 for _ in range(100)]
        params = DecodeParams(method="swir", seed=9, top_k=5, swir_window=3)
        swir = SwiReasoningPolicy(params, info(think=False))
        cot = CotPolicy(params.replace(method="cot"), info(think=False))
        decisions = [swir.step(x) for x in steps]
        assert [d.token for d in decisions] == [cot.step(x).token for x in steps]
        assert 0 < sum(d.soft for d in decisions) < 100

    def test_switch_budget_injects_close_then_the_answer_prefix_and_ends(self):
        params = DecodeParams(**SWIR, swir_window=1, swir_max_switches=1, max_tokens=512)
        policy = SwiReasoningPolicy(params, info())
        up, down = spread(0.0), spread(3.0)  # entropy high / low; token 0 is sampled from both
        shown = [policy.step(up).token]                      # step 0: latent, ref high
        shown.append(policy.step(down).token)                # switch 1 (= C_max): </think> queued
        assert policy.step(up).token == THINK_CLOSE          # injected (explicit -> latent too)
        assert not policy.state.locked                       # an injected </think> only nudges
        policy.step(down)                                    # switch 2 (= 2 C_max): </think> again
        assert policy.step(up).token == THINK_CLOSE
        policy.step(down)                                    # switch 3 > 2 C_max: answer prefix
        assert policy.state.switches == 3
        forced = [policy.step(up) for _ in range(3)]
        assert [d.token for d in forced] == [THINK_CLOSE, *ANSWER_PREFIX]
        assert not any(d.soft for d in forced) and all(d.logprob == 0.0 for d in forced)
        rest = [policy.step(up) for _ in range(SWIR_ANSWER_TOKENS)]
        assert [d.final for d in rest] == [False] * (SWIR_ANSWER_TOKENS - 1) + [True]

    def test_no_budget_by_default(self):
        policy = SwiReasoningPolicy(DecodeParams(**SWIR, swir_window=1), info())
        decisions = [policy.step(spread(x)) for x in (0.0, 3.0) * 20]
        assert policy.state.switches == 20
        assert THINK_CLOSE not in [d.token for d in decisions] and not any(d.final for d in decisions)


class TestNoiseFunctions:
    P = np.array([0.5, 0.3, 0.2])

    def test_zero_gumbel_noise_at_unit_temperature_is_p(self):
        assert gumbel_softmax_weights(self.P, np.zeros(3), 1.0) == pytest.approx(self.P, abs=1e-15)

    def test_gumbel_formula(self):
        g = np.array([0.3, -0.2, 1.1])
        expected = np.exp((np.log(self.P) + g) / 0.5)
        assert gumbel_softmax_weights(self.P, g, 0.5) == pytest.approx(expected / expected.sum())

    def test_gumbel_argmax_is_a_draw_from_p(self):
        rng = np.random.default_rng(11)
        n = 20000
        wins = np.bincount([int(np.argmax(np.log(self.P) + gumbel_noise(rng, 3))) for _ in range(n)], minlength=3)
        sd = np.sqrt(self.P * (1 - self.P) / n)
        assert np.all(np.abs(wins / n - self.P) < 5 * sd)

    def test_gumbel_weights_sharpen_as_tau_falls(self):
        rng = np.random.default_rng(12)
        g = [gumbel_noise(rng, 3) for _ in range(500)]
        peak = [np.mean([gumbel_softmax_weights(self.P, x, tau).max() for x in g]) for tau in (2.0, 0.5, 0.1)]
        assert peak[0] < peak[1] < peak[2]

    def test_dirichlet_mean_is_p(self):
        rng = np.random.default_rng(13)
        n, alpha = 20000, 1.0
        mean = np.mean([dirichlet_weights(self.P, alpha, rng) for _ in range(n)], axis=0)
        sd = np.sqrt(self.P * (1 - self.P) / (alpha + 1) / n)  # Var of a Dirichlet component
        assert np.all(np.abs(mean - self.P) < 5 * sd)

    def test_dirichlet_spread_falls_as_alpha_grows(self):
        rng = np.random.default_rng(14)
        spread_ = [np.std([dirichlet_weights(self.P, a, rng)[0] for _ in range(2000)]) for a in (0.5, 5.0, 500.0)]
        assert spread_[0] > spread_[1] > spread_[2]
        assert spread_[2] == pytest.approx(math.sqrt(0.25 / 501), rel=0.15)

    def test_none_returns_p_untouched(self):
        assert noisy_weights(self.P, "none", np.random.default_rng(0), gumbel_tau=0.5, dirichlet_alpha=1.0) is self.P


def random_steps(seed, n=200, scale=1.5):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=VOCAB).astype(np.float32) * scale for _ in range(n)]


class TestStochasticSoftThinking:
    @pytest.mark.parametrize("method, cls", [("soft", SoftThinkingPolicy), ("selar", SelarPolicy)])
    def test_no_noise_is_the_existing_method(self, method, cls):
        steps = random_steps(1)
        params = DecodeParams(method=method, top_k=5, soft_topk=4, tau=0.3)
        explicit = cls(params.replace(soft_noise="none"), info(think=False))
        default = cls(DecodeParams(method=method, top_k=5, soft_topk=4, tau=0.3), info(think=False))
        for x in steps:
            a, b = explicit.step(x), default.step(x)
            assert (a.token, a.soft) == (b.token, b.soft)
            if a.soft:
                assert np.array_equal(a.mix_weights, b.mix_weights)

    @pytest.mark.parametrize("noise", ["gumbel", "dirichlet"])
    def test_soft_noise_keeps_tokens_and_changes_weights(self, noise):
        steps = random_steps(2)
        params = DecodeParams(method="soft", top_k=5, soft_topk=4)
        clean = SoftThinkingPolicy(params, info(think=False))
        noisy = SoftThinkingPolicy(params.replace(soft_noise=noise), info(think=False))
        pairs = [(clean.step(x), noisy.step(x)) for x in steps]
        assert [a.token for a, _ in pairs] == [b.token for _, b in pairs]
        assert all(b.soft and b.mix_weights.sum() == pytest.approx(1.0) for _, b in pairs)
        assert all(np.all(b.mix_weights >= 0) for _, b in pairs)
        assert sum(not np.allclose(a.mix_weights, b.mix_weights) for a, b in pairs) > 150

    def test_soft_gumbel_weights_follow_the_formula(self):
        logits = np.log(np.array([0.4, 0.3, 0.2, 0.1, 1e-9, 1e-9, 1e-9, 1e-9]))
        params = DecodeParams(method="soft", temperature=1.0, top_k=4, top_p=1.0, soft_topk=4, soft_noise="gumbel",
                              gumbel_tau=0.5, seed=3)
        decision = SoftThinkingPolicy(params, info(think=False)).step(logits)
        g = gumbel_noise(np.random.default_rng([3, 1]), 4)
        expected = gumbel_softmax_weights(np.array([0.4, 0.3, 0.2, 0.1]), g, 0.5)
        assert decision.mix_weights == pytest.approx(expected)

    def test_selar_noise_keeps_the_gate_and_pushes_off_the_clean_top_token(self):
        steps = random_steps(3)
        params = DecodeParams(method="selar", top_k=5, tau=0.4, lam=1.0)
        clean = SelarPolicy(params, info(think=False))
        noisy = SelarPolicy(params.replace(soft_noise="dirichlet", dirichlet_alpha=2.0), info(think=False))
        replay = np.random.default_rng([params.seed, 1])
        for x in steps:
            a, b = clean.step(x), noisy.step(x)
            assert (a.token, a.soft, a.entropy) == (b.token, b.soft, b.entropy)
            if b.soft:
                q_noisy = dirichlet_weights(a.top_probs, 2.0, replay)
                assert b.mix_weights == pytest.approx(contrastive_weights(q_noisy, a.entropy))
                assert b.mix_ids.tolist() == a.mix_ids.tolist()
