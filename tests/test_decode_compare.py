"""The near-tie rule the equal-output tests use (tests/decode_compare.py), on hand-made decodes."""
from types import SimpleNamespace

import pytest

from decode_compare import (
    GATE_TIE, TIE_LOGPROB, TextStep, assert_same_greedy_decode, assert_same_greedy_row, assert_same_greedy_text,
    divergence, first_unshared_step, steps_of_choice, steps_of_result,
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


# -- decodes known by their text: benchmark rows, OpenAI responses -------------------------------
PIECES = {1: b"The", 2: b" sum", 3: b" is", 4: b" 7", 7: b" total", 8: b".", 9: b"\xe2", 10: b"\x82\xac"}


def steps(tokens, gaps=None, soft=None, entropies=None):
    gaps = gaps or [5.0] * len(tokens)
    soft = soft or [False] * len(tokens)
    entropies = entropies or [0.1] * len(tokens)
    return [TextStep(PIECES[t], g, h, f) for t, g, h, f in zip(tokens, gaps, entropies, soft)]


def test_first_unshared_step_reads_the_other_decode_from_its_text():
    want = steps([1, 2, 3, 4])
    assert first_unshared_step(want, "The sum is 7", "0000") == 3  # all shared: the end
    assert first_unshared_step(want, "The total is 7", "0000") == 1
    assert first_unshared_step(want, "The sum") == 2                 # the other one ended
    assert first_unshared_step(want, "The sum is 7", "0010") == 2  # a gate decision
    # A character split over two tokens is compared byte by byte.
    assert first_unshared_step(steps([1, 9, 10, 8]), "The\u20ac.", "0000") == 3
    assert first_unshared_step(steps([1, 9, 10, 8]), "The\u00e2", "0000") == 1


def test_texts_may_differ_only_after_a_near_tie_of_the_reference():
    tied = steps([1, 2, 3, 4], gaps=[5.0, TIE_LOGPROB / 2, 5.0, 5.0])
    assert assert_same_greedy_text("The sum is 7", "The sum is 7", tied)
    assert not assert_same_greedy_text("The total.", "The sum is 7", tied)
    assert not assert_same_greedy_text("The sum is 7 and", "The sum is 7", tied)
    with pytest.raises(AssertionError, match="part at step 1 without a near-tie"):
        assert_same_greedy_text("The total.", "The sum is 7", steps([1, 2, 3, 4]))
    late = steps([1, 2, 3, 4], gaps=[5.0, 5.0, TIE_LOGPROB / 2, 5.0])
    with pytest.raises(AssertionError, match="without a near-tie"):  # the tie comes after the parting
        assert_same_greedy_text("The total.", "The sum is 7", late)
    with pytest.raises(AssertionError, match="do not spell"):
        assert_same_greedy_text("The total.", "Another text", tied)
    # a gate decision within GATE_TIE of tau (soft flags known)
    gate = steps([1, 2, 3, 4], soft=[False, False, True, False], entropies=[0.1, 0.1, 0.5 + GATE_TIE / 2, 0.1])
    assert assert_same_greedy_text("The sum is 7", "The sum is 7", gate, got_soft="0010", tau=0.5)
    assert not assert_same_greedy_text("The sum is 7", "The sum is 7", gate, got_soft="0000", tau=0.5)
    with pytest.raises(AssertionError, match="part at step 2"):
        assert_same_greedy_text("The sum is 7", "The sum is 7", gate, got_soft="0000", tau=0.4)


def test_the_reference_steps_come_from_a_result_or_an_openai_choice():
    result = SimpleNamespace(tokens=[1, 2], logprobs=[top2(1, 9, 2.0), (-0.1, ((2, -0.1),))],
                             entropies=[0.3, 0.0], soft_flags=[True, False])
    assert steps_of_result(result, PIECES.get) == [TextStep(b"The", 2.0, 0.3, True), TextStep(b" sum", None, 0.0, False)]
    choice = {"logprobs": {"content": [
        {"token": "The", "bytes": list(b"The"), "logprob": -0.5,
         "top_logprobs": [{"token": "The", "logprob": -0.5}, {"token": "A", "logprob": -0.75}]}]}}
    assert steps_of_choice(choice) == [TextStep(b"The", 0.25)]
    with pytest.raises(AssertionError, match="top_logprobs=2"):
        steps_of_choice({"logprobs": None})


def test_bench_rows_are_compared_by_text_soft_flags_and_fields():
    def row(text, soft, **extra):
        return {"text": text, "trace": {"soft": soft}, "correct": False, **extra}

    reference = SimpleNamespace(tokens=[1, 2, 3, 4], text="The sum is 7", entropies=[0.1] * 4, soft_flags=[False] * 4,
                                logprobs=[top2(1, 9, 5.0), top2(2, 7, TIE_LOGPROB / 2), top2(3, 4, 5.0), top2(4, 8, 5.0)])
    want = row("The sum is 7", "0000")
    assert assert_same_greedy_row(row("The sum is 7", "0000"), want, pytest.fail, PIECES.get, fields=("text",))
    assert not assert_same_greedy_row(row("The total.", "000"), want, lambda: reference, PIECES.get, fields=("text",))
    with pytest.raises(AssertionError, match="does not reproduce"):
        assert_same_greedy_row(row("The total.", "000"), row("Other", "0"), lambda: reference, PIECES.get,
                               fields=("text",))
    with pytest.raises(AssertionError, match=r"differ: \['correct'\]"):
        assert_same_greedy_row(row("The sum is 7", "0000", correct=True), want, lambda: reference, PIECES.get,
                               fields=("text", "correct"))
