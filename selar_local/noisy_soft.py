"""`--method soft --latent-noise SIGMA`: Soft Thinking whose fed mixtures get additive
Gaussian noise, the training-free sampler of "Parallel Test-Time Scaling for Latent
Reasoning Models" on the token-space latent method (pure NumPy).

Soft Thinking's decisions are unchanged (the shown token, the mixture, Cold Stop); where
it feeds a mixture and SIGMA > 0, the next input is that mixture's vector sum_i w_i E[v_i]
plus N(0, s^2 I), s = SIGMA ||v|| / sqrt(d) (latent_steps.noise_scale: SIGMA is the noise's
norm relative to the vector's), drawn from the latent-noise stream [seed, 2], apart from
the token sampler and from --soft-noise's stream. SIGMA 0 is Soft Thinking exactly: this
class is `soft`'s registered policy and draws nothing then.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from selar_local.latent_steps import add_latent_noise, latent_noise_rng, noise_scale
from selar_local.policies import SoftThinkingPolicy, StepDecision
from selar_local.sampling import Distribution


class NoisySoftThinkingPolicy(SoftThinkingPolicy):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = None  # the model's input rows, set by the loop when noise is asked (reads_table)
        self.latent_rng = latent_noise_rng(self.params.seed)

    @property
    def reads_table(self) -> bool:
        return self.params.latent_noise > 0

    def decide(self, dist: Distribution, logits: np.ndarray) -> StepDecision:
        decision = super().decide(dist, logits)
        sigma = self.params.latent_noise
        if not decision.soft or sigma <= 0:
            return decision
        vector = self.table.mix(decision.mix_ids, decision.mix_weights)
        add_latent_noise(vector, noise_scale(sigma, float(np.linalg.norm(vector)), vector.size), self.latent_rng)
        # the mixture stays in the decision (the trace, N_eff); the vector is what is fed
        return dataclasses.replace(decision, vector=vector)
