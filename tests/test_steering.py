"""Fractional Reasoning's steering vectors: the pure math exactly, and `selar steer build` on
SmolLM2 with a few pairs (what it stores is what the layers read, an interrupted build resumes
to the same result, a vector for another model file is refused)."""
from __future__ import annotations

import numpy as np
import pytest

from selar_local import steering
from selar_local.engine import LayerStates
from selar_local.errors import InvalidParameterError

from conftest import runtime_for


class TestSteeringMath:
    def test_mean_plus_sign_aligned_first_component(self):
        rng = np.random.default_rng(3)
        n_layer, n_embd, n = 3, 8, 6
        mean = rng.standard_normal((n_layer, n_embd))
        u = rng.standard_normal((n_layer, n_embd))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        u[1] *= np.sign(u[1] @ mean[1]) * -1  # layer 1: the component points against the mean
        c = rng.standard_normal(n)
        c -= c.mean()
        diffs = mean[None] + c[:, None, None] * u[None]  # rank one around the mean
        got = steering.steering_vectors(diffs)
        for il in range(n_layer):
            aligned = u[il] if u[il] @ mean[il] >= 0 else -u[il]
            np.testing.assert_allclose(got[il], mean[il] + aligned, rtol=0, atol=1e-5)
        assert got[1] @ mean[1] > mean[1] @ mean[1]  # flipped towards the mean

    def test_control_vector_rows_are_alpha_times_the_typical_update(self):
        rng = np.random.default_rng(4)
        vectors = rng.standard_normal((4, 16)).astype(np.float32)
        norms = np.array([3.0, 10.0, 20.0, 40.0], np.float32)
        sv = steering.SteeringVectors("a" * 64, "m.gguf", vectors, norms, 8, "q")
        rows = steering.control_vector(sv, 0.1)
        assert not rows[0].any()
        np.testing.assert_allclose(np.linalg.norm(rows[1:], axis=1), 0.1 * norms[1:], rtol=1e-6)
        cos = (rows[1:] * vectors[1:]).sum(1) / np.linalg.norm(rows[1:], axis=1) / np.linalg.norm(vectors[1:], axis=1)
        np.testing.assert_allclose(cos, 1.0, rtol=1e-6)
        np.testing.assert_allclose(steering.control_vector(sv, -0.1), -rows)
        assert not steering.control_vector(sv, 0.0).any()

    @pytest.mark.parametrize("alpha", [1.01, -1.5, float("nan"), float("inf"), True, "0.1"])
    def test_alpha_outside_the_documented_range_is_refused(self, alpha):
        with pytest.raises(InvalidParameterError, match=r"frac_alpha=.*expected a number in \[-1.0, 1.0\]"):
            steering.check_alpha(alpha)

    def test_alpha_draws_are_uniform_in_the_range_and_replay(self):
        draws = steering.alpha_draws((0.0, 0.15), 200, seed=41)
        assert draws == steering.alpha_draws((0.0, 0.15), 200, seed=41)
        assert min(draws) >= 0 and max(draws) <= 0.15 and abs(np.mean(draws) - 0.075) < 0.01
        with pytest.raises(InvalidParameterError, match="a <= b"):
            steering.alpha_draws((0.1, 0.0), 2, seed=1)
        with pytest.raises(InvalidParameterError, match="frac_alpha="):
            steering.alpha_draws((0.0, 1.5), 2, seed=1)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELAR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_build_stores_what_the_layers_read(model_files, cache):
    rt = runtime_for("llama", model_files)
    built = steering.build(rt, n_pairs=3)
    states = LayerStates(rt.model, n_ctx=512, n_threads=rt.context.n_threads, n_threads_batch=rt.context.n_threads_batch)
    diffs, norms = [], []
    for question in steering.read_questions(3):
        reason, direct = (states.read(rt.encode(messages=m)) for m in steering.pair_messages(question))
        diffs.append(reason - direct)
        norms += [steering.layer_update_norms(reason), steering.layer_update_norms(direct)]
    states.close()
    assert np.array_equal(built.vectors, steering.steering_vectors(np.stack(diffs)))
    assert np.array_equal(built.update_norms, np.median(np.stack(norms), axis=0).astype(np.float32))
    path = steering.steering_file(built.model_sha256)
    assert path.parent.parent == cache and path.is_file()
    again = steering.load_for(rt.model_path)
    assert np.array_equal(again.vectors, built.vectors) and again.n_pairs == 3
    calls = []
    cached = steering.build(rt, n_pairs=3, progress=lambda done, total: calls.append(done))
    assert calls == [] and np.array_equal(cached.vectors, built.vectors)  # served from the cache, not rebuilt


