"""The near-tie rule the equal-output tests use (tests/decode_compare.py), on hand-made decodes."""
from types import SimpleNamespace

import pytest

from decode_compare import (
    GATE_TIE, TIE_LOGPROB, assert_same_greedy_decode, assert_same_greedy_row, divergence, first_unshared_step,
)


def decode(tokens, soft=None, logprobs=None, entropies=None):
    soft = soft or [False] * len(tokens)
    return SimpleNamespace(tokens=list(tokens), soft_flags=list(soft), soft_steps=sum(soft),
                           logprobs=logprobs or [], entropies=entropies or [0.0] * len(tokens))


def top2(a, b, gap):
    return (-0.5, ((a, -0.5), (b, -0.5 - gap)))


def test_equal_decodes_pass_and_need_no_logprobs():
    assert divergence(decode([1, 2, 3]), decode([1, 2, 3])) is None
    assert_same_greedy_decode(decode([1, 2, 3], [True, False, False]), decode([1, 2, 3], [True, False, False]))


def test_paths_may_part_only_at_a_near_tie_of_the_reference():
    want = decode([1, 2, 3], logprobs=[top2(1, 9, 5.0), top2(2, 7, TIE_LOGPROB / 2), top2(3, 4, 5.0)])
    assert_same_greedy_decode(decode([1, 7, 8]), want)          # 2 and 7 were tied at step 1
    with pytest.raises(AssertionError, match="part at step 1 without a near-tie"):
        assert_same_greedy_decode(decode([1, 6, 8]), want)      # 6 was not among the tied pair
    far = decode([1, 2, 3], logprobs=[top2(1, 9, 5.0), top2(2, 7, 2 * TIE_LOGPROB), top2(3, 4, 5.0)])
    with pytest.raises(AssertionError, match="without a near-tie"):
        assert_same_greedy_decode(decode([1, 7, 8]), far)
    with pytest.raises(AssertionError, match="logprobs=2"):
        assert_same_greedy_decode(decode([1, 7, 8]), decode([1, 2, 3]))


def test_a_gate_decision_may_differ_only_at_tau():
    want = decode([1, 2, 3], soft=[False, True, False], entropies=[0.1, 0.5 + GATE_TIE / 2, 0.2],
                  logprobs=[top2(1, 9, 5.0)] * 3)
    got = decode([1, 2, 5], soft=[False, False, False])
    assert divergence(got, want) == 1
    assert_same_greedy_decode(got, want, tau=0.5)
    with pytest.raises(AssertionError):
        assert_same_greedy_decode(got, want, tau=0.4)


# -- benchmark rows: text and soft flags only ---------------------------------------------------
PIECES = {1: "The", 2: " sum", 3: " is", 4: " 7", 7: " total", 8: ".", 0: "", 9: "\xe2", 10: "\x82\xac"}


def detokenize(tokens):
    """Pieces as latin-1 stand-ins for bytes; 9 + 10 spell the euro sign in UTF-8."""
    return "".join(PIECES[t] for t in tokens).encode("latin-1").decode("utf-8", errors="replace")


def row(text, soft="000"):
    return {"text": text, "correct": False, "trace": {"soft": soft}}


def test_first_unshared_step_reads_the_other_decode_from_its_text():
    want = decode([1, 2, 3, 4])
    assert first_unshared_step(want, detokenize, "The sum is 7", "0000") == 3  # all shared: the end
    assert first_unshared_step(want, detokenize, "The total is 7", "0000") == 1
    assert first_unshared_step(want, detokenize, "The sum", "00") == 2          # the other one ended
    assert first_unshared_step(want, detokenize, "The sum is 7", "0010") == 2  # a gate decision
    # A character split over two tokens is not a difference while its first byte is pending.
    assert first_unshared_step(decode([1, 9, 10, 8]), detokenize, "The\u20ac.", "0000") == 3


def test_rows_may_differ_only_after_a_near_tie_of_the_decode_alone():
    want_row = row("The sum is 7", "0000")
    tied = decode([1, 2, 3, 4], logprobs=[top2(1, 9, 5.0), top2(2, 7, TIE_LOGPROB / 2), top2(3, 4, 5.0),
                                          top2(4, 8, 5.0)])
    tied.text = "The sum is 7"
    fields = ("text", "correct")
    assert assert_same_greedy_row(row("The sum is 7", "0000"), want_row, pytest.fail, detokenize, fields=fields)
    assert not assert_same_greedy_row(row("The total.", "000"), want_row, lambda: tied, detokenize, fields=fields)
    clear = decode([1, 2, 3, 4], logprobs=[top2(1, 9, 5.0)] * 4)
    clear.text = "The sum is 7"
    with pytest.raises(AssertionError, match="differ from step 1 without a near-tie"):
        assert_same_greedy_row(row("The total.", "000"), want_row, lambda: clear, detokenize, fields=fields)
    # a gate decision within GATE_TIE of tau
    gate = decode([1, 2, 3, 4], soft=[False, False, True, False], entropies=[0.1, 0.1, 0.5 + GATE_TIE / 2, 0.1],
                  logprobs=[top2(1, 9, 5.0)] * 4)
    gate.text = "The sum is 7"
    assert not assert_same_greedy_row(row("The sum is 7", "0000"), row("The sum is 7", "0010"), lambda: gate,
                                      detokenize, fields=fields, tau=0.5)
    with pytest.raises(AssertionError):
        assert_same_greedy_row(row("The sum is 7", "0000"), row("The sum is 7", "0010"), lambda: gate,
                               detokenize, fields=fields, tau=0.4)
    with pytest.raises(AssertionError, match="does not reproduce"):
        assert_same_greedy_row(row("The total.", "000"), row("Another text"), lambda: tied, detokenize, fields=fields)
