"""LatentSeek's math: the closed-form REINFORCE gradient against finite differences on a tiny
random table, Adam against its formula, the prefix tokens; the output table and the search on a
real GGUF model (the grading: tests/test_self_grading.py)."""
from __future__ import annotations

import numpy as np
import pytest

from selar_local import latentseek as ls
from selar_local.engine import LayerStates
from selar_local.errors import InvalidParameterError
from selar_local.params import DecodeParams

from conftest import runtime_for


def _tiny(seed=0, n_vocab=7, n_embd=5, steps=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_vocab, n_embd)), rng.standard_normal((steps, n_embd)), rng.integers(0, n_vocab, steps)


def test_gradient_matches_finite_differences():
    table, z, tokens = _tiny()
    grad = ls.log_prob_gradient(table, z, tokens)
    h = 1e-6
    numeric = np.zeros_like(z)
    for t in range(z.shape[0]):
        for j in range(z.shape[1]):
            up, down = z.copy(), z.copy()
            up[t, j] += h
            down[t, j] -= h
            numeric[t, j] = (ls.log_probs(table, up, tokens)[t] - ls.log_probs(table, down, tokens)[t]) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ls.policy_gradient(table, z, tokens, -2 / 3), -2 / 3 * grad)


def test_a_float32_table_is_never_copied_to_float64_and_gives_its_float64_gradient():
    """The 1.5B model's table is 0.9 GiB as float32; the search's z is float64. The products run
    in the table's dtype (no float64 copy of the table: peak allocation under a quarter of it)
    and agree with the float64 computation to float32 rounding."""
    import tracemalloc

    rng = np.random.default_rng(3)
    table = rng.normal(size=(20000, 256)).astype(np.float32)  # 20 MB; a float64 copy would be 40
    z = rng.normal(size=(4, 256)) * 0.1
    tokens = np.array([5, 17, 19999, 0])
    tracemalloc.start()
    grad = ls.policy_gradient(table, z, tokens, -1.0)
    prefix = ls.prefix_tokens(table, z)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < table.nbytes / 4, peak  # the (4, 20000) logits and their softmax, not the table
    exact = ls.policy_gradient(table.astype(np.float64), z, tokens, -1.0)
    assert grad.dtype == np.float64 and grad.shape == z.shape
    np.testing.assert_allclose(grad, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
    np.testing.assert_array_equal(prefix, ls.prefix_tokens(table.astype(np.float64), z))


def test_log_probs_are_a_normalised_distribution():
    table, z, _ = _tiny(1)
    every = np.stack([ls.log_probs(table, z, np.full(3, v)) for v in range(table.shape[0])], axis=1)
    np.testing.assert_allclose(np.exp(every).sum(axis=1), 1.0, rtol=1e-12)


def test_ascent_along_the_gradient_raises_the_log_probability():
    table, z, tokens = _tiny(2)
    adam, moved = ls.Adam(), z
    before = ls.log_probs(table, z, tokens).sum()
    for _ in range(10):
        moved = adam.step(moved, ls.log_prob_gradient(table, moved, tokens))
    assert ls.log_probs(table, moved, tokens).sum() > before
    assert adam.t == 10 and adam.lr == 0.03


def test_adam_follows_its_formula():
    g1, g2 = np.array([0.5, -2.0, 1e-3]), np.array([-1.0, 1.0, 4.0])
    p0 = np.array([1.0, 2.0, 3.0])
    adam = ls.Adam(lr=0.03)
    p1 = adam.step(p0, g1)
    np.testing.assert_allclose(p1, p0 + 0.03 * g1 / (np.abs(g1) + 1e-8), rtol=1e-12)  # first step: lr * sign
    p2 = adam.step(p1, g2)
    m = 0.9 * 0.1 * g1 + 0.1 * g2
    v = 0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2
    expected = p1 + 0.03 * (m / (1 - 0.9 ** 2)) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    np.testing.assert_allclose(p2, expected, rtol=1e-12)


def test_prefix_tokens_and_length():
    table = np.eye(4)
    z = np.array([[0, 3, 1, 0], [5, 0, 0, 1.0]])
    assert ls.prefix_tokens(table, z).tolist() == [1, 0]
    assert [ls.prefix_length(n) for n in (1, 9, 10, 100, 2999, 5000)] == [1, 1, 1, 10, 299, 300]
    with pytest.raises(InvalidParameterError, match="at least one token"):
        ls.prefix_length(0)


def test_output_table_gives_llama_cpp_logits_from_the_final_state(model_files):
    """W_out times the final hidden state (result_norm, read from the graph) is the logits
    llama.cpp computes, up to its quantised matrix product."""
    rt = runtime_for("llama", model_files)
    table = ls.output_table(rt.model.path)
    assert table.shape == (rt.model.n_vocab, rt.model.n_embd) and table.dtype == np.float32
    states = LayerStates(rt.model, n_ctx=128, n_threads=1, n_threads_batch=1)
    tokens = rt.model.tokenize("The capital of France is")
    states.read(tokens)
    mine = table @ states.final_norm
    theirs = states.context.logits(len(tokens) - 1)
    assert int(np.argmax(mine)) == int(np.argmax(theirs))
    np.testing.assert_allclose(mine, theirs, atol=0.02 * np.abs(theirs).max())
    states.close()
    with pytest.raises(InvalidParameterError, match="over the 1 MiB bound"):
        ls.output_table(rt.model.path, max_bytes=1 << 20)
    # dequantised once per file and shared read-only: side-by-side searches hold one copy
    assert ls.output_table(rt.model.path) is table and not table.flags.writeable
    from concurrent.futures import ThreadPoolExecutor

    ls._TABLES.clear()  # four searches starting at once: one dequantises, the others wait for it
    with ThreadPoolExecutor(4) as pool:
        tables = list(pool.map(lambda _: ls.output_table(rt.model.path), range(4)))
    assert all(t is tables[0] for t in tables) and tables[0] is not table
    np.testing.assert_array_equal(tables[0], table)


def test_final_states_are_the_states_that_chose_the_greedy_answer(model_files):
    """z_t, the engine's hidden-state output at the position before answer token t, gives that
    token as argmax W_out z_t (where the top two are not within the quantised product's error)."""
    from selar_local.latentseek_search import final_states

    rt = runtime_for("llama", model_files)
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    prompt = rt.encode(messages=messages)
    answer = rt.generate(messages=messages, params=DecodeParams(method="cot", greedy=True, max_tokens=6)).tokens
    z = final_states(rt, prompt + answer[:5], len(prompt) - 1)
    assert z.shape == (6, rt.model.n_embd)
    table = ls.output_table(rt.model.path)
    logits = z @ table.T
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.05 * np.abs(logits).max()
    assert clear.sum() >= 3
    assert (ls.prefix_tokens(table, z)[clear] == np.asarray(answer)[clear]).all()


def test_search_runs_its_iterations_and_reports_them(model_files):
    from selar_local.latentseek_search import latentseek

    rt = runtime_for("llama", model_files)
    table = ls.output_table(rt.model.path)
    found = latentseek(rt, "What is 12 + 7?", max_tokens=20, iterations=2, threshold=1.0, table=table)
    assert found.iterations == 2 and found.generations == found.gradings == 3 and len(found.rewards) == 3
    assert all(abs(6 * r - round(6 * r)) < 1e-9 for r in found.rewards)  # the checks weigh 2, 1, 2, 1 of 6
    assert found.grading_tokens > 0 and found.decoded_tokens == sum(
        r.completion_tokens for r in found.results) + found.grading_tokens
    assert all(-1.0 <= r <= 0.0 for r in found.rewards)
    assert found.tokens[found.prefix_length:] == found.results[-1].tokens  # the greedy rest after the prefix
    assert found.prefix_length == ls.prefix_length(len(found.results[0].tokens))
    none = latentseek(rt, "What is 12 + 7?", max_tokens=20, iterations=0, table=table)
    assert none.iterations == 0 and none.tokens == found.results[0].tokens and none.generations == 1
    with pytest.raises(InvalidParameterError, match="invalid LatentSeek settings"):
        latentseek(rt, "What is 12 + 7?", rho=0.0, table=table)


def test_the_reference_reward_stops_the_search_at_the_first_answer_it_accepts(model_files):
    """`psrm`: the paper's perfect sparse reward, 0 for an answer the reference accepts, -1 for
    any other, no grading decoded; the search stops at the first accepted answer, and without a
    reference (anything but `selar bench`) it is refused before it decodes."""
    from selar_local.latentseek_search import search

    rt = runtime_for("llama", model_files)
    table = ls.output_table(rt.model.path)
    prompt = rt.encode(messages=[{"role": "user", "content": "What is 12 + 7?"}])
    params = rt.default_params(method="latentseek", greedy=True, max_tokens=20, latentseek_iterations=3,
                               latentseek_grader="psrm")
    seen: list[str] = []

    def second_answer_right(answer: str) -> bool:
        seen.append(answer)
        return len(seen) == 2

    found = search(rt, "What is 12 + 7?", prompt, params, table=table, reference=second_answer_right)
    assert (found.iterations, found.rewards, found.generations, found.gradings) == (1, [-1.0, 0.0], 2, 2)
    assert found.grading_tokens == 0 and found.decoded_tokens == sum(r.completion_tokens for r in found.results)
    assert seen == [found.first_answer, found.text] and found.settings["grader"] == "psrm"
    never = search(rt, "What is 12 + 7?", prompt, params, table=table, reference=lambda answer: False)
    assert (never.iterations, never.rewards, never.generations) == (3, [-1.0] * 4, 4)
    always = search(rt, "What is 12 + 7?", prompt, params, table=table, reference=lambda answer: True)
    assert (always.iterations, always.rewards, always.text) == (0, [0.0], found.first_answer)
    with pytest.raises(InvalidParameterError, match="only `selar bench` has"):
        search(rt, "What is 12 + 7?", prompt, params, table=table)
