"""Latent self-consistency: the vote (exact, hand-made), its report rows, and K samples decoded
together on the real SmolLM2 model from the API, the CLI, the server schema and the benchmark;
plus the new methods and options end to end (swir, soft noise, --tau auto)."""
from __future__ import annotations

import csv
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import runtime_for, store_calibration

from selar_local.bench import report as bench_report
from selar_local.bench.grading import answer_key
from selar_local.bench.runner import CONFIG_NAME, RESULTS_NAME, read_config, read_results
from selar_local.cli import main as cli_main
from selar_local.params import DecodeParams
from selar_local.vote import Vote, majority_vote, sample_seeds

MODEL = "smollm2-135m-instruct"


class TestVote:
    def test_majority_wins_and_the_most_confident_of_it_is_shown(self):
        assert majority_vote(["7", "5", "7", "7", "5"], [-0.9, -0.1, -0.5, -0.7, -0.2]) == Vote("7", 2, 3, 5, 5)

    def test_tie_goes_to_the_more_confident_answer(self):
        # "5": mean of -0.1 and -0.3 = -0.2 beats "7": mean of -0.05 and -0.55 = -0.3
        assert majority_vote(["7", "5", "7", "5"], [-0.05, -0.1, -0.55, -0.3]) == Vote("5", 1, 2, 4, 4)

    def test_full_tie_goes_to_the_answer_seen_first(self):
        assert majority_vote(["b", "a"], [-0.5, -0.5]).key == "b"

    def test_missing_answers_do_not_vote(self):
        assert majority_vote([None, None, "3"], [-0.1, -0.1, -2.0]) == Vote("3", 2, 1, 1, 3)
        assert majority_vote([None, None], [-0.4, -0.2]) == Vote(None, 1, 0, 0, 2)

    def test_one_sample_is_its_own_answer(self):
        assert majority_vote(["42"], [-1.0]) == Vote("42", 0, 1, 1, 1)
        assert sample_seeds(41, 1) == [41] and sample_seeds(41, 3) == [41, 42, 43]

    def test_bad_input(self):
        with pytest.raises(ValueError):
            majority_vote(["1"], [])

    def test_equal_answers_share_a_key(self):
        assert answer_key("$1,000.00", "gsm8k") == answer_key("1000", "gsm8k") == "1000"
        assert answer_key("18 dollars", "gsm8k") == "18"
        assert answer_key("(c)", "gpqa_diamond") == "C"
        assert answer_key("\\dfrac{1}{2}", "math500") == answer_key("\\frac{1}{2}", "math500")
        assert answer_key("", "gsm8k") is None and answer_key(None, "gsm8k") is None


def _record(pid, method, seed, sample, extracted, correct, logprob, tokens=10):
    return {"id": pid, "dataset": "gsm8k", "method": method, "seed": seed, "sample": sample, "gold": "1",
            "extracted": extracted, "correct": correct, "error": None, "completion_tokens": tokens,
            "soft_steps": 1, "finish_reason": "stop", "wall_seconds": 1.0, "mean_logprob": logprob}


def test_vote_records_pass_at_1_maj_and_pass_at_k():
    records = [
        # p1: 2 of 3 right -> maj right
        _record("p1", "cot", 41, 0, "1", True, -0.2), _record("p1", "cot", 41, 1, "2", False, -0.1),
        _record("p1", "cot", 41, 2, "1.0", True, -0.3),
        # p2: one right, two wrong and different, tie 1-1-1 -> the most confident ("3", wrong)
        _record("p2", "cot", 41, 0, "1", True, -0.9), _record("p2", "cot", 41, 1, "3", False, -0.1),
        _record("p2", "cot", 41, 2, "4", False, -0.5),
        # p3: incomplete group (killed while writing): left out
        _record("p3", "cot", 41, 0, "1", True, -0.1),
    ]
    voted, pass1, passk = bench_report.vote_records(records, 3)
    assert [(r["id"], r["correct"], r["extracted"], r["votes"]) for r in voted] == [
        ("p1", True, "1", 2), ("p2", False, "3", 1)]
    assert voted[0]["completion_tokens"] == 30
    assert pass1 == 3 / 6 and passk == 1.0


