"""`--tau auto`: the threshold choice on hand-made entropies, the cache, and `selar calibrate` on
the three real test models (each must land inside the 6-14% soft-share band)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selar_local import calibrate as cal
from selar_local.params import DecodeParams

ROOT = Path(__file__).resolve().parents[1]


def test_a_threshold_under_every_uncertain_step_is_not_taken():
    # 870 confident steps (h = 0) and 130 spread evenly over [0.2, 0.9). Every tau in the empty
    # gap (0, 0.2) gates 13%, inside the band, but gates on whether a second token survived the
    # filter, not on entropy. tau must keep 20% of the uncertain steps discrete; the density is
    # even, so the share nearest 10% wins: 100 steps have h >= 0.36.
    h = np.concatenate([np.zeros(870), np.linspace(0.2, 0.9, 130, endpoint=False)])
    tau, share, in_band = cal.choose_tau(h, np.ones_like(h, dtype=bool))
    assert (tau, share, in_band) == (0.36, 0.1, True)


def test_an_empty_valley_between_two_modes_gives_its_middle():
    # 850 confident steps, 60 in a low mode [0.1, 0.3) and 90 in a high one [0.6, 0.9). The
    # smoothed density is 0 for tau in [0.32, 0.57], every one of them gating 9%: the middle.
    h = np.concatenate([np.zeros(850), np.linspace(0.1, 0.3, 60, endpoint=False),
                        np.linspace(0.6, 0.9, 90, endpoint=False)])
    tau, share, in_band = cal.choose_tau(h, np.ones_like(h, dtype=bool))
    assert (tau, share, in_band) == (0.44, 0.09, True)


def test_a_density_rising_through_the_band_takes_the_share_nearest_ten_percent():
    # 300 uncertain steps with density 2h (Gemma 3's shape): the lowest density in the band is
    # at its 14% edge, but the densities across the band differ by less than their noise, and
    # a threshold at the edge falls outside the band on the next prompts. share = 0.3 (1 - t^2).
    h = np.concatenate([np.zeros(700), np.sqrt(np.linspace(0.0, 1.0, 302)[1:-1])])
    tau, share, in_band = cal.choose_tau(h, np.ones_like(h, dtype=bool))
    assert in_band and abs(share - 0.10) <= 0.005 and tau == 0.82


def test_math_symbols_do_not_count_as_soft():
    h = np.concatenate([np.zeros(800), np.full(200, 0.8)])
    eligible = np.ones(1000, dtype=bool)
    assert cal.soft_share(h, eligible, 0.5) == 0.2
    eligible[800:900] = False  # half the uncertain steps are digits: SeLaR keeps them discrete
    assert cal.soft_share(h, eligible, 0.5) == 0.1
    tau, share, in_band = cal.choose_tau(h, eligible)
    assert share == 0.1 and in_band and tau <= 0.8


def test_uniform_entropies_land_in_the_band():
    h = np.linspace(0.0, 1.0, 1001)
    tau, share, in_band = cal.choose_tau(h, np.ones_like(h, dtype=bool))
    assert in_band and cal.SOFT_SHARE_BAND[0] <= share <= cal.SOFT_SHARE_BAND[1]
    assert share == pytest.approx(1.0 - tau, abs=0.002)


def test_no_uncertain_steps_is_reported_out_of_band():
    h = np.zeros(100)
    tau, share, in_band = cal.choose_tau(h, np.ones(100, dtype=bool))
    assert share == 0.0 and not in_band


def test_empty_input_is_an_error():
    with pytest.raises(cal.CalibrationError):
        cal.choose_tau([], [])


def test_cache_round_trip_is_keyed_by_model_and_sampler(tmp_path, monkeypatch):
    monkeypatch.setattr(cal, "cache_file", lambda sha, settings: tmp_path / f"{sha}-{settings['top_k']}.json")
    settings = cal.sampler_settings(DecodeParams())
    stored = cal.Calibration(tau=0.42, soft_share=0.1, in_band=True, steps=10, histogram=[1] * cal.BINS,
                             model_sha256="abc", model_file="m.gguf", settings=settings, prompts=2)
    cal.store(stored)
    assert cal.load_cached("abc", settings) == stored
    assert cal.load_cached("abc", cal.sampler_settings(DecodeParams(top_k=40))) is None
    assert cal.load_cached("other", settings) is None


def test_histogram_render_marks_tau():
    c = cal.Calibration(tau=0.43, soft_share=0.1, in_band=True, steps=3, histogram=[1] * cal.BINS)
    lines = cal.render_histogram(c).splitlines()
    assert len(lines) == cal.BINS and lines[21].startswith("0.42-0.44") and lines[21].endswith("<- tau")


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_selar_calibrate_on_real_models(arch, model_files, tmp_path):
    """The CLI on each test model: a tau, a soft share inside the band, a cached JSON and a PNG."""
    env = {**os.environ, "SELAR_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    plot = tmp_path / "h.png"
    cmd = [sys.executable, "-m", "selar_local.cli", "calibrate", "--model", str(model_files[arch]), "--threads", "2",
           "--max-tokens", "64", "--parallel", "8", "--plot", str(plot), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["in_band"] and 0.06 <= result["soft_share"] <= 0.14
    assert 0 < result["tau"] <= 1 and result["steps"] == sum(result["histogram"])
    assert "inside the 6-14% band" in out.stderr
    lo, hi = result["tau_spread"]
    assert 0 < lo <= hi <= 1 and "tau with the prompts resampled" in out.stderr
    assert plot.stat().st_size > 0
    cached = list((tmp_path / "cache" / "calibration").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["tau"] == result["tau"]
    # A second call reads the cache (same answer, no decoding needed).
    again = subprocess.run(cmd[:-3] + ["--json"], capture_output=True, text=True, env=env, timeout=900)
    assert json.loads(again.stdout) == result


def test_a_sampler_that_leaves_one_candidate_says_why_no_tau_reaches_the_band():
    # 96% of the steps keep one candidate after top-p (h = 0): at most 4% can ever be soft.
    h = np.concatenate([np.zeros(960), np.full(40, 0.5)])
    ok = np.ones(1000, dtype=bool)
    assert cal.reachable_share(h, ok) == 0.04
    tau, share, in_band = cal.choose_tau(h, ok)
    c = cal.Calibration(tau=tau, soft_share=share, in_band=in_band, steps=1000, histogram=cal.histogram(h),
                        max_share=cal.reachable_share(h, ok), settings=cal.sampler_settings(DecodeParams()))
    assert (share, in_band) == (0.04, False)
    reason = cal.out_of_band_reason(c)
    assert "only 4.0% of the steps keep a second candidate" in reason and "top-p 0.95" in reason
    spread = np.linspace(0.0, 1.0, 1001)
    tau, share, in_band = cal.choose_tau(spread, np.ones(1001, dtype=bool))
    assert cal.out_of_band_reason(cal.Calibration(tau=tau, soft_share=share, in_band=in_band, steps=1001,
                                                  histogram=cal.histogram(spread),
                                                  max_share=cal.reachable_share(spread, np.ones(1001, bool)))) is None


def test_tau_spread_is_a_point_when_the_prompts_agree_and_wide_when_they_do_not():
    rng = np.random.default_rng(3)
    prompt = (np.concatenate([np.zeros(180), rng.uniform(0.2, 1.0, 20)]), np.ones(200, dtype=bool))
    same = [prompt] * 8
    tau = cal.choose_tau(np.concatenate([h for h, _ in same]), np.ones(1600, dtype=bool))[0]
    assert cal.tau_spread(same) == [tau, tau]
    # Confident prompts (5% of steps uncertain) and unsure ones (50%): how many of each a draw
    # holds moves the share at every tau, and so tau (measured: 0.46-0.75).
    mixed = [(np.concatenate([np.zeros(200 - n), rng.uniform(0.05, 1.0, n)]), np.ones(200, dtype=bool))
             for n in (10, 100) * 4]
    lo, hi = cal.tau_spread(mixed)
    assert hi - lo >= 0.2
    assert cal.tau_spread(mixed) == [lo, hi]  # seeded: the same answer every time
    assert cal.tau_spread(mixed[:1]) == []  # one prompt cannot be resampled
