"""--method latentseek from every entry point on SmolLM2: `selar run`, the Selar facade (plain
and streamed), the server over real HTTP, and `selar bench` (its rows and the report's mean
generations); bad settings are refused by name (HTTP 400 on the server). Also the bench's
--frac-alpha-range: one alpha per frac sample, recorded."""
from __future__ import annotations

import json

import httpx
import pytest

from conftest import runtime_for
from selar_local import latentseek as ls
from selar_local import steering
from selar_local.api import Selar
from selar_local.bench import report as bench_report
from selar_local.bench.runner import RESULTS_NAME, load_config_problems, problem_prompt, read_config, read_results
from selar_local.cli import main as cli_main
from selar_local.errors import InvalidParameterError
from selar_local.latentseek_search import search
from selar_local.methods import REGISTRY, is_search
from selar_local.params import DecodeParams
from selar_local.self_grading import DEFAULT_GRADER

MODEL = "smollm2-135m-instruct"
QUESTION = "What is 12 + 7?"
# threshold 1 (above any reward) runs every iteration: generations and gradings are 1 + iterations.
# The one-prompt grading: these tests compare one search decoded on two paths (the runtime's batch,
# the scheduler's requests), and the default grading's four checks share their decode steps
# differently on each, which on plain CPU kernels moves the last bits of a random model's logits
# and so its greedy text (docs/BENCHMARKS.md, "Batching"); it is tested in test_self_grading.py.
SETTINGS = {"latentseek_iterations": 2, "latentseek_threshold": 1.0, "latentseek_grader": "json"}
SEARCH_FIELDS = ("iterations", "rewards", "reward", "prefix_length", "generations", "gradings", "grading_tokens",
                 "first_answer")


def _params(rt, **changes):
    return rt.default_params(method="latentseek", greedy=True, max_tokens=16, **{**SETTINGS, **changes})


def test_the_registry_marks_latentseek_as_a_search_with_its_settings():
    method = REGISTRY["latentseek"]
    assert is_search("latentseek") and not is_search("cot") and method.search_function() is search
    assert [o.field for o in method.options] == ["latentseek_lr", "latentseek_iterations", "latentseek_rho",
                                                 "latentseek_threshold", "latentseek_grader"]
    defaults = DecodeParams(method="latentseek")
    assert (defaults.latentseek_lr, defaults.latentseek_iterations, defaults.latentseek_rho,
            defaults.latentseek_threshold, defaults.latentseek_grader) == (
        ls.LEARNING_RATE, ls.MAX_ITERATIONS, ls.RHO, ls.REWARD_THRESHOLD, DEFAULT_GRADER)
    assert DEFAULT_GRADER == "checks"


@pytest.mark.parametrize("field, value, message", [
    ("latentseek_rho", 0.0, r"rho=0.0 \(0 < rho <= 1\)"),
    ("latentseek_iterations", 33, r"iterations=33 \(an integer in \[0, 32\]\)"),
    ("latentseek_iterations", 1.5, r"iterations=1.5"),
    ("latentseek_lr", -0.1, r"lr=-0.1 \(a number in \(0, 10\]\)"),
    ("latentseek_threshold", 2.0, r"threshold=2.0 \(a number in \[-1, 1\]"),
    ("latentseek_lr", float("nan"), r"lr=nan"),
])
def test_bad_settings_are_refused_by_name(field, value, message):
    with pytest.raises(InvalidParameterError, match="invalid LatentSeek settings: " + message):
        DecodeParams(method="latentseek", **{field: value})


