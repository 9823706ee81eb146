"""The weighted vote (issue 26): each sample weighs exp(mean log-probability), its per-token
geometric-mean probability; exact cases on hand-made arrays, the bench report's wmaj@K column
from the same rows as maj@K, and the option through the API, the server and `selar run` on
the real SmolLM2 model."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from conftest import runtime_for

from selar_local.bench import report as bench_report
from selar_local.bench.grading import answer_key, extract_answer
from selar_local.bench.runner import CONFIG_NAME, RESULTS_NAME
from selar_local.cli import main as cli_main
from selar_local.errors import InvalidParameterError
from selar_local.params import DecodeParams
from selar_local.runtime import SelfConsistencyResult
from selar_local.vote import VOTES, Vote, majority_vote, vote, weighted_vote

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "A farmer has 17 sheep and buys 5 more. How many sheep does he have?"}]


class TestWeightedVote:
    def test_one_sure_sample_outweighs_two_hesitant_ones(self):
        keys, lps = ["7", "7", "5"], [-1.5, -1.5, -0.05]
        # "7": 2 exp(-1.5) = 0.446 < "5": exp(-0.05) = 0.951
        assert 2 * math.exp(-1.5) < math.exp(-0.05)
        assert majority_vote(keys, lps) == Vote("7", 0, 2, 3, 3)
        assert weighted_vote(keys, lps) == Vote("5", 2, 1, 3, 3)

    def test_a_tie_in_count_is_broken_by_total_weight_not_by_mean_log_probability(self):
        # "a": mean log-prob -0.505 < "b": -0.5, so the majority's tie-break picks "b";
        # weights: "a" exp(-0.01) + exp(-1) = 1.358 > "b" 2 exp(-0.5) = 1.213.
        keys, lps = ["a", "b", "a", "b"], [-0.01, -0.5, -1.0, -0.5]
        assert majority_vote(keys, lps) == Vote("b", 1, 2, 4, 4)
        assert weighted_vote(keys, lps) == Vote("a", 0, 2, 4, 4)

    def test_equal_confidence_counts_as_the_majority(self):
        keys, lps = ["a", "b", "a", "c", "b", "a"], [-0.3] * 6
        assert weighted_vote(keys, lps) == majority_vote(keys, lps) == Vote("a", 0, 3, 6, 6)

    def test_equal_weight_and_count_goes_to_the_answer_seen_first(self):
        assert weighted_vote(["b", "a"], [0.0, 0.0]) == Vote("b", 0, 1, 2, 2)

    def test_missing_answers_do_not_vote(self):
        assert weighted_vote([None, "3", None], [-0.01, -3.0, -0.02]) == Vote("3", 1, 1, 1, 3)
        assert weighted_vote([None, None], [-0.4, -0.2]) == Vote(None, 1, 0, 0, 2)

    def test_the_named_vote_and_bad_input(self):
        keys, lps = ["7", "7", "5"], [-1.5, -1.5, -0.05]
        assert VOTES == ("majority", "weighted")
        assert vote("majority", keys, lps) == majority_vote(keys, lps)
        assert vote("weighted", keys, lps) == weighted_vote(keys, lps)
        with pytest.raises(ValueError, match="unknown vote 'plurality'"):
            vote("plurality", keys, lps)
        with pytest.raises(ValueError, match="one mean log-probability per answer"):
            weighted_vote(["1", "2"], [-0.1])
        with pytest.raises(ValueError):
            weighted_vote([], [])
        assert DecodeParams(vote="weighted").vote == "weighted" and DecodeParams().vote == "majority"
        with pytest.raises(InvalidParameterError, match="invalid vote='plurality': expected one of majority, weighted"):
            DecodeParams(vote="plurality")


# ------------------------------------------------------------------------- bench report


def _record(pid, sample, extracted, correct, logprob):
    return {"id": pid, "dataset": "gsm8k", "method": "cot", "seed": 41, "sample": sample, "gold": "1",
            "extracted": extracted, "correct": correct, "error": None, "completion_tokens": 10,
            "soft_steps": 0, "finish_reason": "stop", "wall_seconds": 1.0, "mean_logprob": logprob}


def _records():
    return [
        # p0: two hesitant wrong "2", one sure right "1": maj wrong, wmaj right
        _record("p0", 0, "2", False, -1.5), _record("p0", 1, "1", True, -0.05), _record("p0", 2, "2", False, -1.5),
        # p2: both right; p3: both wrong (no sample gave an answer)
        _record("p2", 0, "1", True, -0.2), _record("p2", 1, "1", True, -0.9), _record("p2", 2, "4", False, -0.1),
        _record("p3", 0, None, False, -0.2), _record("p3", 1, None, False, -0.1), _record("p3", 2, None, False, -0.3),
    ]


def test_vote_records_carry_the_weighted_vote_of_the_same_samples():
    voted, pass1, passk = bench_report.vote_records(_records(), 3)
    assert [(r["id"], r["correct"], r["weighted_correct"], r["extracted"], r["votes"]) for r in voted] == [
        ("p0", False, True, "2", 2), ("p2", True, True, "1", 2), ("p3", False, False, None, 0)]
    assert pass1 == 3 / 9 and passk == 2 / 3


def test_report_shows_maj_and_wmaj_from_one_run(tmp_path: Path):
    config = {"version": 1, "dataset": "gsm8k", "methods": ["cot"], "seeds": [41], "params": {}, "samples": 3,
              "model": "m", "model_file": "m.gguf", "model_size": 1, "n_ctx": 512, "problems": 3}
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_NAME).write_text(json.dumps(config))
    (run / RESULTS_NAME).write_text("".join(json.dumps(r) + "\n" for r in _records()))
    md = bench_report.write_report([run], tmp_path / "out", plots=False)
    row = next(csv.DictReader(io.StringIO((tmp_path / "out" / "report.csv").read_text())))
    assert (row["method"], row["n"], row["samples"]) == ("cot maj@3", "3", "3")
    assert (row["accuracy"], row["weighted_maj"], row["pass_at_1"], row["pass_at_k"]) == (
        "0.333333", "0.666667", "0.333333", "0.666667")  # the CSV rounds to 6 places
    assert "| pass@1 % | pass@K % | wmaj@K % |" in md and "| cot maj@3 | 3 | 33.3 [6.1, 79.2] | 33.3 | 66.7 | 66.7 |" in md
    assert "wmaj@K is the vote over the same samples" in md
    [entry] = json.loads((tmp_path / "out" / "report.json").read_text())
    assert entry["weighted_maj"] == 2 / 3


# ------------------------------------------------------------------- real model, end to end


@pytest.fixture(scope="module")
def smollm4(model_files):
    return runtime_for("llama", model_files, n_parallel=4)


def _expected(results, kind):
    answers = [extract_answer(r.content, "gsm8k") for r in results]
    return vote(kind, [answer_key(a, "gsm8k") for a in answers], [r.mean_logprob for r in results]), answers


def test_generate_samples_weighs_by_the_samples_own_log_probabilities(smollm4):
    params = DecodeParams(method="cot", max_tokens=40, seed=11, temperature=1.0, vote="weighted")
    voted = smollm4.generate_samples(messages=QUESTION, params=params, samples=4)
    expected, answers = _expected(voted.results, "weighted")
    assert len(voted.results) == 4 and voted.answers == answers
    assert (voted.index, voted.votes, voted.voters) == (expected.index, expected.votes, expected.voters)
    assert voted.answer == (answers[expected.index] if expected.key is not None else None)
    assert all(r.mean_logprob < 0 and r.tokens for r in voted.results)
    # The same samples counted one vote each: what `vote="majority"` gives on them.
    majority = SelfConsistencyResult.from_results(voted.results, "gsm8k", "majority")
    expected_majority, _ = _expected(voted.results, "majority")
    assert (majority.index, majority.votes, majority.voters) == (
        expected_majority.index, expected_majority.votes, expected_majority.voters)


def test_api_and_server_take_the_vote(smollm4):
    from fastapi.testclient import TestClient

    from selar_local.api import Selar
    from selar_local.server import create_app

    llm = Selar(runtime=smollm4)
    try:
        out = llm.create_chat_completion(QUESTION, n=3, max_tokens=30, seed=5, method="cot", vote="weighted",
                                         logprobs=True)
        with TestClient(create_app(llm)) as client:
            bad = client.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "n": 2,
                                                            "max_tokens": 4, "vote": "plurality"})
    finally:
        llm.close()
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "vote" and "majority, weighted" in bad.json()["error"]["message"]
    choices = out["choices"]
    answers = [extract_answer(c["message"]["content"], "gsm8k") for c in choices]
    lps = [sum(t["logprob"] for t in c["logprobs"]["content"]) / len(c["logprobs"]["content"]) for c in choices]
    expected = weighted_vote([answer_key(a, "gsm8k") for a in answers], lps)
    assert out["selar"]["vote"] == {
        "answer": answers[expected.index] if expected.key is not None else None, "votes": expected.votes,
        "voters": expected.voters, "choice_index": expected.index, "answers": answers, "vote": "weighted"}


def test_run_cli_votes_weighted_and_refuses_a_vote_without_samples(capsys, smollm_path):
    code = cli_main(["run", "--model", MODEL, "--samples", "3", "--max-tokens", "24", "--threads", "2",
                     "--method", "cot", "--vote", "weighted", "What is 17 + 5?"])
    err = capsys.readouterr().err
    assert code == 0 and err.count("[sample ") == 3 and "[cot x 3] weighted answer" in err
    assert cli_main(["run", "--model", MODEL, "--vote", "weighted", "What is 17 + 5?"]) == 2
    assert "--vote weighted counts the answers of --samples K >= 2" in capsys.readouterr().err
