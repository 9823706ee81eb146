"""The `selar` command line, run as users run it (a subprocess), on the default model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def selar(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selar_local.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_run_streams_answer_and_writes_trace(tmp_path, smollm_path):
    trace = tmp_path / "trace.jsonl"
    done = selar("run", "--model", str(smollm_path), "--method", "selar", "--tau", "0.5", "--max-tokens", "48",
                 "--trace", str(trace), QUESTION)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert 1 <= len(records) <= 48
    # The streamed text is exactly the concatenation of the shown tokens.
    assert done.stdout.strip() == "".join(r["text"] for r in records if "finish_reason" not in r).strip()
    soft = [r for r in records if r["soft"]]
    assert soft, "expected the gate to open at least once on a 135M model"
    for r in records:
        assert set(r) >= {"index", "token", "text", "soft", "entropy", "top_ids", "top_probs"}
        if r["soft"]:
            # Each weight is rounded to 6 decimals in the trace: k weights can sum to 1 +- k * 0.5e-6.
            weights = r["mix_weights"]
            assert r["entropy"] >= 0.5 and abs(sum(weights) - 1) <= len(weights) * 0.5e-6 + 1e-12
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith("[selar]") and f"{len(soft)} soft steps" in summary and "tokens/s" in summary
    assert summary.endswith("seed 41")  # the published default, printed so the run can be replayed


def test_cot_never_soft(tmp_path, smollm_path):
    trace = tmp_path / "trace.jsonl"
    done = selar("run", "--model", str(smollm_path), "--method", "cot", "--max-tokens", "16", "--trace", str(trace),
                 QUESTION)
    assert done.returncode == 0, done.stderr
    assert not any(json.loads(line)["soft"] for line in trace.read_text().splitlines())
    assert ", 0 soft steps" in done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tau", "-1"], "invalid tau=-1.0"),
        (["--ks", "1"], "invalid ks=1"),
        (["--ks", "1000"], "invalid ks=1000: expected an integer in [2, 64]"),
        (["--lam", "-2"], "invalid lam=-2.0"),
        (["--model", "/nonexistent/model.gguf"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    done = selar("run", *args, "hello")
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text("hello")
    done = selar("run", "--model", str(bogus), "hello")
    assert done.returncode == 2 and "not a GGUF file" in done.stderr
