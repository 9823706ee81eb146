"""A calibration reports how far it is: the callback's counts (prompts done of all, tokens),
driven by a real calibration on SmolLM2; the server logs it and /health shows it while it runs."""
from __future__ import annotations

import logging

from selar_local import calibrate as cal
from selar_local.api import Selar


def test_a_real_calibration_reports_each_prompt_and_its_tokens(smollm):
    states: list[cal.CalibrationProgress] = []
    calibration = cal.calibrate(smollm, max_tokens=8, progress=states.append)
    total = len(cal.CALIBRATION_PROMPTS)
    assert states[0] == cal.CalibrationProgress(0, total, 0)
    assert [s.prompts_done for s in states] == list(range(total + 1))
    assert all(s.prompts_total == total for s in states)
    tokens = [s.tokens for s in states]
    assert tokens == sorted(tokens) and all(1 <= b - a <= 8 for a, b in zip(tokens, tokens[1:]))
    assert tokens[-1] == calibration.steps  # one entropy per decoded token


def test_the_server_logs_a_calibration_and_health_shows_it_running(smollm, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SELAR_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached: it calibrates
    selar = Selar(runtime=smollm, queue_size=4, calibration_max_tokens=8)
    seen: list = []
    real = selar._calibration_progress

    def watch(state):  # what /health reads, after each report
        real(state)
        seen.append(selar.calibration)

    monkeypatch.setattr(selar, "_calibration_progress", watch)
    try:
        with caplog.at_level(logging.INFO, logger="selar_local.api"):
            tau = selar._auto_tau(smollm.default_params())
    finally:
        selar.scheduler.close()
    total = len(cal.CALIBRATION_PROMPTS)
    assert [s["prompts_done"] for s in seen] == list(range(total + 1))
    assert all(s["prompts_total"] == total for s in seen) and seen[0]["tokens"] == 0
    assert selar.calibration is None  # over: /health says none is running
    messages = [r.getMessage() for r in caplog.records if r.name == "selar_local.api"]
    assert messages[0] == f"calibrating tau for {selar.model_id}: {total} prompts (requests asking for tau auto wait)"
    assert messages[-1].startswith(f"calibration of tau done: tau {tau:.2f}")
    assert sum(m.startswith("calibrating tau: ") for m in messages) == total