def _write_run(folder: Path, config: dict, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    (folder / RESULTS_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_report_pairs_maj_at_k_with_single_sample_cot(tmp_path):
    base = {"version": 1, "dataset": "gsm8k", "methods": ["cot"], "seeds": [41], "params": {},
            "model": "m", "model_file": "m.gguf", "model_size": 1, "n_ctx": 512, "problems": 4}
    single = [dict(_record(f"p{i}", "cot", 41, 0, "1" if ok else "2", ok, -0.1), sample=None)
              for i, ok in enumerate([True, False, False, True])]
    for r in single:
        del r["sample"]
    k3 = []
    for i, answers in enumerate([["1", "1", "2"], ["1", "2", "1"], ["2", "2", "1"], ["1", "2", "2"]]):
        k3 += [_record(f"p{i}", "cot", 41, j, a, a == "1", -0.1) for j, a in enumerate(answers)]
    one = _write_run(tmp_path / "one", base, single)
    many = _write_run(tmp_path / "many", {**base, "samples": 3}, k3)
    bench_report.write_report([one, many], tmp_path / "out", plots=False)
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((tmp_path / "out" / "report.csv").read_text()))}
    maj = rows["cot maj@3"]
    assert maj["n"] == "4" and float(maj["accuracy"]) == 0.5      # p0, p1 voted right
    assert float(maj["pass_at_1"]) == 0.5 and float(maj["pass_at_k"]) == 1.0
    # paired with single-sample cot (right on p0, p3): maj only p1, cot only p3
    assert (maj["method_only"], maj["baseline_only"], maj["samples"]) == ("1", "1", "3")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "pass@1 %" in md and "| cot maj@3 | 4 | 50.0" in md


def test_report_votes_at_fewer_samples_uses_the_first_k(tmp_path):
    """--votes-at k: the vote of each group's first k samples (by sample index), its own row
    with k generations, paired with single-sample cot like maj@K."""
    base = {"version": 1, "dataset": "gsm8k", "methods": ["cot"], "seeds": [41], "params": {},
            "model": "m", "model_file": "m.gguf", "model_size": 1, "n_ctx": 512, "problems": 3}
    single = [_record(f"p{i}", "cot", 41, 0, "1" if ok else "2", ok, -0.1) for i, ok in enumerate([True, False, True])]
    for r in single:
        del r["sample"]
    k3 = []
    # first two samples: p0 tie "1"/"2" -> the more confident "2"; p1 "1","1"; p2 "2","2"
    for i, (answers, logprobs) in enumerate([(["1", "2", "1"], [-0.5, -0.1, -0.1]),
                                             (["1", "1", "2"], [-0.1, -0.1, -0.1]),
                                             (["2", "2", "1"], [-0.1, -0.1, -0.1])]):
        k3 += [_record(f"p{i}", "cot", 41, j, a, a == "1", lp, tokens=10 + j) for j, (a, lp) in
               enumerate(zip(answers, logprobs))]
    one = _write_run(tmp_path / "one", base, single)
    many = _write_run(tmp_path / "many", {**base, "samples": 3}, list(reversed(k3)))  # file order does not matter
    bench_report.write_report([one, many], tmp_path / "out", plots=False, votes_at=[1, 2, 3, 7])
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((tmp_path / "out" / "report.csv").read_text()))}
    assert sorted(rows) == ["cot", "cot maj@1 of 3", "cot maj@2 of 3", "cot maj@3"]  # no row at k >= K
    two = rows["cot maj@2 of 3"]
    assert (two["n"], two["correct"], two["samples"], two["mean_generations"]) == ("3", "1", "2", "2.0")
    assert float(two["pass_at_1"]) == 3 / 6
    assert float(two["pass_at_k"]) == pytest.approx(2 / 3, abs=5e-7)  # the CSV keeps 6 decimals
    assert float(two["mean_tokens"]) == 21.0  # samples 0 and 1: 10 + 11 tokens
    assert (two["method_only"], two["baseline_only"]) == ("1", "2")  # right on p1 only; cot on p0, p2
    first = rows["cot maj@1 of 3"]
    assert (first["correct"], first["samples"], first["mean_generations"], first["mean_tokens"]) == ("2", "1", "1.0", "10.0")
    assert (first["method_only"], first["baseline_only"]) == ("1", "1")
    assert rows["cot maj@3"]["correct"] == "2"  # p0 and p1
    assert cli_main(["bench", "report", str(many), "--no-plots", "--votes-at", "0"]) == 2
    assert cli_main(["bench", "report", str(many), "--no-plots", "--votes-at", "two"]) == 2
    assert cli_main(["bench", "report", str(many), "--no-plots", "--votes-at", "2"]) == 0


