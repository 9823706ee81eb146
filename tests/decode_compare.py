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

A benchmark row keeps only the text and the soft flags of its decode, not the tokens:
`assert_same_greedy_row` compares two rows, and where they differ, finds the first step of
the reference decode (redone alone with logprobs) that the other row's text does not share,
and accepts the difference only if the reference had a near-tie at or before it.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def tied(gap: float | None) -> bool:
    """A top-two log-probability gap that float rounding could reverse."""
    return gap is not None and gap < TIE_LOGPROB


def at_gate(entropy: float | None, tau: float | None) -> bool:
    """An entropy that float rounding could move to the other side of the gate's tau."""
    return tau is not None and entropy is not None and abs(entropy - tau) < GATE_TIE


def top_gap(top_logprobs) -> float | None:
    """log p of the top candidate minus the runner-up's (None: one candidate)."""
    return top_logprobs[0] - top_logprobs[1] if len(top_logprobs) >= 2 else None


def token_tie(want, k: int) -> tuple[int, int] | None:
    """The two candidates of step k of `want` if they were tied within TIE_LOGPROB."""
    if k >= len(want.logprobs):
        return None
    top = want.logprobs[k][1]
    return (top[0][0], top[1][0]) if tied(top_gap([lp for _, lp in top])) else None


def gate_tie(want, k: int, tau: float | None) -> bool:
    return k < len(want.entropies) and at_gate(want.entropies[k], tau)


def near_tie(got, want, k: int, tau: float | None) -> str | None:
    """Why step k of `want` could go either way, or None if it could not."""
    ended = k >= len(got.tokens)  # `got` stopped where `want` went on (an end token's near-tie)
    if k < len(want.tokens) and (ended or got.tokens[k] != want.tokens[k]):
        pair = token_tie(want, k)
        if pair is not None and (ended or got.tokens[k] in pair):
            return f"tokens {pair[0]} and {pair[1]} tied within {TIE_LOGPROB} at step {k}"
        return None
    if gate_tie(want, k, tau):
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


# -- decodes known by their text: benchmark rows, OpenAI responses --------------------------------

@dataclass(frozen=True)
class TextStep:
    """One step of a reference decode as its text shows it."""
    piece: bytes                 # the token's bytes
    gap: float | None            # log p of the top candidate minus the runner-up's (None: one candidate)
    entropy: float | None = None  # the gate statistic, where known
    soft: bool | None = None     # whether the step's input was soft, where known


def steps_of_result(result, token_bytes) -> list[TextStep]:
    """A GenerationResult decoded with logprobs >= 2."""
    assert result.logprobs, "decode the reference with logprobs=2 to tell a near-tie from a difference"
    return [TextStep(token_bytes(t), top_gap([lp for _, lp in top]), h, soft)
            for t, (_, top), h, soft in zip(result.tokens, result.logprobs, result.entropies, result.soft_flags)]


def steps_of_choice(choice: dict) -> list[TextStep]:
    """An OpenAI chat choice requested with logprobs and top_logprobs >= 2."""
    content = (choice.get("logprobs") or {}).get("content")
    assert content, "request the reference with logprobs and top_logprobs=2"
    return [TextStep(bytes(e["bytes"]), top_gap([a["logprob"] for a in e["top_logprobs"]])) for e in content]


def first_unshared_step(steps: list[TextStep], got_text: str, got_soft: str | None = None) -> int:
    """The first step of the reference that a decode known only by its text (and soft flags)
    does not share: the first token whose bytes `got_text` does not continue, or the first soft
    flag that differs. A decode that is a prefix of the other parts at its last step (where
    one of the two chose to end)."""
    got = got_text.encode("utf-8")
    at = 0
    for k, step in enumerate(steps):
        soft_differs = got_soft is not None and step.soft is not None and got_soft[k:k + 1] != "01"[step.soft]
        if got[at:at + len(step.piece)] != step.piece or soft_differs:
            return k
        at += len(step.piece)
    return max(len(steps) - 1, 0)


def assert_same_greedy_text(got_text: str, want_text: str, steps: list[TextStep], *, got_soft: str | None = None,
                            tau: float | None = None) -> bool:
    """A greedy decode known by its text (and soft flags) is the reference (True), or parts from
    it only after a near-tie of the reference (False): `steps` is the reference decode."""
    want_soft = "".join("01"[bool(s.soft)] for s in steps) if got_soft is not None else None
    if got_text == want_text and got_soft == want_soft:
        return True
    assert b"".join(s.piece for s in steps).decode("utf-8", errors="replace") == want_text, \
        "the reference steps do not spell the reference text"
    k = first_unshared_step(steps, got_text, got_soft)
    ties = [j for j, s in enumerate(steps[:k + 1]) if tied(s.gap) or at_gate(s.entropy, tau)]
    assert ties, f"the decodes part at step {k} without a near-tie before it: {got_text!r} vs {want_text!r}"
    return False


def assert_same_greedy_row(got: dict, want: dict, decode_alone, token_bytes, *, fields,
                           tau: float | None = None) -> bool:
    """Two benchmark rows of one greedy item agree in `fields` and their soft flags (True), or
    differ only after a near-tie of the item decoded alone with logprobs >= 2 (False);
    `decode_alone()` gives that decode, which must reproduce `want`."""
    if {f: got[f] for f in fields} == {f: want[f] for f in fields} and got["trace"]["soft"] == want["trace"]["soft"]:
        return True
    reference = decode_alone()
    assert reference.text == want["text"], "the reference decode does not reproduce the row it stands for"
    same = assert_same_greedy_text(got["text"], want["text"], steps_of_result(reference, token_bytes),
                                   got_soft=got["trace"]["soft"], tau=tau)
    assert not same, f"rows with the same text and soft flags differ: {[f for f in fields if got[f] != want[f]]}"
    return False
