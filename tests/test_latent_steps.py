"""Exact tests of the hidden-state methods' step math (selar_local/latent_steps.py) on
hand-made arrays, and of the LatentMAS / TextMAS role prompts (selar_local/agent_roles.py)."""
from __future__ import annotations

import numpy as np
import pytest

from selar_local.latent_steps import (LATENT_NOISE_STREAM, add_latent_noise, aligned_input, hidden_soft_input,
                                      latent_noise_rng, noise_scale)
from selar_local.policies import contrastive_weights

F32_EPS = float(np.finfo(np.float32).eps)


def table(n_vocab: int = 10, width: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_vocab, width)).astype(np.float32)


class TestAlignedInput:
    def test_rows_are_mapped_then_rescaled_to_the_target_norm(self):
        rng = np.random.default_rng(1)
        matrix = rng.standard_normal((4, 6)).astype(np.float32)
        hidden = rng.standard_normal((3, 4)).astype(np.float32)
        fed = aligned_input(hidden, matrix, 2.5)
        mapped = hidden.astype(np.float64) @ matrix
        expected = 2.5 * mapped / np.linalg.norm(mapped, axis=1, keepdims=True)
        assert fed.dtype == np.float32 and fed.shape == (3, 6)
        np.testing.assert_allclose(fed, expected, rtol=0, atol=8 * F32_EPS * 2.5)

    def test_one_vector_and_in_place_output(self):
        matrix = np.eye(4, dtype=np.float32) * 3
        out = np.empty(4, dtype=np.float32)
        result = aligned_input(np.array([0, 3, 4, 0], np.float32), matrix, 10.0, out=out)
        assert result is out
        np.testing.assert_allclose(out, [0, 6, 8, 0], atol=1e-5)

    def test_identity_keeps_the_direction(self):
        h = np.array([[1.0, -2.0, 2.0]], np.float32)
        np.testing.assert_allclose(aligned_input(h, None, 6.0), [[2.0, -4.0, 4.0]], atol=1e-6)

    def test_a_zero_hidden_state_stays_zero_rather_than_nan(self):
        assert not aligned_input(np.zeros(5, np.float32), None, 3.0).any()


class TestHiddenSourceSelar:
    def test_the_push_off_the_top_token(self):
        a = np.array([1.0, 2.0, 3.0], np.float32)
        e1 = np.array([1.0, 0.0, -1.0], np.float32)
        np.testing.assert_allclose(hidden_soft_input(a, e1, 0.5), 1.5 * a - 0.5 * e1, atol=1e-6)
        np.testing.assert_array_equal(hidden_soft_input(a, e1, 0.0), a)

    def test_it_reduces_to_the_token_path_when_a_is_the_top_row(self):
        rows = table()
        for push in (0.0, 0.3, 1.0, 2.7):
            token_path = contrastive_weights(np.array([1.0, 0.0, 0.0]), push) @ rows[[4, 1, 7]]
            np.testing.assert_allclose(token_path, rows[4], rtol=1e-12, atol=0)  # the token path feeds E[v1] itself
            hidden_path = hidden_soft_input(rows[4], rows[4], push)
            # (1 + push) x - push x rounds twice: within (1 + 2 push) eps |x|
            np.testing.assert_allclose(hidden_path, rows[4], rtol=0,
                                       atol=(1 + 2 * push) * F32_EPS * np.abs(rows[4]).max())

    def test_it_is_selar_exactly_when_a_is_the_top_k_mixture(self):
        rows = table(seed=3)
        ids = np.array([2, 5, 9])
        q = np.array([0.5, 0.3, 0.2])
        push = 0.8
        token_path = contrastive_weights(q.copy(), push).astype(np.float32) @ rows[ids]
        mixture = q.astype(np.float32) @ rows[ids]
        hidden_path = hidden_soft_input(mixture, rows[ids[0]], push)
        np.testing.assert_allclose(hidden_path, token_path, rtol=0, atol=8 * (1 + push) * F32_EPS * np.abs(rows).max())

    def test_a_batch_of_sequences_at_once(self):
        a = table(4, 6, seed=4)
        e1 = table(4, 6, seed=5)
        push = np.array([[0.1], [0.0], [1.0], [0.5]], np.float32)
        out = hidden_soft_input(a, e1, push)
        np.testing.assert_allclose(out, (1 + push) * a - push * e1, atol=1e-6)


class TestLatentNoise:
    def test_mean_and_variance(self):
        rng = latent_noise_rng(41)
        n, width, std = 4000, 64, 0.25
        base = np.tile(np.linspace(-1, 1, width, dtype=np.float32), (n, 1))
        noisy = add_latent_noise(base.copy(), std, rng)
        noise = (noisy - base).astype(np.float64).ravel()
        m = noise.size
        # mean: standard error std / sqrt(m); 5 of them
        assert abs(noise.mean()) < 5 * std / np.sqrt(m)
        # variance: the sample variance of m normals has standard deviation std^2 sqrt(2 / m)
        assert abs(noise.var() - std**2) < 5 * std**2 * np.sqrt(2 / m)
        # and per coordinate the noise is the same and independent of the vector
        per_column = (noisy - base).var(axis=0)
        assert per_column.min() > 0.8 * std**2 and per_column.max() < 1.2 * std**2

    def test_sigma_is_relative_to_the_fed_norm(self):
        std = noise_scale(0.1, fed_norm=3.0, width=100)
        assert std == pytest.approx(0.03)
        noise = add_latent_noise(np.zeros((20000, 100), np.float32), std, latent_noise_rng(0))
        assert np.sqrt((noise.astype(np.float64) ** 2).sum(axis=1).mean()) == pytest.approx(0.1 * 3.0, rel=0.01)
        with pytest.raises(ValueError, match="latent noise sigma"):
            noise_scale(-1.0, 1.0, 4)
        with pytest.raises(ValueError, match="latent noise sigma"):
            noise_scale(float("nan"), 1.0, 4)

    def test_zero_sigma_draws_nothing_and_changes_nothing(self):
        rng = latent_noise_rng(5)
        state = rng.bit_generator.state
        v = table()
        assert np.array_equal(add_latent_noise(v.copy(), 0.0, rng), v)
        assert rng.bit_generator.state == state

    def test_the_stream_is_apart_from_the_token_sampler_and_the_mixture_noise(self):
        seed = 41
        # the token sampler's and the soft mixture noise's streams (policies.Policy)
        token_draws = np.random.default_rng(seed).random(8)
        mixture_draws = np.random.default_rng([seed, 1]).random(8)
        latent = latent_noise_rng(seed)
        assert LATENT_NOISE_STREAM not in (0, 1)
        latent_draws = latent.random(8)
        assert not np.array_equal(latent_draws, token_draws) and not np.array_equal(latent_draws, mixture_draws)
        # drawing latent noise leaves a token sampler of the same seed untouched
        sampler = np.random.default_rng(seed)
        add_latent_noise(np.zeros(64, np.float32), 1.0, latent_noise_rng(seed))
        assert np.array_equal(sampler.random(8), token_draws)

    def test_same_seed_same_noise_other_seed_other_noise(self):
        a = add_latent_noise(np.zeros(16, np.float32), 1.0, latent_noise_rng(7))
        b = add_latent_noise(np.zeros(16, np.float32), 1.0, latent_noise_rng(7))
        c = add_latent_noise(np.zeros(16, np.float32), 1.0, latent_noise_rng(8))
        assert np.array_equal(a, b) and not np.array_equal(a, c)