# ------------------------------------------------------------------- real model, end to end


@pytest.fixture(scope="module")
def smollm4(model_files):
    return runtime_for("llama", model_files, n_parallel=4)


QUESTION = [{"role": "user", "content": "A farmer has 17 sheep and buys 5 more. How many sheep does he have?"}]


def test_generate_samples_decodes_k_seeds_and_votes(smollm4):
    params = DecodeParams(method="selar", max_tokens=40, seed=7)
    vote = smollm4.generate_samples(messages=QUESTION, params=params, samples=3)
    assert len(vote.results) == 3 and len(vote.answers) == 3
    singles = [smollm4.generate(messages=QUESTION, params=params.replace(seed=s)) for s in (7, 8, 9)]
    # K = 1 reduces exactly: a group of one is the single decode
    one = smollm4.generate_samples(messages=QUESTION, params=params, samples=1)
    assert one.results[0].tokens == singles[0].tokens and one.index == 0
    keys = [answer_key(a, "gsm8k") for a in vote.answers]
    expected = majority_vote(keys, [r.mean_logprob for r in vote.results])
    assert (vote.index, vote.votes) == (expected.index, expected.votes)
    assert all(r.mean_logprob <= 0 for r in vote.results)
    with pytest.raises(Exception, match="samples"):
        smollm4.generate_samples(messages=QUESTION, params=params, samples=5)


def test_generate_samples_sums_the_log_probabilities_of_every_token(smollm4):
    """Sequences decoded together (SmolLM2's 49k vocabulary: the batch-wide step) carry the
    log-probability of each shown token: logprob_sum is the sum of the per-token figures,
    which were 0 on that path (every mean_logprob 0.0, the tie-break comparing zeros)."""
    for method, greedy in (("selar", False), ("cot", True)):
        params = DecodeParams(method=method, greedy=greedy, max_tokens=24, seed=3, logprobs=0)
        vote = smollm4.generate_samples(messages=QUESTION, params=params, samples=3)
        for r in vote.results:
            per_token = [lp for lp, _ in r.logprobs]
            assert len(per_token) == len(r.tokens) and all(lp <= 0 for lp in per_token)
            assert r.logprob_sum == sum(per_token) and r.mean_logprob < 0


def test_run_samples_cli(capsys, smollm_path):
    code = cli_main(["run", "--model", MODEL, "--samples", "3", "--max-tokens", "30", "--threads", "2",
                     "--method", "swir", "--swir-window", "4", "What is 17 + 5?"])
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("[sample ") == 3 and "[swir x 3] majority answer" in err


def test_server_n_reports_the_vote(smollm4):
    from selar_local.api import Selar

    llm = Selar(runtime=smollm4)
    try:
        out = llm.create_chat_completion(QUESTION, n=3, max_tokens=30, seed=5, method="soft", soft_noise="gumbel")
        chunks = list(llm.create_chat_completion(QUESTION, n=2, max_tokens=20, seed=5, method="swir", stream=True))
    finally:
        llm.close()
    vote = out["selar"]["vote"]
    assert len(out["choices"]) == 3 and len(vote["answers"]) == 3
    assert 0 <= vote["choice_index"] < 3 and vote["votes"] <= vote["voters"] <= 3
    assert [c["seed"] for c in out["selar"]["choices"]] == [5, 6, 7]
    streamed_votes = [c["selar"]["vote"] for c in chunks if "vote" in c.get("selar", {})]
    assert len(streamed_votes) == 1 and chunks[-1]["choices"] == [] and len(streamed_votes[0]["answers"]) == 2