def test_the_facade_runs_the_search_and_streams_its_answer_as_one_chunk(model_files):
    rt = runtime_for("llama", model_files, n_parallel=2)
    messages = [{"role": "user", "content": QUESTION}]
    direct = search(rt, QUESTION, rt.encode(messages=messages), _params(rt))
    assert direct.iterations == 2 and direct.generations == direct.gradings == 3 and len(direct.rewards) == 3
    with Selar(runtime=rt) as llm:
        out = llm.create_chat_completion(messages, method="latentseek", greedy=True, max_tokens=16, **SETTINGS)
        chunks = list(llm.create_chat_completion(messages, method="latentseek", greedy=True, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}, **SETTINGS))
        with pytest.raises(InvalidParameterError, match="n must be 1"):
            llm.create_chat_completion(messages, method="latentseek", n=2, max_tokens=16)
        with pytest.raises(InvalidParameterError, match="use /v1/chat/completions"):
            llm.create_completion("What is 2 + 2?", method="latentseek", max_tokens=16)
        with pytest.raises(InvalidParameterError, match="grades its answer to the last user message"):
            llm.create_chat_completion([{"role": "system", "content": "Be brief."}], method="latentseek")
        with pytest.raises(InvalidParameterError, match="'latentseek' is a search over whole answers"):
            llm.scheduler.submit(rt.encode(messages=messages), DecodeParams(method="latentseek"))  # never stepped
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and choice["message"] == {"role": "assistant", "content": direct.text}
    assert choice["finish_reason"] == direct.finish_reason and choice["logprobs"] is None
    assert {k: out["selar"][k] for k in SEARCH_FIELDS} == direct.summary()
    assert out["selar"]["method"] == "latentseek" and out["selar"]["decoded_tokens"] == sum(
        r.completion_tokens for r in direct.results) + direct.grading_tokens
    assert (out["selar"]["lr"], out["selar"]["max_iterations"], out["selar"]["rho"], out["selar"]["threshold"],
            out["selar"]["grader"]) == (ls.LEARNING_RATE, 2, ls.RHO, 1.0, "json")
    assert out["usage"]["completion_tokens"] == len(direct.tokens)
    assert out["usage"]["prompt_tokens"] == len(rt.encode(messages=messages))
    # streamed: the role, the whole answer in one chunk, the closing chunk with the search, usage
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""},
                                                               {"content": direct.text}]
    assert chunks[2]["choices"][0]["finish_reason"] == direct.finish_reason
    assert {k: chunks[2]["selar"][k] for k in SEARCH_FIELDS} == direct.summary()
    assert chunks[3]["choices"] == [] and chunks[3]["usage"] == out["usage"]


def test_selar_run_prints_the_answer_iterations_and_rewards(model_files, capsys):
    rt = runtime_for("llama", model_files)
    direct = search(rt, QUESTION, rt.encode(messages=[{"role": "user", "content": QUESTION}]),
                    _params(rt, latentseek_iterations=1))
    code = cli_main(["run", QUESTION, "--method", "latentseek", "--latentseek-iterations", "1",
                     "--latentseek-threshold", "1", "--latentseek-grader", "json", "--greedy", "--max-tokens", "16",
                     "--model", str(model_files["llama"]),
                     "--n-ctx", "1024"])
    out, err = capsys.readouterr()
    assert code == 0 and out == direct.text + "\n"
    rewards = ", ".join(f"{r:.3f}" for r in direct.rewards)
    assert (f"[latentseek] 1 iterations, rewards [{rewards}], final reward {direct.reward:.3f}, 2 generations, "
            f"2 gradings ({direct.grading_tokens} tokens), latent prefix {direct.prefix_length} tokens, "
            f"{len(direct.tokens)} tokens") in err
    assert cli_main(["run", QUESTION, "--method", "latentseek", "--samples", "2", "--model", MODEL]) == 2
    assert "cannot be combined with --samples" in capsys.readouterr().err
    assert cli_main(["run", QUESTION, "--method", "latentseek", "--latentseek-rho", "0", "--model", MODEL]) == 2
    assert "rho=0.0 (0 < rho <= 1)" in capsys.readouterr().err


def _sse_chunks(text: str) -> list[dict]:
    frames = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


def test_the_server_answers_a_latentseek_chat_and_refuses_bad_settings(model_files):
    from serve_helpers import running_server

    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, "greedy": True,
            "method": "latentseek", "latentseek_iterations": 1, "latentseek_threshold": 1.0, "latentseek_grader": "json"}
    with running_server(model_files["llama"], "--parallel", "2") as url:
        ok = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        assert ok.status_code == 200, ok.text
        answer = ok.json()
        selar = answer["selar"]
        assert (selar["method"], selar["iterations"], selar["generations"], selar["gradings"]) == ("latentseek", 1, 2, 2)
        assert len(selar["rewards"]) == 2 and selar["reward"] == selar["rewards"][-1]
        assert all(r in (-1.0, -0.666667, -0.333333, 0.0) for r in selar["rewards"])
        assert 1 <= selar["prefix_length"] <= 12
        content = answer["choices"][0]["message"]["content"]
        assert isinstance(content, str) and answer["usage"]["completion_tokens"] >= selar["prefix_length"]
        streamed = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True}, timeout=300)
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        chunks = _sse_chunks(streamed.text)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content
        assert {k: chunks[-1]["selar"][k] for k in SEARCH_FIELDS} == {k: selar[k] for k in SEARCH_FIELDS}
        for bad, message in (({"latentseek_rho": 0}, "rho=0 (0 < rho <= 1)"),
                             ({"latentseek_iterations": 100}, "iterations=100"),
                             ({"n": 2}, "n must be 1"),
                             ({"latentseek_grader": "psrm"}, "only `selar bench` has")):
            refused = httpx.post(url + "/v1/chat/completions", json={**body, **bad}, timeout=60)
            assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.text
        raw = httpx.post(url + "/v1/completions", json={"prompt": QUESTION, "method": "latentseek", "max_tokens": 8},
                         timeout=60)
        assert raw.status_code == 400 and "use /v1/chat/completions" in raw.json()["error"]["message"]
        assert httpx.post(url + "/v1/chat/completions", json={**body, "latentseek_iterations": 0},
                          timeout=300).json()["selar"]["generations"] == 1  # the server still answers after 400s