def test_interrupted_build_resumes_to_the_same_result(model_files, cache, monkeypatch):
    rt = runtime_for("llama", model_files)
    monkeypatch.setattr(steering, "_SAVE_EVERY", 1)

    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        steering.build(rt, n_pairs=3, progress=interrupt)
    files = sorted(p.name for p in (cache / "steering").iterdir())
    assert len(files) == 1 and files[0].endswith(f"-v{steering.STEERING_VERSION}.partial.npz"), files  # no final file, no temporary left
    seen = []
    resumed = steering.build(rt, n_pairs=3, progress=lambda done, total: seen.append(done))
    assert seen[0] == 2 and seen[-1] == 3
    assert sorted(p.name for p in (cache / "steering").iterdir()) == [files[0].replace(".partial", "")]
    fresh = steering.build(rt, n_pairs=3, refresh=True)
    assert np.array_equal(resumed.vectors, fresh.vectors)
    assert np.array_equal(resumed.update_norms, fresh.update_norms)


def test_vector_of_another_model_file_and_a_corrupt_file_are_refused(model_files, cache, tmp_path):
    rt = runtime_for("llama", model_files)
    built = steering.build(rt, n_pairs=2)
    path = steering.steering_file(built.model_sha256)
    with pytest.raises(steering.SteeringError, match="built for another model file .*steer build --model"):
        steering.load_for(model_files["qwen2"], path)
    with pytest.raises(steering.SteeringError, match="no steering vector for .*selar steer build"):
        steering.load_for(model_files["qwen2"])
    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(steering.SteeringError, match="not a readable steering file"):
        steering.load_for(rt.model_path, broken)


def test_too_few_questions_is_a_clear_error(tmp_path):
    source = tmp_path / "q.jsonl"
    source.write_text('{"question": "What is 2+2?"}\n')
    with pytest.raises(steering.DatasetError, match="has 1 questions, fewer than the 2 pairs"):
        steering.read_questions(2, source)


def test_cli_builds_and_reports(model_files, cache, capsys):
    from selar_local.cli import main

    assert main(["steer", "build", "--model", str(model_files["llama"]), "--pairs", "2", "--threads", "1",
                 "--threads-batch", "1", "--n-ctx", "512"]) == 0
    out = capsys.readouterr().out
    assert "30 layers from 2 pairs" in out and str(cache / "steering") in out
    assert main(["steer", "build", "--model", str(model_files["llama"]), "--pairs", "1"]) == 2
    assert "need at least 2 question pairs" in capsys.readouterr().err


def test_shipped_questions_are_the_first_lines_of_gsm8k_train():
    from selar_local.bench.datasets import find_data_dir

    root = find_data_dir("gsm8k/train.jsonl")
    if root is None:
        pytest.skip("GSM8K train is not shipped whole: set SELAR_DATA_DIR to a folder holding gsm8k/train.jsonl")
    with (root / "gsm8k" / "train.jsonl").open(encoding="utf-8") as handle:
        first = [next(handle) for _ in range(1024)]
    assert steering.QUESTIONS_FILE.read_text(encoding="utf-8").splitlines(keepends=True) == first
