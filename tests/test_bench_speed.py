"""Plumbing of `selar bench-speed` (no speed assertions: it is a benchmark, not a test)."""
from __future__ import annotations

from selar_local.cli import main


def test_quick_bench_speed_prints_and_writes_the_tables(tmp_path, capsys, smollm_path):
    out = tmp_path / "speed.md"
    assert main(["bench-speed", "--quick", "--only", "speed,host", "--markdown", str(out)]) == 0
    printed = capsys.readouterr().out
    for heading in ("## Decode speed", "bare loop", "Llama (high-level)", "selar-local selar sampled",
                    "## Per-step host overhead", "right after a real llama_decode", "| top-k select |",
                    "load average"):
        assert heading in printed
    assert out.read_text(encoding="utf-8").strip() == printed.strip()


def test_interrupted_run_resumes_from_the_next_model(tmp_path, capsys, smollm_path):
    """Ctrl-C during the second model keeps the first one's figures; --resume measures only
    the second (the first model's entry comes back byte for byte, not re-measured)."""
    import json

    import pytest

    from selar_local import speed

    checkpoint = tmp_path / "speed.json"
    first, second = "smollm2-135m-instruct", str(smollm_path)  # the same file under two names

    def interrupt_on_second(message: str) -> None:
        if message.startswith(f"[{second}]"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        speed.run((first, second), quick=True, n_new=16, reps=2, sections=("speed",),
                  json_out=str(checkpoint), log=interrupt_on_second)
    saved = json.loads(checkpoint.read_text(encoding="utf-8"))
    assert [m["name"] for m in saved["models"]] == [first]

    args = ["bench-speed", "--quick", "--only", "speed", "--models", f"{first},{second}", "--json", str(checkpoint)]
    assert main(args + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert f"[{first}] already measured" in captured.err
    assert f"[{second}] decode speed" in captured.err
    resumed = json.loads(checkpoint.read_text(encoding="utf-8"))
    assert [m["name"] for m in resumed["models"]] == [first, second]
    assert resumed["models"][0] == saved["models"][0]
    assert f"| {second} |" in captured.out and f"| {first} |" in captured.out

    with pytest.raises(SystemExit, match=r"--resume refused: .*new_tokens: 16 \(saved\) vs 8 \(now\)"):
        main(args + ["--resume", "--tokens", "8"])
