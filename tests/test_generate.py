"""The generation loop's multi-sequence primitives on a real model (SmolLM2-135M):
one prompt prefilled once for several sequences, a failed shared decode that fails only
the sequence that cannot decode, and the log-probabilities of the shown tokens."""
from __future__ import annotations

import math

import numpy as np
import pytest

from selar_local.errors import DecodeError
from selar_local.generate import BatchGenerator, generate_groups
from selar_local.params import DecodeParams
from selar_local.sampling import LOGPROB_FLOOR, Distribution, token_logprobs

from conftest import runtime_for
from decode_compare import assert_same_greedy_decode

QUESTION = [{"role": "user", "content": "Name three colors and say why you like them."}]


def _run_to_end(generator: BatchGenerator, started: list[tuple[int, object]]) -> dict[int, list]:
    """Step until every started sequence has ended: request id -> its events."""
    events = {rid: [first] if first is not None else [] for rid, first in started}
    live = {rid for rid, first in started if first is None or not first.finish_reason}
    for _ in range(10_000):
        if not live:
            return events
        for event in generator.step():
            events[event.request_id].append(event)
            if event.finish_reason:
                live.discard(event.request_id)
    raise AssertionError("sequences did not end")


def test_group_prefills_once_and_equals_separate_runs(model_files):
    """n sequences of one prompt share its prefill (KV cells copied) and give exactly the
    tokens each gives alone, each with its own seed."""
    rt1 = runtime_for("llama", model_files)
    rt3 = runtime_for("llama", model_files, n_parallel=3)
    prompt = rt1.encode(messages=QUESTION)
    params = [DecodeParams(method="selar", seed=s, max_tokens=24) for s in (1, 2, 3)]
    alone = [rt1.generate_batch([prompt], p)[0] for p in params]
    generator = BatchGenerator(rt3)
    started = generator.submit_group(prompt, params)
    _run_to_end(generator, started)
    together = [generator.pop_result(rid) for rid, _ in started]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.soft_steps for r in together] == [r.soft_steps for r in alone]
    assert len({tuple(r.tokens) for r in together}) > 1, "three seeds should not all give one text"
    assert generator.free_slots == 3


def test_group_larger_than_free_slots_is_refused_and_frees_nothing(model_files):
    rt = runtime_for("llama", model_files, n_parallel=3)
    generator = BatchGenerator(rt)
    prompt = rt.encode(messages=QUESTION)
    with pytest.raises(RuntimeError, match="4 sequences need as many free slots"):
        generator.submit_group(prompt, [DecodeParams(max_tokens=4)] * 4)
    assert generator.free_slots == 3


def test_a_sequence_that_cannot_decode_fails_alone(model_files):
    """Corrupt one live sequence's KV history (llama.cpp then rejects its positions): the
    shared decode fails, the loop retries each sequence alone, only that one ends with an
    error, and its neighbours produce exactly the tokens they produce undisturbed."""
    rt = runtime_for("llama", model_files, n_parallel=3)
    questions = ["What is 2 + 3?", "Name a prime number above 10.", "Spell cat."]
    prompts = [rt.encode(messages=[{"role": "user", "content": q}]) for q in questions]
    params = DecodeParams(method="selar", greedy=True, max_tokens=16, logprobs=2)
    undisturbed = rt.generate_batch(prompts, params)

    generator = BatchGenerator(rt)
    started = [generator.submit(p, params) for p in prompts]
    for _ in range(3):
        generator.step()
    victim = started[1][0]
    victim_slot = generator._live[victim].seq_id
    rt.context.truncate_sequence(victim_slot, 2)  # its next position no longer follows its cells
    events = _run_to_end(generator, [(rid, None) for rid, _ in started])
    assert events[victim][-1].finish_reason == "error"
    error = generator.pop_error(victim)
    assert "llama_decode failed" in str(error)
    for (rid, _), expected in zip(started, undisturbed):
        if rid != victim:
            assert_same_greedy_decode(generator.pop_result(rid), expected, tau=params.tau)
    assert generator.free_slots == 3


def test_generate_groups_raises_a_failed_sequence_and_gives_back_every_slot(model_files):
    """A group whose prompt llama.cpp rejects (a token id past the vocabulary): generate_groups
    raises the decode error, as generate_many does, rather than return it as a result, and
    closes its generator: every slot is free again and the next call decodes as before."""
    rt = runtime_for("llama", model_files, n_parallel=3)
    good = rt.encode(messages=QUESTION)
    bad = good[:-1] + [rt.model.n_vocab + 7]
    params = DecodeParams(method="selar", greedy=True, max_tokens=8)
    group = [params, params.replace(seed=2)]
    expected = generate_groups(rt, [good], [group])[0]
    with pytest.raises(DecodeError, match="llama_decode failed"):
        generate_groups(rt, [good, bad], [[params], group])
    assert BatchGenerator(rt).free_slots == 3
    for got, want in zip(generate_groups(rt, [good], [group])[0], expected):
        assert_same_greedy_decode(got, want, tau=params.tau)


def test_logprobs_of_shown_tokens_follow_the_filtered_distribution(model_files):
    rt = runtime_for("llama", model_files)
    params = DecodeParams(method="cot", max_tokens=8, logprobs=3)
    events = list(rt.stream(messages=QUESTION, params=params))
    assert events
    for event in events:
        if event.finish_reason == "stop" and not event.text:
            continue
        assert event.logprob is not None and event.logprob <= 0.0
        assert 1 <= len(event.top_logprobs) <= 3  # fewer where top-p kept fewer tokens
        ids = [i for i, _ in event.top_logprobs]
        lps = [lp for _, lp in event.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # filtered probabilities: the kept ones sum to 1 (float64 rounding: 1e-12)
        assert sum(math.exp(lp) for lp in lps) <= 1.0 + 1e-12
        if len(lps) == 1:
            assert lps[0] == 0.0
        if event.token in ids:  # the shown token's own value is the same number
            assert event.logprob == lps[ids.index(event.token)]
    plain = list(rt.stream(messages=QUESTION, params=params.replace(logprobs=None)))
    assert all(e.logprob is None and e.top_logprobs == () for e in plain)
    assert [e.token for e in plain] == [e.token for e in events]


def test_token_logprobs_exact():
    dist = Distribution(np.array([7, 3, 9]), np.array([0.5, 0.25, 0.25]))
    lp, top = token_logprobs(dist, 3, 2)
    assert lp == math.log(0.25)
    assert top == ((7, math.log(0.5)), (3, math.log(0.25)))
    assert token_logprobs(dist, 42, 0) == (LOGPROB_FLOOR, ())  # filtered out (e.g. injected </think>)
    assert token_logprobs(dist, 7, 10)[1][2] == (9, math.log(0.25))  # at most len(dist)