BENCH = ["bench", "--dataset", "gsm8k", "--limit", "2", "--max-tokens", "16", "--greedy", "--model", MODEL,
         "--n-ctx", "1024", "--no-progress"]


def test_bench_rows_record_the_search_and_the_report_its_mean_generations(tmp_path, model_files):
    out = tmp_path / "seek"
    assert cli_main([*BENCH, "--methods", "cot,latentseek", "--latentseek-iterations", "1",
                     "--latentseek-threshold", "1", "--latentseek-grader", "json", "--out", str(out)]) == 0
    config = read_config(out)
    records = read_results(out / RESULTS_NAME)
    assert sorted((r["method"], r["id"]) for r in records) == sorted(
        (m, p.id) for m in ("cot", "latentseek") for p in load_config_problems(config))
    rt = runtime_for("llama", model_files)
    problems = {p.id: p for p in load_config_problems(config)}
    for record in (r for r in records if r["method"] == "latentseek"):
        problem = problems[record["id"]]
        params = config.decode_params("latentseek", record["seed"])
        found = search(rt, problem.prompt, problem_prompt(rt, problem), params)
        from selar_local.bench.grading import grade

        extracted, correct = grade(found.text, problem.answer, problem.dataset)
        expected = {"text": found.text, "extracted": extracted, "correct": bool(correct),
                    "completion_tokens": len(found.tokens), "prompt_tokens": found.results[0].prompt_tokens,
                    "finish_reason": found.finish_reason, "soft_steps": 0, "error": None,
                    "decoded_tokens": sum(r.completion_tokens for r in found.results) + found.grading_tokens,
                    **found.summary()}
        assert {k: record[k] for k in expected} == expected
        first_extracted, first_correct = grade(found.results[0].content, problem.answer, problem.dataset)
        assert record["first_answer"] == found.results[0].content == found.first_answer
        assert (record["first_extracted"], record["first_correct"]) == (first_extracted, bool(first_correct))
        assert record["iterations"] == 1 and record["generations"] == record["gradings"] == 2
        assert record["params"] == {**params.to_dict(), "stop": []} and record["gold"] == problem.answer
        assert record["wall_seconds"] >= record["decode_seconds"] > 0
    md = bench_report.write_report([out], out, plots=False)
    rows = {row.split("|")[1].strip(): row for row in md.splitlines() if row.startswith("| cot") or
            row.startswith("| latentseek")}
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    column = [c.strip() for c in header.split("|")].index("mean generations")
    assert [c.strip() for c in rows["cot"].split("|")][column] == "1.00"
    assert [c.strip() for c in rows["latentseek"].split("|")][column] == "2.00"
    assert "mean_generations" in (out / "report.csv").read_text().splitlines()[0]
    seeks = [r for r in records if r["method"] == "latentseek"]
    fixed = sum(r["correct"] and not r["first_correct"] for r in seeks)
    broke = sum(r["first_correct"] and not r["correct"] for r in seeks)
    assert (f"latentseek: its first answers {sum(r['first_correct'] for r in seeks)} of 2 right; it revised 2 "
            f"(took a step), turning {fixed} right and {broke} wrong.") in md
    # a search is not voted over samples; alpha ranges need frac and samples
    assert cli_main([*BENCH, "--methods", "latentseek", "--samples", "2", "--parallel", "2", "--out",
                     str(tmp_path / "no")]) == 2
    assert cli_main([*BENCH, "--methods", "cot", "--samples", "2", "--parallel", "2", "--frac-alpha-range",
                     "0,0.15", "--out", str(tmp_path / "no2")]) == 2


