"""`selar doctor`: build, model facts, self-check, verdict and exit code."""
from __future__ import annotations

from selar_local import runtime as runtime_module
from selar_local.cli import main


def test_doctor_reports_and_passes_on_llama(smollm_path, capsys):
    assert main(["doctor", "--model", str(smollm_path)]) == 0
    out = capsys.readouterr().out
    assert "llama-cpp-python 0.3.36" in out and "CPU" in out
    assert "architecture      llama" in out and "n_vocab=49152" in out
    assert "token_embd.weight Q8_0" in out and "input scale 1" in out
    assert "self-check        PASS: max |logit diff| = 0" in out
    assert out.strip().splitlines()[-1].startswith("VERDICT: OK")


def test_doctor_exits_1_when_soft_decoding_is_unsupported(smollm_path, capsys, monkeypatch):
    monkeypatch.setitem(runtime_module.EMBEDDING_INPUT_UNSUPPORTED, "llama", "pretend: no embedding inputs")
    assert main(["doctor", "--model", str(smollm_path)]) == 1
    out = capsys.readouterr().out
    assert "self-check        FAIL" in out
    assert out.strip().splitlines()[-1].startswith("VERDICT: NOT SUPPORTED") and "only --method cot" in out


def test_doctor_exits_1_for_a_missing_model(tmp_path, capsys):
    assert main(["doctor", "--model", str(tmp_path / "missing.gguf")]) == 1
    assert "VERDICT: FAIL" in capsys.readouterr().out


def test_doctor_shows_the_threads_used(smollm_path, capsys):
    import os

    assert main(["doctor", "--model", str(smollm_path), "--threads", "1", "--threads-batch", "3",
                 "--prefill-chunk", "48"]) == 0
    out = capsys.readouterr().out
    assert "threads           1 for decoding, 3 for prompts" in out and "prompt chunk 48 tokens" in out
    assert main(["doctor", "--model", str(smollm_path)]) == 0  # default: every CPU for prompts
    cpus = len(os.sched_getaffinity(0))
    assert f"{max(1, cpus // 2)} for decoding, {cpus} for prompts ({cpus} CPUs available)" in capsys.readouterr().out
    assert main(["doctor", "--model", str(smollm_path), "--threads-batch", "0"]) == 2
