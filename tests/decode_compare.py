"""Comparing two greedy decodes of one prompt that must agree (batched and alone, from the
prompt cache and cold, ...).

On x86, SmolLM2's Q4_1 weights and every model's plain (not repacked) weights are multiplied
row by row the same way whatever the batch holds, and the two decodes agree bit for bit. On
ARM CPUs with int8 matrix instructions (Apple M2 and later) an even batch's rows are summed
in another order than a single row's: float32 rounding, about 1e-5 of a logit. A greedy
choice between two tokens closer than that, or an entropy that close to SeLaR's tau, may then
go the other way, and the two paths part there. `assert_same_greedy_decode` accepts exactly
that: equal paths, or paths equal up to a step where the reference was such a near-tie.
The reference must be decoded with `logprobs >= 2` (the top two candidates of every step).
"""
from __future__ import annotations

# Log-probability gap (filtered distribution, temperature 0.6) under which two candidates
# count as tied: 1e-5 of a logit of size ~20, over T, is ~3e-4; 1e-3 gives room.
TIE_LOGPROB = 1e-3
# |h - tau| under which the gate's decision counts as a tie (h moves by ~1e-5 at most).
GATE_TIE = 1e-4


def divergence(got, want) -> int | None:
    """The first step where the two decodes differ (token or soft input), or None."""
    for k, (a, b) in enumerate(zip(got.tokens, want.tokens)):
        if a != b:
            return k
        if got.soft_flags[k:k + 1] != want.soft_flags[k:k + 1]:
            return k
    return None if len(got.tokens) == len(want.tokens) else min(len(got.tokens), len(want.tokens))


def near_tie(got, want, k: int, tau: float | None) -> str | None:
    """Why step k of `want` could go either way, or None if it could not."""
    ended = k >= len(got.tokens)  # `got` stopped where `want` went on (an end token's near-tie)
    if k < len(want.tokens) and (ended or got.tokens[k] != want.tokens[k]):
        if k >= len(want.logprobs):
            return None
        top = want.logprobs[k][1]
        if len(top) >= 2 and top[0][1] - top[1][1] < TIE_LOGPROB and (
                ended or got.tokens[k] in (top[0][0], top[1][0])):
            return f"tokens {top[0][0]} and {top[1][0]} tied within {TIE_LOGPROB} at step {k}"
        return None
    if tau is not None and k < len(want.entropies) and abs(want.entropies[k] - tau) < GATE_TIE:
        return f"entropy {want.entropies[k]:.6f} at the gate's tau {tau} at step {k}"
    return None


def assert_same_greedy_decode(got, want, *, tau: float | None = None) -> None:
    """`got` decodes as `want` does: the same tokens and soft inputs, or the same up to a
    near-tie of `want` (see the module's docstring). `tau`: the gate's threshold (selar)."""
    k = divergence(got, want)
    if k is None:
        assert got.soft_steps == want.soft_steps
        return
    assert want.logprobs, "decode the reference with logprobs=2 to tell a near-tie from a difference"
    reason = near_tie(got, want, k, tau)
    assert reason is not None, (f"the decodes part at step {k} without a near-tie: "
                                f"{got.tokens[max(0, k - 3):k + 3]} vs {want.tokens[max(0, k - 3):k + 3]}")
