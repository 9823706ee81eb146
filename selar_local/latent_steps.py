"""The per-step math of the hidden-state methods, pure NumPy (the loop feeds the results).

- `aligned_input`: a hidden state as the next input, h W_a rescaled to a fixed norm
  (LatentMAS's realignment; the matrix and norm come from alignment.load_alignment).
- `hidden_soft_input`: SeLaR's contrastive push with the aligned hidden state as its
  source, e' = (1 + push) a - push E[v1], push = lam * h (h the normalised entropy).
  With the token-space mixture a = sum_i q_i E[v_i] it is exactly SeLaR's soft input
  (policies.contrastive_weights), so the two sources differ only in `a`.
- `add_latent_noise`: the training-free sampler of "Parallel Test-Time Scaling for Latent
  Reasoning Models" (additive Gaussian noise on each fed latent vector), drawn from a
  stream of its own (`latent_noise_rng`) so that the token draws of a seed stay those of
  the noise-free run until the noise changes the logits.

No `blend` source: a convex mix of the top-k mixture and the aligned hidden state needs a
weight that nothing in SeLaR or LatentMAS derives (the gate already chooses when to leave
token space), so it is left out rather than shipped as an untuned knob (docs/LATENT.md).
"""
from __future__ import annotations

import numpy as np

# Stream ids under one seed: the token sampler uses default_rng(seed), the soft methods'
# mixture noise default_rng([seed, 1]) (policies.Policy); latent noise gets [seed, 2].
LATENT_NOISE_STREAM = 2
_TINY = np.float32(1e-30)


def aligned_input(hidden: np.ndarray, matrix: np.ndarray | None, norm: float,
                  out: np.ndarray | None = None) -> np.ndarray:
    """norm * u / ||u|| with u = hidden W_a (W_a = matrix; None: the identity), row by row
    for a [n, d] batch or on one [d] vector; float32."""
    h = np.asarray(hidden, dtype=np.float32)
    u = h @ matrix if matrix is not None else h
    length = np.linalg.norm(u, axis=-1, keepdims=True)
    factor = np.float32(norm) / np.maximum(length, _TINY)
    if out is None:
        return (u * factor).astype(np.float32, copy=False)
    np.multiply(u, factor, out=out)
    return out


def hidden_soft_input(aligned: np.ndarray, top_row: np.ndarray, push: float,
                      out: np.ndarray | None = None) -> np.ndarray:
    """SeLaR's soft input from an aligned hidden state: (1 + push) a - push E[v1]."""
    a = np.asarray(aligned, dtype=np.float32)
    e1 = np.asarray(top_row, dtype=np.float32)
    push = np.float32(push)
    if out is None:
        out = np.empty(np.broadcast_shapes(a.shape, e1.shape), dtype=np.float32)
    np.multiply(a, np.float32(1.0) + push, out=out)
    out -= push * e1
    return out


def latent_noise_rng(seed: int) -> np.random.Generator:
    """The latent-noise stream of a sequence's seed, apart from its token sampler."""
    return np.random.default_rng([int(seed), LATENT_NOISE_STREAM])


def noise_scale(sigma: float, fed_norm: float, width: int) -> float:
    """Per-coordinate standard deviation for --latent-noise SIGMA: SIGMA is relative to the
    fed vector's norm (E||noise||^2 = (SIGMA * fed_norm)^2), because the fed norm differs by
    orders of magnitude between models (Gemma's inputs are scaled by sqrt(n_embd)), so an
    absolute deviation would mean a different amount of noise on every model."""
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"latent noise sigma {sigma!r}: expected a finite number >= 0")
    return float(sigma) * float(fed_norm) / np.sqrt(width)


def add_latent_noise(vectors: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """vectors + N(0, std^2 I), in place on a float32 array (and returned); std 0 draws nothing."""
    if std > 0:
        vectors += rng.standard_normal(vectors.shape, dtype=np.float32) * np.float32(std)
    return vectors