def test_bench_frac_alpha_range_draws_and_records_an_alpha_per_sample(tmp_path, model_files, monkeypatch):
    """Sample i of every item draws the same alpha, so the bench decodes one round per alpha
    across the items (the records come sample 0 of both problems, then sample 1), and each
    record is what its sample decodes alone."""
    monkeypatch.setenv("SELAR_CACHE_DIR", str(tmp_path / "cache"))
    rt = runtime_for("llama", model_files, n_parallel=2)
    steering.build(rt, n_pairs=2)
    out = tmp_path / "frac"
    assert cli_main([*BENCH, "--limit", "2", "--methods", "frac", "--samples", "2", "--parallel", "2",
                     "--frac-alpha-range", "0,0.15", "--out", str(out)]) == 0
    records = read_results(out / RESULTS_NAME)
    alphas = steering.alpha_draws((0.0, 0.15), 2, 41)
    problems = load_config_problems(read_config(out))
    assert read_config(out).frac_alpha_range == (0.0, 0.15)
    assert [r["sample"] for r in records] == [0, 0, 1, 1]  # a round per alpha, both items in it
    assert sorted((r["id"], r["sample"], r["params"]["seed"], r["frac_alpha"], r["params"]["frac_alpha"])
                  for r in records) == sorted((p.id, i, 41 + i, alphas[i], alphas[i]) for p in problems for i in (0, 1))
    for record in records:
        problem = next(p for p in problems if p.id == record["id"])
        alone = rt.generate(messages=[{"role": "user", "content": problem.prompt}],
                            params=DecodeParams.from_dict({**read_config(out).params, "method": "frac",
                                                           "seed": record["params"]["seed"],
                                                           "frac_alpha": record["frac_alpha"]}))
        assert (record["text"], record["completion_tokens"], record["finish_reason"]) == (
            alone.text, alone.completion_tokens, alone.finish_reason)
    # Resumed without its last record, the run decodes that one sample again, the same.
    lines = (out / RESULTS_NAME).read_text().splitlines(keepends=True)
    (out / RESULTS_NAME).write_text("".join(lines[:-1]))
    assert cli_main(["bench", "--out", str(out), "--resume", "--parallel", "2", "--no-progress"]) == 0
    again = read_results(out / RESULTS_NAME)
    drop = ("finished_at", "wall_seconds", "prefill_seconds", "decode_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == [
        {k: v for k, v in r.items() if k not in drop} for r in records]
    from selar_local.engine import set_control_vector

    set_control_vector(rt.context, None)  # the shared runtime goes on without the vector
    rt.slots.forget_free()
    assert "frac maj@2" in bench_report.write_report([out], out, plots=False)
    with pytest.raises(InvalidParameterError, match="frac_alpha"):
        steering.alpha_draws((0.0, 1.5), 2, 41)  # past ALPHA_RANGE's 1
    assert cli_main([*BENCH, "--limit", "1", "--methods", "frac", "--samples", "2", "--parallel", "2",
                     "--frac-alpha-range", "0,1.5", "--out", str(tmp_path / "bad")]) == 2


def bench_records(out, count: int, *args: str) -> list[dict]:
    """Run `selar bench` (BENCH and args) into `out`; its `count` records, none an error."""
    assert cli_main([*BENCH, *args, "--out", str(out)]) == 0
    records = read_results(out / RESULTS_NAME)
    assert len(records) == count and all(r["error"] is None for r in records)
    return records


def test_bench_runs_searches_side_by_side_with_the_default_grading(tmp_path):
    """Three searches at once, each grading with four checks at once (three in flight: one per
    slot): nine decodes on a scheduler of three slots and three queue places. They wait for room
    (decode_requests) instead of failing the run with "server busy", which is how the first 1.5B
    run with `checks` ended (16 searches, 16 slots, 16 queue places)."""
    records = bench_records(tmp_path / "side-by-side", 3, "--limit", "3", "--methods", "latentseek", "--parallel", "3",
                            "--latentseek-iterations", "0")
    for record in records:
        assert record["params"]["latentseek_grader"] == DEFAULT_GRADER == "checks"
        assert (record["iterations"], record["generations"], record["gradings"]) == (0, 1, 1)
        assert record["rewards"] == [record["reward"]] and record["reward"] in {round(-k / 6, 6) for k in range(7)}
        assert record["decoded_tokens"] == record["completion_tokens"] + record["grading_tokens"]
        assert record["grading_tokens"] >= 4  # four checks, each at least one token
        # no step taken: the answer is the one the search started from
        assert (record["first_answer"], record["first_extracted"], record["first_correct"]) == (
            record["text"], record["extracted"], record["correct"])


def test_bench_rewards_a_search_by_the_reference_answer_with_psrm(tmp_path):
    """--latentseek-grader psrm: the bench hands each search its problem's reference, so the
    rewards are the grades of the answers (0 right, -1 wrong) and no grading is decoded."""
    records = bench_records(tmp_path / "psrm", 2, "--methods", "latentseek", "--parallel", "2",
                            "--latentseek-iterations", "1", "--latentseek-grader", "psrm")
    for record in records:
        assert record["params"]["latentseek_grader"] == "psrm" and record["grading_tokens"] == 0
        assert record["rewards"][0] == (0.0 if record["first_correct"] else -1.0)
        assert record["rewards"][-1] == (0.0 if record["correct"] else -1.0)
        assert record["iterations"] == (0 if record["first_correct"] else 1)
        assert record["gradings"] == record["generations"] == 1 + record["iterations"]
