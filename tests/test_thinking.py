"""Thinking spans without llama.cpp: markers by token id and by text, gpt-oss's analysis
channel, the reasoning/content split, streamed deltas, and the prompt state."""
import pytest

from selar_local.generate import _TextStream
from selar_local.thinking import (
    HARMONY_ANALYSIS,
    THINK_TAGS,
    SpanTokens,
    SpanTracker,
    ThinkingMarkers,
    detect_markers,
    prompt_leaves_thinking,
)

R1 = SpanTokens(THINK_TAGS, (151648,), (151649,), (271,))


def follow(tracker: SpanTracker, pieces, stop=()):
    """Feed (token, text) pairs through a text stream and the tracker like the loop does;
    returns the streamed (reasoning, content) deltas and the in_span flag per token."""
    stream = _TextStream(stop, tracker.hold_strings)
    deltas, flags = [], []
    for token, text in pieces:
        flags.append(tracker.in_span)
        before = len(stream.text)
        stream.push(text.encode())
        tracker.push(token, before, stream.text)
        deltas.append(tracker.route(stream.released, stream.text))
    stream.finish()
    deltas.append(tracker.route(stream.released, stream.text, final=True))
    return stream.text, deltas, flags


def joined(deltas):
    return "".join(r for r, _ in deltas), "".join(c for _, c in deltas)


def test_span_open_in_prompt_closed_by_single_token():
    tracker = SpanTracker(R1, thinking_at_start=True)
    pieces = [(10, "\n"), (11, "Let"), (12, " me"), (13, " add."), (151649, "</think>"), (271, "\n\n"), (14, "42")]
    text, deltas, flags = follow(tracker, pieces)
    assert text == "\nLet me add.</think>\n\n42"
    assert flags == [True, True, True, True, True, False, False]  # the close token is emitted inside
    assert tracker.think_tokens == 4 and not tracker.in_span
    assert tracker.split(text) == ("Let me add.", "42")
    assert joined(deltas) == ("Let me add.", "42")


def test_span_opened_in_output_and_closed_by_text_when_split():
    span = SpanTokens(THINK_TAGS, (), (), ())  # no single tokens: markers found by their text
    tracker = SpanTracker(span, thinking_at_start=False)
    pieces = [(1, "<th"), (2, "ink>"), (3, "a<b"), (4, " so"), (5, "</"), (6, "think"), (7, ">The"), (8, " end")]
    text, deltas, flags = follow(tracker, pieces)
    assert flags == [False, False, True, True, True, True, True, False]
    assert tracker.split(text) == ("a<b so", "The end")
    reasoning, content = joined(deltas)
    assert (reasoning, content) == ("a<b so", "The end")
    # "</" was held back, never released as reasoning
    assert all("</" not in r for r, _ in deltas)
    assert tracker.think_tokens == 4  # "a<b", " so", "</", "think"; the token completing the marker is not counted


def test_gpt_oss_analysis_channel_by_control_token_ids():
    channel, message, end, start = 200005, 200008, 200007, 200006
    analysis, final, assistant = 1, 2, 3
    span = SpanTokens(HARMONY_ANALYSIS, (channel, analysis, message), (end,), (start, assistant, channel, final, message))
    tracker = SpanTracker(span, thinking_at_start=False)
    # control tokens render as no text (llama.cpp, special=False); channel names are text
    pieces = [(channel, ""), (analysis, "analysis"), (message, ""), (10, "Two"), (11, " plus two."), (end, ""),
              (start, ""), (assistant, "assistant"), (channel, ""), (final, "final"), (message, ""), (12, "4")]
    text, deltas, flags = follow(tracker, pieces)
    assert text == "analysisTwo plus two.assistantfinal4"
    assert tracker.split(text) == ("Two plus two.", "4")
    assert joined(deltas) == ("Two plus two.", "4")
    assert flags[3:6] == [True, True, True] and flags[6:] == [False] * 6
    assert span.forced_close == (end, start, assistant, channel, final, message)


def test_answer_header_missing_falls_back_to_text_after_close():
    span = SpanTokens(ThinkingMarkers("<a>", "</a>", "[ANS]"), (1,), (2,), (3,))
    tracker = SpanTracker(span, thinking_at_start=True)
    text, deltas, _ = follow(tracker, [(5, "x"), (2, "</a>"), (6, " y")])
    assert tracker.split(text) == ("x", "y")


def test_no_markers_everything_is_content_and_thinking_for_the_gate():
    tracker = SpanTracker(None)
    text, deltas, flags = follow(tracker, [(1, " a"), (2, " b")])
    assert tracker.in_thinking and not tracker.in_span and flags == [False, False]
    assert tracker.split(text) == ("", None)
    assert joined(deltas) == ("", " a b")  # unchanged, whitespace kept


def test_prompt_leaves_thinking():
    assert prompt_leaves_thinking(R1, [1, 2, 151648, 198])
    assert not prompt_leaves_thinking(R1, [1, 151648, 5, 151649, 271])
    assert not prompt_leaves_thinking(R1, [1, 2, 3])
    harmony = SpanTokens(HARMONY_ANALYSIS, (7, 1, 8), (9,), ())
    assert not prompt_leaves_thinking(harmony, [6, 7, 1, 8, 5, 9, 6])
    assert prompt_leaves_thinking(harmony, [6, 7, 1, 8])


def test_detect_markers_and_parse():
    vocab = {"<think>": 5, "</think>": 6}
    assert detect_markers(vocab.get) == THINK_TAGS
    harmony = {"<|channel|>": 1, "<|message|>": 2, "<|end|>": 3, "<|start|>": 4}
    assert detect_markers(harmony.get) == HARMONY_ANALYSIS
    assert detect_markers({}.get) is None
    assert ThinkingMarkers.from_tags(("<t>", "</t>")) == ThinkingMarkers("<t>", "</t>", "")
    with pytest.raises(ValueError, match="OPEN,CLOSE"):
        ThinkingMarkers.from_tags(("<t>",))


def test_bench_grades_the_answer_after_the_span_not_the_reasoning():
    from selar_local.bench.datasets import Problem
    from selar_local.bench.runner import record_for
    from selar_local.generate import GenerationResult
    from selar_local.params import DecodeParams

    problem = Problem("p1", "gsm8k", "2+3?", "5", "2+3?")

    def result(text, reasoning, answer):
        return GenerationResult(text=text, tokens=[1, 2], prompt_tokens=3, finish_reason="stop", soft_steps=0,
                                entropies=[0.1, 0.2], prefill_seconds=0.1, decode_seconds=0.1,
                                reasoning=reasoning, answer=answer)

    # the reasoning ends on a wrong number; the answer after </think> is right
    thought = result("Maybe 7?</think>\n\nThe answer is 5.", "Maybe 7?", "The answer is 5.")
    record = record_for(problem, "cot", 0, DecodeParams(method="cot"), thought)
    assert record["extracted"] == "5" and record["correct"] and record["text"] == thought.text
    # the span never closed (length): no answer, nothing to grade, even if the reasoning has it
    unfinished = result("So it is 5", "So it is 5", "")
    assert not record_for(problem, "cot", 0, DecodeParams(method="cot"), unfinished)["correct"]
    # a model without markers: the whole text is the answer
    plain = result("It is 5.", "", None)
    assert record_for(problem, "cot", 0, DecodeParams(method="cot"), plain)["correct"]
