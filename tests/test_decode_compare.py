"""The near-tie rule the equal-output tests use (tests/decode_compare.py), on hand-made decodes."""
from types import SimpleNamespace

import pytest

from decode_compare import GATE_TIE, TIE_LOGPROB, assert_same_greedy_decode, divergence


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
