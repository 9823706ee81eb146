"""`--method selar --soft-source hidden`: SeLaR's gate and contrastive push with the
aligned hidden state as the soft input's source (pure NumPy).

Where SeLaR's gate opens (normalised top-ks entropy h >= tau, math symbols discrete), the
next input is `e' = (1 + lam h) a - lam h E[v1]` (latent_steps.hidden_soft_input) with `a`
this step's final hidden state mapped into input space by the model's alignment (ridge W_a
or identity, rescaled to the input rows' norm, alignment.py) instead of the top-ks mixture
sum_i q_i E[v_i]; v1 is the most probable token, as in SeLaR. The shown token, the gate
and every statistic are SeLaR's (this class is SelarPolicy until the input is built), so
the two sources differ only in `a`. Mixture noise (--soft-noise) has nothing to act on here.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from selar_local.latent_steps import hidden_soft_input
from selar_local.policies import SelarPolicy, StepDecision


class HiddenSourceSelarPolicy(SelarPolicy):
    needs_hidden = True
    reads_alignment = True  # the loop sets `alignment` (the model's) and `table` (its input rows)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alignment = None
        self.table = None
        self._hidden: np.ndarray | None = None

    def propose(self, logits: np.ndarray, hidden: np.ndarray | None = None) -> StepDecision:
        if hidden is None:
            raise RuntimeError("selar --soft-source hidden needs this step's hidden state")
        self._hidden = hidden
        return super().propose(logits, hidden)

    def conclude(self, token: int, logprob: float, h: float, ids: np.ndarray, q: np.ndarray) -> StepDecision:
        decision = super().conclude(token, logprob, h, ids, q)
        if not decision.soft:
            return decision
        aligned = self.alignment.apply(np.asarray(self._hidden, dtype=np.float32).reshape(-1))
        vector = hidden_soft_input(aligned, self.table.row(int(ids[0])), self.params.lam * h)
        return dataclasses.replace(decision, mix_ids=None, mix_weights=None, vector=vector)
