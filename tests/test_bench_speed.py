"""Plumbing of `selar bench-speed` (no speed assertions: it is a benchmark, not a test)."""
from __future__ import annotations

from selar_local.cli import main


def test_quick_bench_speed_prints_and_writes_the_tables(tmp_path, capsys, smollm_path):
    out = tmp_path / "speed.md"
    assert main(["bench-speed", "--quick", "--only", "speed,host", "--markdown", str(out)]) == 0
    printed = capsys.readouterr().out
    for heading in ("## Decode speed", "bare loop", "Llama (high-level)", "selar-local selar sampled",
                    "## Per-step host overhead", "load average"):
        assert heading in printed
    assert out.read_text(encoding="utf-8").strip() == printed.strip()
