"""`--method latentmas` (the roles' turns over one sequence, latent steps between them) and
`--method textmas` (the same roles in text) on SmolLM2, from the loop to the facades, the
server and `selar bench`; bad requests refused by name."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from conftest import record_latent_policies, runtime_for
from selar_local.agent_roles import ROLE_NAMES, ROLES, latentmas_turn, textmas_turn
from selar_local.api import Selar
from selar_local.bench import report as bench_report
from selar_local.bench.runner import RESULTS_NAME, load_config_problems, problem_prompt, read_config, read_results
from selar_local.cli import main as cli_main
from selar_local.errors import InvalidParameterError
from selar_local.generate import BatchGenerator, generate_groups
from selar_local.latentseek_search import final_states
from selar_local.params import DecodeParams
from selar_local.textmas_search import search as textmas
from selar_local.turns import TurnPrompt, latentmas_prompt

MODEL = "smollm2-135m-instruct"
PROBLEM = "What is 12 + 30? Think step by step."
QUESTION = [{"role": "user", "content": PROBLEM}]
M = 2  # latent steps after each of the three thinking roles


@pytest.fixture(scope="module")
def rt(model_files):
    return runtime_for("llama", model_files, n_parallel=2, n_ctx=2048)


def _mas(**changes) -> DecodeParams:
    return DecodeParams(**{"method": "latentmas", "latent_steps": M, "max_tokens": 12, "seed": 3, **changes})


def test_the_turns_are_the_templates_rendering_of_the_whole_conversation(rt):
    prompt = rt.encode(messages=QUESTION, method="latentmas")
    assert isinstance(prompt, TurnPrompt) and len(prompt.later) == len(ROLES) - 1
    assert list(prompt) == rt.encode(messages=latentmas_turn("planner", PROBLEM))
    conversation = []
    for i, name in enumerate(ROLE_NAMES):
        conversation += ([{"role": "assistant", "content": ""}] if i else []) + latentmas_turn(name, PROBLEM)
    whole = rt.encode(messages=conversation)
    assert list(prompt) + [t for turn in prompt.later for t in turn] == whole
    assert prompt.total == len(whole)
    assert rt.encode(messages=QUESTION, method="cot") == rt.encode(messages=QUESTION)  # other methods: as given


def test_the_sequence_holds_every_turn_and_latent_step_and_the_first_input_is_the_aligned_state(rt):
    prompt = latentmas_prompt(rt, QUESTION)
    generator = BatchGenerator(rt)
    request_id, _ = generator.submit(prompt, _mas())
    seq = generator.table.live[request_id]
    policy = seq.policy
    first = None
    while first is None:
        events = generator.step()
        first = next((e for e in events if e.request_id == request_id), None)
    # the first shown token comes after all turns and 3 * M latent inputs, each with its own cell
    # (the token itself is the next input: at that position)
    assert len(first.latent) == 3 * M and [m.step for m in first.latent] == list(range(3 * M))
    assert seq.position == prompt.total + 3 * M
    assert rt.context.sequence_length(seq.seq_id) == prompt.total + 3 * M
    assert len(policy.fed) == 3 * M and policy.latent_left == 0 and not policy.needs_hidden
    # the planner's first latent input: its prompt's final state, aligned (computed apart)
    # (there the prompt is one batch; the loop decodes its last token alone, as a latent segment
    # follows: rounding of a differently shaped batch, far below the distance to the state of
    # the position before, which tells a wrong row apart)
    before, state = final_states(rt, list(prompt), len(prompt) - 2)
    expected = policy.alignment.apply(state)

    def apart(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    assert apart(policy.fed[0], expected) < 0.05 < 0.5 < apart(policy.alignment.apply(before), expected)
    while request_id in generator.table.live:
        generator.step()
    result = generator.pop_result(request_id)
    generator.close()
    assert (result.prompt_tokens, result.latent_steps) == (prompt.total, 3 * M)
    assert 1 <= result.completion_tokens <= 12 and generator.kv_cells_in_use() == 0


def test_samples_share_the_planner_prefill_and_latent_noise_parts_their_paths(rt, monkeypatch):
    made = record_latent_policies(monkeypatch)
    prompt = latentmas_prompt(rt, QUESTION)
    rt.slots.forget_free()
    plain = generate_groups(rt, [prompt], [[_mas(seed=5), _mas(seed=6)]])[0]
    assert sorted(r.cached_tokens for r in plain) == [0, len(prompt) - 1]  # the second copied the planner's cells
    assert all((r.latent_steps, r.prompt_tokens) == (3 * M, prompt.total) for r in plain)
    # without noise the planner's thoughts depend on the prompt only (the second sequence decoded
    # the prompt's last token again, alone: rounding only); with it, on the seed: two draws of
    # N(0, (0.5 |a|)^2) differ by about 0.5 * sqrt(2) |a|
    def apart(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(a))

    assert apart(made[0].fed[0], made[1].fed[0]) < 0.1
    made.clear()
    generate_groups(rt, [prompt], [[_mas(seed=5, latent_noise=0.5), _mas(seed=6, latent_noise=0.5)]])
    assert apart(made[0].fed[0], made[1].fed[0]) > 0.4
    for policy in made:
        norm = np.linalg.norm(policy.fed[0])
        assert 0.5 * policy.alignment.fed_norm < norm < 2.0 * policy.alignment.fed_norm


def test_bad_latentmas_requests_are_refused_by_name(rt):
    with pytest.raises(InvalidParameterError, match="at least 1 for latentmas"):
        _mas(latent_steps=0)
    with pytest.raises(InvalidParameterError, match="needs a chat request"):
        rt.generate("What is 2 + 2?", _mas())  # a raw prompt has no roles
    with pytest.raises(InvalidParameterError, match="takes no tools"):
        rt.encode(messages=QUESTION, tools=[{"type": "function", "function": {"name": "f"}}], method="latentmas")
    with pytest.raises(InvalidParameterError, match="needs a method that takes turns"):
        rt.generate_batch([latentmas_prompt(rt, QUESTION)], [_mas(method="latent")])


def test_textmas_quotes_each_role_for_the_next_and_answers_with_the_solvers_text(rt):
    seen = []

    def decode(prompts, params_list):
        seen.append((list(prompts[0]), params_list[0]))
        return rt.generate_batch(prompts, params_list)

    params = DecodeParams(method="textmas", max_tokens=10, seed=4)
    found = textmas(rt, PROBLEM, rt.encode(messages=QUESTION), params, decode=decode)
    assert [name for name, _ in found.notes] == list(ROLE_NAMES) and found.generations == 4
    for i, (tokens, used) in enumerate(seen):
        assert tokens == rt.encode(messages=textmas_turn(ROLE_NAMES[i], PROBLEM, found.notes[:i]))
        assert used == params.replace(method="cot")
    assert (found.text, found.tokens) == (found.results[-1].text, list(found.results[-1].tokens))
    assert found.notes[-1][1] == found.results[-1].content
    assert found.summary() == {"generations": 4, "roles": [
        {"role": n, "completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason}
        for n, r in zip(ROLE_NAMES, found.results)]}


def test_the_facade_runs_both(model_files):
    with Selar(str(model_files["llama"]), n_parallel=2, n_ctx=2048) as llm:
        mas = llm.create_chat_completion(QUESTION, method="latentmas", latent_steps=M, max_tokens=8, seed=2)
        prompt = latentmas_prompt(llm.runtime, QUESTION)
        assert mas["usage"]["prompt_tokens"] == prompt.total
        assert (mas["selar"]["method"], mas["selar"]["latent_steps"]) == ("latentmas", 3 * M)
        text = llm.create_chat_completion(QUESTION, method="textmas", max_tokens=8, seed=2)
        assert text["selar"]["generations"] == 4 and [r["role"] for r in text["selar"]["roles"]] == list(ROLE_NAMES)
        assert text["selar"]["decoded_tokens"] == sum(r["completion_tokens"] for r in text["selar"]["roles"])
        chunks = list(llm.create_chat_completion(QUESTION, method="textmas", max_tokens=8, seed=2, stream=True))
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
            text["choices"][0]["message"]["content"]


def test_the_server_answers_and_refuses(model_files):
    from serve_helpers import running_server

    body = {"messages": QUESTION, "max_tokens": 8, "seed": 1}
    with running_server(model_files["llama"], "--parallel", "2", "--n-ctx", "2048") as url:
        for method in ("latentmas", "textmas"):
            ok = httpx.post(url + "/v1/chat/completions", json={**body, "method": method, "latent_steps": M},
                            timeout=300)
            assert ok.status_code == 200 and ok.json()["selar"]["method"] == method, ok.text
        for bad, message in (({"method": "latentmas", "latent_steps": 0}, "at least 1 for latentmas"),
                             ({"method": "textmas", "n": 2}, "n must be 1")):
            refused = httpx.post(url + "/v1/chat/completions", json={**body, **bad}, timeout=60)
            assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.text
        raw = httpx.post(url + "/v1/completions", json={"prompt": PROBLEM, "method": "latentmas", "max_tokens": 4},
                         timeout=60)
        assert raw.status_code == 400 and "needs a chat request" in raw.json()["error"]["message"], raw.text


def test_bench_runs_both_with_searches_in_parallel(tmp_path, model_files):
    out = tmp_path / "team"
    assert cli_main(["bench", "--dataset", "gsm8k", "--limit", "3", "--max-tokens", "8", "--seed", "9",
                     "--methods", "latentmas,textmas", "--latent-steps", str(M), "--parallel", "2", "--model", MODEL,
                     "--n-ctx", "2048", "--no-progress", "--out", str(out)]) == 0
    config = read_config(out)
    records = read_results(out / RESULTS_NAME)
    problems = load_config_problems(config)
    assert sorted((r["method"], r["id"]) for r in records) == sorted(
        (m, p.id) for m in ("latentmas", "textmas") for p in problems)
    rt = runtime_for("llama", model_files, n_ctx=2048)
    for record in records:
        problem = next(p for p in problems if p.id == record["id"])
        if record["method"] == "latentmas":
            prompt = problem_prompt(rt, problem, "latentmas")
            assert (record["prompt_tokens"], record["latent_steps"]) == (prompt.total, 3 * M)
        else:
            assert record["generations"] == 4 and [r["role"] for r in record["roles"]] == list(ROLE_NAMES)
            assert record["decoded_tokens"] == sum(r["completion_tokens"] for r in record["roles"])
            assert record["completion_tokens"] == record["roles"][-1]["completion_tokens"]
            assert record["parallel"] == 2 and record["wall_seconds"] > 0
    assert json.loads((out / "config.json").read_text())["methods"] == ["latentmas", "textmas"]
    md = bench_report.write_report([out], out, plots=False, baseline="textmas")
    header = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| method")).split("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")] for line in md.splitlines()
            if line.startswith("| latentmas") or line.startswith("| textmas")}
    by = {m: [r for r in records if r["method"] == m] for m in ("latentmas", "textmas")}
    for method, cells in rows.items():
        mean = lambda field: sum(r[field] for r in by[method]) / len(by[method])  # noqa: E731
        assert cells[header.index("latent steps")] == f"{(3 * M if method == 'latentmas' else 0):.1f}"
        assert cells[header.index("mean tokens")] == f"{mean('completion_tokens'):.1f}"
        decoded = mean("decoded_tokens") if method == "textmas" else mean("completion_tokens")
        assert cells[header.index("decoded tokens")] == f"{decoded:.1f}"
        assert cells[header.index("mean generations")] == ("4.00" if method == "textmas" else "1.00")


def test_selar_run_runs_both(capsys):
    assert cli_main(["run", PROBLEM, "--method", "latentmas", "--latent-steps", str(M), "--max-tokens", "6",
                     "--seed", "1", "--model", MODEL, "--n-ctx", "2048"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "[latentmas] " in err and f"{3 * M} latent steps" in err
    assert cli_main(["run", PROBLEM, "--method", "textmas", "--max-tokens", "6", "--seed", "1", "--model", MODEL,
                     "--n-ctx", "2048"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "[textmas] 4 roles decoded (tokens: planner " in err
    assert cli_main(["run", PROBLEM, "--method", "latentmas", "--raw", "--model", MODEL]) == 2
    assert "needs a chat request" in capsys.readouterr().err
