"""--method frac on SmolLM2: alpha 0 is cot exactly, a nonzero alpha steers, and no decode ever
mixes control vectors (the scheduler drains and switches; batches and samples are grouped)."""
from __future__ import annotations

import dataclasses

import pytest

from selar_local import frac, steering
from selar_local.bench.grading import answer_key
from selar_local.engine import control_vector_digest, control_vector_id, set_control_vector
from selar_local.errors import InvalidParameterError
from selar_local.params import DecodeParams
from selar_local.scheduler import Scheduler
from selar_local.vote import weighted_vote

from conftest import runtime_for
from decode_compare import assert_same_greedy_decode

QUESTION = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]
TIMING = {"prefill_seconds", "decode_seconds"}


@pytest.fixture(scope="module")
def steered(model_files, tmp_path_factory):
    """A 4-sequence SmolLM2 runtime with steering vectors built from 2 pairs in a private cache."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("cache")
        patch.setenv("SELAR_CACHE_DIR", str(cache))
        rt = runtime_for("llama", model_files, n_parallel=4)
        built = steering.build(rt, n_pairs=2)
        yield rt, built, cache
        set_control_vector(rt.context, None)
        rt.slots.forget_free()


def fields(result) -> dict:
    return {k: v for k, v in dataclasses.asdict(result).items() if k not in TIMING}


def test_alpha_zero_is_cot_exactly(steered):
    rt, _, _ = steered
    rt.slots.forget_free()  # the runtime is shared across modules: start both decodes with a cold prompt cache
    cot = rt.generate(messages=QUESTION, params=DecodeParams(method="cot", max_tokens=40, seed=7))
    assert control_vector_id(rt.context) is None
    zero = rt.generate(messages=QUESTION, params=DecodeParams(method="frac", frac_alpha=0.0, max_tokens=40, seed=7))
    assert control_vector_id(rt.context) is not None  # the zero vector was applied, not skipped
    assert fields(zero) == fields(cot)


def test_nonzero_alpha_changes_the_output_and_cot_after_it_is_unchanged(steered):
    rt, _, _ = steered
    greedy = dict(max_tokens=24, greedy=True, logprobs=2)
    cot = rt.generate(messages=QUESTION, params=DecodeParams(method="cot", **greedy))
    pushed = rt.generate(messages=QUESTION, params=DecodeParams(method="frac", frac_alpha=0.3, **greedy))
    assert pushed.tokens != cot.tokens
    again = rt.generate(messages=QUESTION, params=DecodeParams(method="cot", **greedy))
    assert control_vector_id(rt.context) is None
    assert fields(again) == fields(cot)


def test_scheduler_never_mixes_control_vectors_in_one_decode(steered):
    """Requests alternate between cot and two alphas. Every llama_decode is checked: the context's
    vector is the one each sequence in the batch asked for. Each answer equals its request decoded
    alone (a prompt cache kept across a switch would change it)."""
    rt, built, _ = steered
    scheduler = Scheduler(rt, queue_size=16)
    generator = scheduler._generator
    wanted = {None: None, **{f"frac:{a!r}": control_vector_digest(steering.control_vector(built, a))
                            for a in (0.1, 0.25)}}
    decode, seen, mixed = rt.context._decode, [], []

    def checked_decode(batch, n):
        live = {seq.seq_id: frac.control_key(seq.params) for seq in generator._live.values()}
        in_batch = {live[s] for s in rt.context._seq_id[:n].tolist() if s in live}
        seen.append(control_vector_id(rt.context))
        if any(wanted[key] != control_vector_id(rt.context) for key in in_batch) or len(in_batch) > 1:
            mixed.append(in_batch)
        return decode(batch, n)

    rt.context._decode = checked_decode
    plans = [DecodeParams(method="cot"), DecodeParams(method="frac", frac_alpha=0.1),
             DecodeParams(method="frac", frac_alpha=0.25), DecodeParams(method="cot"),
             DecodeParams(method="frac", frac_alpha=0.1), DecodeParams(method="frac", frac_alpha=0.1)]
    plans = [p.replace(max_tokens=10, greedy=True, logprobs=2) for p in plans]
    tokens = rt.encode(messages=QUESTION)
    try:
        handles = [scheduler.submit(tokens, p) for p in plans]
        results = [h.wait(timeout=600) for h in handles]
    finally:
        scheduler.close()
        rt.context._decode = decode
    assert mixed == []
    switches = sum(1 for a, b in zip(seen, seen[1:]) if a != b)
    assert switches >= 3, seen  # cot -> 0.1 -> 0.25 -> cot -> 0.1 at least
    for params, result in zip(plans, results):
        alone = rt.generate(messages=QUESTION, params=params)
        assert_same_greedy_decode(result, alone)


def test_batch_mixing_methods_and_alphas_is_grouped(steered):
    rt, _, _ = steered
    tokens = rt.encode(messages=QUESTION)
    plans = [DecodeParams(method="frac", frac_alpha=0.2), DecodeParams(method="cot"),
             DecodeParams(method="frac", frac_alpha=0.2), DecodeParams(method="frac", frac_alpha=-0.2)]
    plans = [p.replace(max_tokens=8, greedy=True, logprobs=2) for p in plans]
    finished = []
    results = rt.generate_batch([tokens] * 4, plans, on_finish=lambda i, r: finished.append(i))
    assert sorted(finished) == [0, 1, 2, 3]
    for params, result in zip(plans, results):
        assert_same_greedy_decode(result, rt.generate(messages=QUESTION, params=params))
    assert results[0].tokens != results[1].tokens or results[3].tokens != results[1].tokens


def test_samples_draw_an_alpha_each_and_vote(steered):
    rt, _, _ = steered
    params = DecodeParams(method="frac", max_tokens=12, seed=11, logprobs=2)
    vote = frac.generate_samples(rt, messages=QUESTION, params=params, samples=3, alpha_range=(0.0, 0.15))
    alphas = steering.alpha_draws((0.0, 0.15), 3, 11)
    assert len(set(alphas)) == 3 and len(vote.results) == 3
    for i in range(3):
        alone = rt.generate(messages=QUESTION, params=params.replace(seed=11 + i, frac_alpha=alphas[i]))
        assert fields(vote.results[i])["tokens"] == alone.tokens
    assert 0 <= vote.index < 3
    # The vote the params name: weighted by exp(mean log-probability), over the same draws
    weighted = frac.generate_samples(rt, messages=QUESTION, params=params.replace(vote="weighted"), samples=3,
                                     alpha_range=(0.0, 0.15))
    assert [r.tokens for r in weighted.results] == [r.tokens for r in vote.results]
    keys = [answer_key(a, "gsm8k") for a in weighted.answers]
    expected = weighted_vote(keys, [r.mean_logprob for r in weighted.results])
    assert (weighted.index, weighted.votes, weighted.voters) == (expected.index, expected.votes, expected.voters)


def test_bad_input(steered, model_files):
    with pytest.raises(InvalidParameterError, match=r"frac_alpha=1.5: expected a number in \[-1.0, 1.0\]"):
        DecodeParams(method="frac", frac_alpha=1.5)
    with pytest.raises(InvalidParameterError, match="frac_alpha="):
        DecodeParams(method="cot", frac_alpha=float("nan"))
    rt, _, _ = steered
    with pytest.raises(InvalidParameterError, match="samples"):
        frac.generate_samples(rt, messages=QUESTION, samples=5)
    other = runtime_for("qwen2", model_files)  # no vectors built for it in this cache
    with pytest.raises(steering.SteeringError, match="no steering vector for .*selar steer build"):
        other.generate(messages=QUESTION, params=DecodeParams(method="frac", frac_alpha=0.1, max_tokens=4))
    scheduler = Scheduler(other)
    try:
        with pytest.raises(steering.SteeringError, match="no steering vector"):
            scheduler.submit(other.encode(messages=QUESTION), DecodeParams(method="frac", frac_alpha=0.1))
    finally:
        scheduler.close()


def test_server_takes_frac_and_answers_400_for_bad_input(steered, model_files, tmp_path):
    import httpx
    from serve_helpers import running_server

    _, _, cache = steered
    body = {"messages": QUESTION, "max_tokens": 4, "method": "frac"}
    with running_server(model_files["llama"], "--parallel", "2", env={"SELAR_CACHE_DIR": str(cache)}) as url:
        ok = httpx.post(url + "/v1/chat/completions", json={**body, "frac_alpha": 0.1}, timeout=120)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
        bad = httpx.post(url + "/v1/chat/completions", json={**body, "frac_alpha": 1.5}, timeout=120)
        assert bad.status_code == 400 and "frac_alpha=1.5" in bad.json()["error"]["message"]
    with running_server(model_files["llama"], env={"SELAR_CACHE_DIR": str(tmp_path / "empty")}) as url:
        missing = httpx.post(url + "/v1/chat/completions", json={**body, "frac_alpha": 0.1}, timeout=120)
        assert missing.status_code == 400 and "selar steer build" in missing.json()["error"]["message"]