BENCH = ["bench", "--dataset", "gsm8k", "--limit", "2", "--max-tokens", "30", "--model", MODEL,
         "--n-ctx", "512", "--no-progress", "--threads", "2"]


def test_bench_samples_writes_k_records_and_resumes(tmp_path):
    out = tmp_path / "maj"
    assert cli_main([*BENCH, "--methods", "cot,swir", "--samples", "3", "--parallel", "3", "--out", str(out)]) == 0
    records = read_results(out / RESULTS_NAME)
    assert len(records) == 2 * 2 * 3
    assert sorted({(r["sample"], r["params"]["seed"]) for r in records}) == [(0, 41), (1, 42), (2, 43)]
    assert all(r["seed"] == 41 and "mean_logprob" in r for r in records)
    assert read_config(out).samples == 3
    # resume: nothing left to do, nothing duplicated
    assert cli_main(["bench", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert len(read_results(out / RESULTS_NAME)) == 12
    md = bench_report.write_report([out], out, plots=False)
    assert "cot maj@3" in md and "swir maj@3" in md
    assert "2 problems x 2 methods x 1 seed(s) (41) x 3 samples; 12/12 items done" in md
    assert cli_main([*BENCH, "--methods", "cot", "--samples", "3", "--parallel", "2", "--out",
                     str(tmp_path / "x")]) == 2


def test_bench_new_methods_and_tau_auto(tmp_path, monkeypatch):
    """swir, moi and soft with Gumbel noise from the benchmark; --tau auto records the calibrated tau."""
    from selar_local import calibrate as cal

    monkeypatch.setattr(cal, "cache_file", lambda sha, settings: tmp_path / f"cal-{sha[:8]}.json")
    full = cal.calibrate
    monkeypatch.setattr(cal, "calibrate", lambda runtime, params, **kw: full(runtime, params, max_tokens=48))
    out = tmp_path / "auto"
    assert cli_main([*BENCH, "--methods", "selar,swir,soft", "--tau", "auto", "--soft-noise", "gumbel",
                     "--parallel", "4", "--out", str(out)]) == 0
    config = read_config(out)
    calibration = json.loads(next(tmp_path.glob("cal-*.json")).read_text())
    assert config.tau_auto and config.params["tau"] == calibration["tau"]
    assert config.params["soft_noise"] == "gumbel"
    records = read_results(out / RESULTS_NAME)
    assert {r["method"] for r in records} == {"selar", "swir", "soft"}
    assert all(r["params"]["tau"] == calibration["tau"] for r in records)
    assert any(r["soft_steps"] for r in records if r["method"] == "swir")
    md = bench_report.write_report([out], out, plots=False)
    assert f"tau {calibration['tau']} (auto: calibrated)" in md
    # A later calibration (another rule, another cache) does not change the run on --resume:
    # it goes on with the tau it started with instead of refusing a "different" config.
    cal_file = next(tmp_path.glob("cal-*.json"))
    cal_file.write_text(json.dumps({**calibration, "tau": round(calibration["tau"] / 2 + 0.01, 2)}))
    assert cli_main([*BENCH, "--methods", "selar,swir,soft", "--tau", "auto", "--soft-noise", "gumbel",
                     "--parallel", "4", "--out", str(out), "--resume"]) == 0
    assert read_config(out).params["tau"] == calibration["tau"]


def test_http_server_runs_the_new_methods_and_tau_auto(smollm4, tmp_path, monkeypatch):
    """POST /v1/chat/completions with swir, Stochastic Soft Thinking, n > 1 (the vote) and
    tau "auto" (calibrated through the scheduler on first use, once, then read from the cache)."""
    from fastapi.testclient import TestClient

    from selar_local import calibrate as cal
    from selar_local.api import Selar
    from selar_local.server import create_app

    monkeypatch.setattr(cal, "cache_file", lambda sha, settings: tmp_path / f"{sha}-{settings['temperature']}.json")
    calibrations = []
    real_calibrate = cal.calibrate
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: calibrations.append(k) or real_calibrate(*a, **k))
    llm = Selar(runtime=smollm4, calibration_max_tokens=32)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 20, "seed": 3}
    try:
        with TestClient(create_app(llm)) as client:
            swir = client.post("/v1/chat/completions", json={**body, "method": "swir", "swir_window": 4}).json()
            assert swir["selar"]["method"] == "swir" and swir["choices"][0]["message"]["content"]
            noisy = client.post("/v1/chat/completions", json={**body, "method": "selar", "soft_noise": "dirichlet",
                                                                "dirichlet_alpha": 2.0, "n": 2}).json()
            assert len(noisy["choices"]) == 2 and len(noisy["selar"]["vote"]["answers"]) == 2
            with client.stream("POST", "/v1/chat/completions", json={**body, "n": 2, "stream": True}) as streamed:
                events = [json.loads(line[6:]) for line in streamed.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            votes = [e["selar"]["vote"] for e in events if "vote" in e.get("selar", {})]
            assert len(votes) == 1 and len(votes[0]["answers"]) == 2 and events[-1]["selar"]["vote"] == votes[0]
            bad = client.post("/v1/chat/completions", json={**body, "soft_noise": "uniform"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "soft_noise"
            # Not calibrated yet: the first request calibrates (as requests of the scheduler) while a
            # second one waits for it; both get the calibrated tau, and the next reads the cache.
            with ThreadPoolExecutor(2) as pool:
                first = list(pool.map(lambda _: llm.create_chat_completion(QUESTION, max_tokens=8, seed=3, tau="auto"),
                                      range(2)))
            cached = list(tmp_path.glob("*.json"))
            assert len(cached) == 1
            stored = json.loads(cached[0].read_text())
            assert len(calibrations) == 1 and calibrations[0]["max_tokens"] == 32 and stored["steps"] > 0
            assert [r["selar"]["tau"] for r in first] == [stored["tau"]] * 2
            auto = client.post("/v1/chat/completions", json={**body, "tau": "auto"}).json()
            assert auto["selar"]["tau"] == stored["tau"] and len(calibrations) == 1
            # A calibration of another sampler is its own (here one stored by hand).
            store_calibration(smollm4.model_path, 0.37, DecodeParams(temperature=0.9))
            hot = client.post("/v1/chat/completions", json={**body, "tau": "auto", "temperature": 0.9}).json()
            assert hot["selar"]["tau"] == 0.37 and len(calibrations) == 1
    finally:
        llm.close()


def test_run_cli_new_methods(capsys, tmp_path, monkeypatch, smollm_path):
    """`selar run` streams swir (with a trace) and noisy soft thinking, and resolves --tau auto."""
    from selar_local import calibrate as cal

    trace = tmp_path / "t.jsonl"
    common = ["run", "--model", MODEL, "--max-tokens", "24", "--threads", "2", "What is 17 + 5?"]
    assert cli_main([*common, "--method", "swir", "--swir-window", "4", "--trace", str(trace)]) == 0
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert steps and steps[0]["soft"]  # SwiReasoning starts latent
    assert cli_main([*common, "--method", "soft", "--soft-noise", "gumbel", "--gumbel-tau", "0.3"]) == 0
    assert "[soft]" in capsys.readouterr().err
    monkeypatch.setattr(cal, "cache_file", lambda sha, settings: tmp_path / "cal.json")
    full = cal.calibrate
    monkeypatch.setattr(cal, "calibrate", lambda runtime, params, **kw: full(runtime, params, max_tokens=32))
    assert cli_main([*common, "--method", "selar", "--tau", "auto"]) == 0
    tau = json.loads((tmp_path / "cal.json").read_text())["tau"]
    assert f"[tau auto] {tau:.2f}" in capsys.readouterr().err


def test_tau_argument_rejects_words():
    with pytest.raises(SystemExit):
        cli_main(["run", "--tau", "often", "x"])
