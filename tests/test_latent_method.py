"""`--method latent` on a real model (SmolLM2): m = 0 is exactly cot with the same seed,
m > 0 takes m latent steps before the text, the latent noise gives each seed its own
path, and a model whose soft-input self-check failed is refused."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from selar_local.errors import InvalidParameterError, UnsupportedModelError
from selar_local.generate import generate_groups, stream_tokens
from selar_local.params import DecodeParams

from conftest import record_latent_policies, runtime_for

QUESTION = [{"role": "user", "content": "What is 12 + 30? Think step by step."}]
TIMING = {"prefill_seconds", "decode_seconds"}


def _run(rt, prompt, params):
    """(events, result, the sequence's policy) of one streamed generation."""
    stream = stream_tokens(rt, prompt, params)
    events = []
    while True:
        try:
            events.append(next(stream))
        except StopIteration as done:
            return events, done.value


def _fields(result) -> dict:
    return {k: v for k, v in dataclasses.asdict(result).items() if k not in TIMING}


@pytest.fixture(scope="module")
def rt(model_files):
    runtime = runtime_for("llama", model_files, n_parallel=2)
    assert runtime.self_check.passed
    return runtime


def test_zero_latent_steps_is_exactly_cot(rt):
    prompt = rt.encode(messages=QUESTION)
    cot = DecodeParams(method="cot", max_tokens=24, seed=7, logprobs=2)
    _run(rt, prompt, cot)  # both runs below then find the prompt in the cache (cached_tokens equal)
    _, latent0 = _run(rt, prompt, cot.replace(method="latent", latent_steps=0))
    cot_events, reference = _run(rt, prompt, cot)
    assert reference.cached_tokens == len(prompt)
    assert _fields(latent0) == _fields(reference)
    assert latent0.latent_steps == 0 and all(e.latent == () for e in cot_events)


def test_latent_steps_are_fed_before_the_text(rt, monkeypatch):
    made = record_latent_policies(monkeypatch)
    prompt = rt.encode(messages=QUESTION)
    params = DecodeParams(method="latent", latent_steps=3, max_tokens=16, seed=7)
    events, result = _run(rt, prompt, params)
    (policy,) = made
    assert result.latent_steps == 3 and len(policy.fed) == 3 and policy.latent_left == 0
    alignment = rt.latent_alignment("ridge")
    for vector in policy.fed:  # the aligned state at the input rows' norm (no noise asked)
        assert vector.shape == (rt.model.n_embd_inp,)
        assert np.linalg.norm(vector) == pytest.approx(alignment.fed_norm, rel=1e-4)
    # the markers ride on the first token's event, in order, none later
    assert [m.step for m in events[0].latent] == [0, 1, 2]
    assert all(e.latent == () for e in events[1:])
    assert all(1 <= len(m.top_ids) <= params.ks and sum(m.top_probs) == pytest.approx(1.0, abs=1e-5)
               for m in events[0].latent)
    assert result.tokens and result.text and len(result.tokens) == len(events)
    assert result.soft_steps == 0  # the text itself is decoded as cot


def _fed_paths(rt, prompt, params_list, monkeypatch):
    made = record_latent_policies(monkeypatch)
    (results,) = generate_groups(rt, [prompt], [params_list])
    return [p.fed for p in made], results


def test_latent_noise_gives_each_seed_its_own_path(rt, monkeypatch):
    """Two samples of one prompt (a group: the prompt's cells are copied) feed the same
    vectors without noise and different ones with it; sigma 0 is no noise at all."""
    prompt = rt.encode(messages=QUESTION)
    base = DecodeParams(method="latent", latent_steps=2, max_tokens=4, seed=11)
    fed, results = _fed_paths(rt, prompt, [base, base.replace(seed=12)], monkeypatch)
    assert all(r.latent_steps == 2 for r in results)
    # The prompt's hidden state, no noise: one vector for both seeds (within rounding: the
    # second sequence decodes the prompt's last token on its own, see docs/LATENT.md)
    norm = np.linalg.norm(fed[0][0])
    assert np.linalg.norm(fed[0][0] - fed[1][0]) < 1e-3 * norm
    noisy = [base.replace(latent_noise=0.5), base.replace(latent_noise=0.5, seed=12)]
    fed_noisy, _ = _fed_paths(rt, prompt, noisy, monkeypatch)
    assert np.linalg.norm(fed_noisy[0][0] - fed_noisy[1][0]) > 0.3 * norm  # two independent draws
    # relative to the fed norm: ||noise|| ~ sigma ||v|| (d = 576: within 15%)
    gap = np.linalg.norm(fed_noisy[0][0] - fed[0][0]) / np.linalg.norm(fed[0][0])
    assert 0.5 * 0.85 < gap < 0.5 * 1.15
    zero, _ = _fed_paths(rt, prompt, [base.replace(latent_noise=0.0)], monkeypatch)
    assert np.linalg.norm(zero[0][0] - fed[0][0]) < 1e-3 * norm


def test_bad_latent_parameters_are_refused():
    with pytest.raises(InvalidParameterError, match="latent_steps"):
        DecodeParams(method="latent", latent_steps=-1)
    with pytest.raises(InvalidParameterError, match="latent_align"):
        DecodeParams(method="latent", latent_align="pca")
    with pytest.raises(InvalidParameterError, match="latent_noise"):
        DecodeParams(method="latent", latent_noise=float("nan"))


def test_latent_is_refused_on_a_model_whose_self_check_failed(rt, monkeypatch):
    """require_method is what submit() calls first: nothing is decoded for a refused method."""
    monkeypatch.setattr(rt, "self_check", dataclasses.replace(rt.self_check, passed=False, detail="rows differ"))
    with pytest.raises(UnsupportedModelError, match="method 'latent'.*rows differ"):
        rt.require_method("latent")
    with pytest.raises(UnsupportedModelError, match="method 'latent'"):
        next(stream_tokens(rt, rt.encode(messages=QUESTION), DecodeParams(method="latent")))
    rt.require_method("cot")


def test_selar_run_method_latent_traces_a_marker_per_latent_step(tmp_path, smollm_path):
    from test_cli import QUESTION as CLI_QUESTION, selar

    trace = tmp_path / "trace.jsonl"
    done = selar("run", "--model", str(smollm_path), "--method", "latent", "--latent-steps", "2",
                 "--max-tokens", "8", "--trace", str(trace), CLI_QUESTION)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    markers, tokens = records[:2], records[2:]
    assert [m["step"] for m in markers] == [0, 1] and all(m["latent"] for m in markers)
    for m in markers:  # no token of its own: the top tokens of that step's logits, with their text
        assert "token" not in m and len(m["top_ids"]) == len(m["top_probs"]) == len(m["top_tokens"]) >= 1
    assert 1 <= len(tokens) <= 8 and not any("latent" in r for r in tokens)
    assert done.stdout.strip() == "".join(r["text"] for r in tokens).strip()
    assert ", 2 latent steps, " in done.stderr.strip().splitlines()[-1]


def test_server_runs_method_latent_with_markers_in_selar_trace(smollm_path):
    import httpx
    from serve_helpers import running_server

    body = {"messages": QUESTION, "stream": True, "selar_trace": True, "max_tokens": 6, "seed": 3,
            "method": "latent", "latent_steps": 3, "latent_noise": 0.1}
    with running_server(smollm_path, "--parallel", "1", "--n-ctx", "512") as url, httpx.Client(timeout=120) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")]
        bad = http.post(url + "/v1/chat/completions", json={**body, "stream": False, "selar_trace": False,
                                                             "latent_align": "pca"})
    steps = [c["selar"] for c in chunks if c.get("choices") and "selar" in c and "index" in c["selar"]]
    assert [m["step"] for m in steps[0]["latent"]] == [0, 1, 2]
    assert all(m["latent"] and m["top_tokens"] for m in steps[0]["latent"])
    assert not any("latent" in s for s in steps[1:])
    (summary,) = [c["selar"] for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert summary["method"] == "latent" and summary["latent_steps"] == 3 and summary["latent_noise"] == 0.1
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert "latent_align" in error["message"] and error["type"] == "invalid_request_error"


class _Rows:
    """An input table of hand-made rows (EmbeddingTable's `row`)."""

    def __init__(self, rows):
        self.rows = rows

    def row(self, token):
        return self.rows[token]


class _Align:
    """An alignment whose output is given (LatentAlignment's `apply`)."""

    def __init__(self, out):
        self.out = out

    def apply(self, hidden):
        return self.out.copy()


def test_hidden_source_selar_is_selar_with_the_aligned_state_as_its_source():
    from selar_local.hidden_selar import HiddenSourceSelarPolicy
    from selar_local.policies import SelarPolicy, TokenInfo

    info = TokenInfo(6, np.zeros(6, dtype=bool))
    rows = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    logits = np.array([2.0, 1.9, 1.8, -5, -5, -5], np.float32)  # flat top 3: the gate opens
    params = DecodeParams(method="selar", soft_source="hidden", tau=0.2, lam=0.5, top_k=0, seed=4)
    a = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    hidden_policy = HiddenSourceSelarPolicy(params, info)
    hidden_policy.alignment, hidden_policy.table = _Align(a), _Rows(rows)
    token_policy = SelarPolicy(params.replace(soft_source="mixture"), info)
    got, want = hidden_policy.propose(logits, np.zeros(4, np.float32)), token_policy.propose(logits)
    assert want.soft and got.soft and got.token == want.token and got.entropy == want.entropy
    assert np.array_equal(got.top_ids, want.top_ids) and np.array_equal(got.top_probs, want.top_probs)
    push = np.float32(0.5 * want.entropy)
    v1 = int(want.top_ids[0])
    assert np.allclose(got.vector, (1 + push) * a - push * rows[v1], rtol=1e-6)
    assert got.mix_ids is None and got.mix_weights is None
    # a = E[v1]: the input is the token v1's row, whatever the push
    hidden_policy.alignment = _Align(rows[v1])
    assert np.allclose(hidden_policy.propose(logits, np.zeros(4, np.float32)).vector, rows[v1], atol=1e-5)
    # gate closed: exactly SeLaR's discrete step
    sharp = np.array([9.0, 0, 0, -5, -5, -5], np.float32)
    closed = HiddenSourceSelarPolicy(params, info).propose(sharp, np.zeros(4, np.float32))
    reference = SelarPolicy(params, info).propose(sharp)
    assert not closed.soft and closed.vector is None
    assert (closed.token, closed.entropy, closed.logprob) == (reference.token, reference.entropy, reference.logprob)
    assert np.array_equal(closed.top_ids, reference.top_ids) and np.array_equal(closed.top_probs, reference.top_probs)


def test_selar_hidden_source_runs_on_a_real_model(rt):
    prompt = rt.encode(messages=QUESTION)
    params = DecodeParams(method="selar", soft_source="hidden", tau=0.0, max_tokens=12, seed=5)
    _, first = _run(rt, prompt, params)
    _, again = _run(rt, prompt, params)  # the prompt's cells cached: its last token is fed again for its hidden state
    for result in (first, again):
        assert result.soft_steps > 0 and result.effective_counts == [] and result.tokens
    assert again.cached_tokens == len(prompt) - 1


def test_selar_bench_runs_latent_beside_cot_and_records_its_latent_steps(tmp_path, smollm_path):
    from selar_local.bench.runner import RESULTS_NAME, read_results
    from selar_local.cli import main as cli_main

    out = tmp_path / "run"
    assert cli_main(["bench", "--dataset", "gsm8k", "--limit", "2", "--methods", "cot,latent", "--latent-steps", "2",
                     "--greedy", "--max-tokens", "8", "--model", str(smollm_path), "--n-ctx", "512",
                     "--no-progress", "--parallel", "2", "--out", str(out)]) == 0
    rows = read_results(out / RESULTS_NAME)
    assert sorted((r["method"], r["latent_steps"]) for r in rows) == [("cot", 0)] * 2 + [("latent", 2)] * 2
    assert all(r["error"] is None and r["completion_tokens"] >= 1 for r in rows)


class _MixRows(_Rows):
    def mix(self, ids, weights):
        return np.dot(np.asarray(weights, np.float32), self.rows[np.asarray(ids)])


def test_soft_latent_noise_adds_gaussian_noise_to_the_fed_mixture_only():
    from selar_local.latent_steps import latent_noise_rng
    from selar_local.noisy_soft import NoisySoftThinkingPolicy
    from selar_local.policies import SoftThinkingPolicy, TokenInfo

    info = TokenInfo(6, np.zeros(6, dtype=bool))
    rows = _MixRows(np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32))
    logits = np.array([2.0, 1.9, 1.8, 1.0, -5, -5], np.float32)
    params = DecodeParams(method="soft", top_k=0, soft_topk=4, seed=9, latent_noise=0.3)
    noisy = NoisySoftThinkingPolicy(params, info)
    noisy.table = rows
    plain = SoftThinkingPolicy(params, info)
    got, want = noisy.propose(logits), plain.propose(logits)
    assert got.soft and (got.token, got.entropy) == (want.token, want.entropy)
    assert np.array_equal(got.mix_ids, want.mix_ids) and np.array_equal(got.mix_weights, want.mix_weights)
    mixture = rows.mix(want.mix_ids, want.mix_weights)
    std = 0.3 * np.linalg.norm(mixture) / np.sqrt(64)
    expected = mixture + latent_noise_rng(9).standard_normal(64, dtype=np.float32) * np.float32(std)
    assert np.allclose(got.vector, expected, rtol=1e-6, atol=1e-7)
    quiet = NoisySoftThinkingPolicy(params.replace(latent_noise=0.0), info)
    assert not quiet.reads_table and quiet.propose(logits).vector is None  # sigma 0: Soft Thinking's mixture


def test_soft_with_latent_noise_runs_on_a_real_model(rt):
    prompt = rt.encode(messages=QUESTION)
    params = DecodeParams(method="soft", max_tokens=10, seed=5, latent_noise=0.2)
    _, result = _run(rt, prompt, params)
    assert result.soft_steps > 0 and len(result.effective_counts) == result.soft_steps and result.tokens


def test_python_api_takes_latent_and_votes_over_noisy_latent_paths(rt):
    """Selar.create_chat_completion(method="latent", n=2, latent_noise=...): two choices,
    each with its latent steps counted in its summary, and a vote over them."""
    from selar_local.api import Selar

    llm = Selar(runtime=rt, queue_size=1)
    try:
        out = llm.create_chat_completion(QUESTION, method="latent", latent_steps=2, latent_noise=0.3, n=2,
                                         max_tokens=6, seed=3)
        with pytest.raises(InvalidParameterError, match="latent_steps"):
            llm.builder.chat({"messages": QUESTION, "method": "latent", "latent_steps": -3})
    finally:
        llm.scheduler.close()
    assert len(out["choices"]) == 2 and all(c["message"]["content"] for c in out["choices"])
    summaries = out["selar"]["choices"]
    assert [(s["method"], s["seed"], s["latent_steps"], s["latent_noise"]) for s in summaries] == [
        ("latent", 3, 2, 0.3), ("latent", 4, 2, 0.3)]


class _FixedNormAlign(_Align):
    fed_norm = 2.0

    def apply(self, hidden):
        return (hidden / np.linalg.norm(hidden) * self.fed_norm).astype(np.float32)


def test_latent_step_noise_is_exact_and_sigma_zero_draws_nothing():
    from selar_local.latent_policy import LatentPolicy
    from selar_local.latent_steps import latent_noise_rng
    from selar_local.policies import TokenInfo

    info = TokenInfo(6, np.zeros(6, dtype=bool))
    logits = np.array([2.0, 1.0, 0.5, -5, -5, -5], np.float32)
    hidden = np.array([3.0, -4.0, 0.0, 12.0], np.float32)  # norm 13
    clean = hidden / 13 * 2
    steps = []
    for sigma in (0.0, 0.0, 0.4):
        policy = LatentPolicy(DecodeParams(method="latent", latent_steps=2, latent_noise=sigma, seed=5), info)
        policy.alignment = _FixedNormAlign(None)
        steps.append([policy.latent_step(logits, hidden).vector for _ in range(2)])
        assert policy.latent_left == 0 and not policy.needs_hidden
    assert all(np.array_equal(v, clean) for v in steps[0] + steps[1])
    draws = latent_noise_rng(5)
    std = np.float32(0.4 * 2.0 / 2.0)  # sigma * fed norm / sqrt(d)
    for got in steps[2]:
        assert np.allclose(got, clean + draws.standard_normal(4, dtype=np.float32) * std, rtol=1e-6)
