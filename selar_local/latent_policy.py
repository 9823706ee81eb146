"""`--method latent`: latent thoughts in hidden-state space, then text as `cot` (pure NumPy).

Before the text, the sequence takes `latent_steps` (m) steps that show no token: each
feeds the previous step's final hidden state, mapped into input space by the model's
alignment (alignment.LatentAlignment: ridge W_a or identity, rescaled to the input rows'
norm) as a `Vector` input, and reads the next hidden state. The first latent step feeds
the prompt's last hidden state. After the m-th, the text is decoded from that step's
logits exactly as `cot` (this class is CotPolicy for every shown token), so with m = 0 the
method is `cot` with the same seed, every field of the result included.

The loop runs the m steps as a `Latent` segment (sequences.py) and asks this policy for
each one's input (`latent_step`); it reads the hidden state only while `needs_hidden`.
`--latent-noise SIGMA` adds Gaussian noise to each fed vector (latent_steps.add_latent_noise,
SIGMA relative to the fed norm) from a stream of its own, so different seeds walk different
latent paths while the token sampler's draws stay those of the same seed.
"""
from __future__ import annotations

import numpy as np

from selar_local.agent_roles import ROLES
from selar_local.latent_steps import add_latent_noise, latent_noise_rng, noise_scale
from selar_local.params import DecodeParams
from selar_local.policies import CotPolicy, StepDecision, TokenInfo
from selar_local.sampling import normalized_topk

THINKING_ROLES = sum(not role.answers for role in ROLES)  # the roles followed by latent steps


class LatentPolicy(CotPolicy):
    """cot after `params.latent_steps` hidden-state steps."""

    def __init__(self, params: DecodeParams, info: TokenInfo, **kwargs):
        super().__init__(params, info, **kwargs)
        self.latent_steps = params.latent_steps  # the loop queues a Latent segment of this many steps
        self.latent_left = params.latent_steps
        self.alignment = None  # alignment.LatentAlignment of the runtime's model, set by the loop
        self.latent_rng = latent_noise_rng(params.seed)
        self.fed: list[np.ndarray] = []  # the vectors fed so far (what --latent-noise changes)

    @property
    def reads_alignment(self) -> bool:
        """The loop sets `alignment` only when there are latent steps (m = 0 is cot and
        loads nothing)."""
        return self.latent_steps > 0

    @property
    def needs_hidden(self) -> bool:
        """The hidden state is read only while latent steps remain (the m-th step's output
        is only its logits, from which the first text token is drawn)."""
        return self.latent_left > 0

    def latent_step(self, logits: np.ndarray, hidden: np.ndarray) -> StepDecision:
        """One latent step: the next input is the aligned (and maybe noisy) hidden state;
        no token is shown (token -1). Its statistics are those of the logits of the step
        whose hidden state it feeds, for the trace ("what is it thinking")."""
        if self.alignment is None:
            raise RuntimeError("LatentPolicy.alignment was not set: the loop binds the model's alignment")
        if self.latent_left <= 0:
            raise RuntimeError("no latent steps left")
        vector = self.alignment.apply(np.asarray(hidden, dtype=np.float32).reshape(-1))
        sigma = self.params.latent_noise
        if sigma > 0:
            add_latent_noise(vector, noise_scale(sigma, self.alignment.fed_norm, vector.size), self.latent_rng)
        self.latent_left -= 1
        self.fed.append(vector)
        ids, weights, h = normalized_topk(self._filtered(logits), self.params.ks)
        return StepDecision(-1, True, None, None, h, ids, weights, vector=vector)


class LatentMASPolicy(LatentPolicy):
    """`latentmas` (LatentMAS, sequential): the roles' turns over one sequence
    (turns.latentmas_prompt); after each role's turn but the solver's, `latent_steps` latent
    steps; the solver's turn is decoded as cot. The loop queues the turns and steps
    (sequences.queued_segments) from `takes_turns` and `latent_steps_per_turn`."""

    takes_turns = True

    def __init__(self, params: DecodeParams, info: TokenInfo, **kwargs):
        super().__init__(params, info, **kwargs)
        self.latent_steps_per_turn = params.latent_steps
        self.latent_steps = self.latent_left = params.latent_steps * THINKING_ROLES
