"""Models on demand: `selar serve` without --model, a real server over two real models
(SmolLM2-135M and Gemma3-270M), loaded by the name a request gives, at most one at a
time, unloaded when idle; and a model file that goes bad while the server runs."""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_helpers import rss_bytes, running_server, running_server_process

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"


def _chat(url: str, model: str | None, **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=300)


def _listing(url: str) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]}


def _wait_for(url: str, condition, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health", timeout=10).json()
        if condition(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.05)


def _all_unloaded(health: dict) -> bool:
    """No model loaded, and none still giving its memory back."""
    return health["models_loaded"] == [] and health["models_unloading"] == []


def test_models_load_on_demand_switch_and_unload(model_files):
    """Each model loads on its first request, the other one leaves to make room (one
    loaded at most), an idle model leaves after --keep-alive, and its memory goes with it."""
    with running_server_process(None, "--models", f"{SMOL},{GEMMA}", "--max-loaded", "1", "--keep-alive", "2",
                                "--n-ctx", "512") as (url, proc):
        listing = _listing(url)
        assert sorted(listing) == sorted([SMOL, GEMMA])
        assert not any(m["meta"]["loaded"] for m in listing.values())
        assert listing[SMOL]["meta"]["path"] == str(model_files["llama"])
        rss_before = rss_bytes(proc.pid)

        first = _chat(url, SMOL)
        assert first.status_code == 200, first.text
        assert first.json()["model"] == SMOL
        listing = _listing(url)
        assert listing[SMOL]["meta"]["loaded"] and not listing[GEMMA]["meta"]["loaded"]
        assert listing[SMOL]["meta"]["architecture"] == "llama" and listing[SMOL]["meta"]["loads"] == 1
        rss_loaded = rss_bytes(proc.pid)

        second = _chat(url, GEMMA)  # takes SmolLM2's place
        assert second.status_code == 200, second.text
        assert second.json()["model"] == GEMMA
        listing = _listing(url)
        assert listing[GEMMA]["meta"]["loaded"] and not listing[SMOL]["meta"]["loaded"]
        assert listing[GEMMA]["meta"]["architecture"] == "gemma3"

        unknown = _chat(url, "no-such-model")
        assert unknown.status_code == 404
        error = unknown.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert SMOL in error["message"] and GEMMA in error["message"]

        health = _wait_for(url, _all_unloaded)  # idle past --keep-alive
        assert health["kv_cells_in_use"] == 0 and health["models_available"] == [SMOL, GEMMA]
        rss_unloaded = rss_bytes(proc.pid)

        again = _chat(url, SMOL)  # loads again on demand
        assert again.status_code == 200 and _listing(url)[SMOL]["meta"]["loads"] == 2
        rss_reloaded = rss_bytes(proc.pid)
        _wait_for(url, _all_unloaded)
        rss_unloaded_again = rss_bytes(proc.pid)
        print(f"\nRSS MiB: before any load {rss_before >> 20}, SmolLM2 loaded {rss_loaded >> 20}, all unloaded "
              f"{rss_unloaded >> 20}, SmolLM2 reloaded {rss_reloaded >> 20}, unloaded again {rss_unloaded_again >> 20}")
        # The weights and KV cache go with the model, every time (the first load also maps
        # llama.cpp's libraries and Python's modules, which stay).
        assert rss_loaded - rss_before > 50 << 20
        assert rss_reloaded - rss_unloaded_again > 50 << 20
        assert rss_unloaded_again < rss_unloaded + (16 << 20)


def test_concurrent_requests_for_a_loading_model_share_one_load(model_files):
    with running_server(None, "--models", SMOL, "--parallel", "2", "--n-ctx", "512", "--keep-alive", "-1") as url:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: _chat(url, SMOL), range(4)))
        assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
        assert _listing(url)[SMOL]["meta"]["loads"] == 1
        assert _chat(url, None).json()["model"] == SMOL  # no model: the one loaded


def test_loading_waiters_are_bounded_by_the_queue(model_files):
    """With --queue-size 0 nobody may wait for a load: while one request loads the model,
    the others get 503 rather than piling up; none is lost."""
    with running_server(None, "--models", SMOL, "--queue-size", "0", "--n-ctx", "512") as url:
        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(lambda _: _chat(url, SMOL), range(3)))
        codes = sorted(r.status_code for r in responses)
        assert codes[0] == 200 and set(codes) <= {200, 503}, [r.text for r in responses]
        assert _chat(url, SMOL).status_code == 200


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_a_model_file_gone_bad_fails_alone(tmp_path, model_files, damage):
    """A model file deleted or corrupted while the server runs: a clear error naming that
    model, and the other model keeps serving."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(model_files["llama"], folder / "victim.gguf")
    (folder / "healthy.gguf").symlink_to(model_files["gemma3"])
    with running_server(None, "--models-dir", str(folder), "--max-loaded", "2", "--n-ctx", "512") as url:
        models = _listing(url)
        victim_id = next(i for i, m in models.items() if m["meta"]["path"].endswith("victim.gguf"))
        healthy_id = next(i for i, m in models.items() if m["meta"]["path"].endswith("healthy.gguf"))
        if damage == "deleted":
            (folder / "victim.gguf").unlink()
        else:
            (folder / "victim.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
        broken = _chat(url, victim_id)
        assert broken.status_code == 500
        error = broken.json()["error"]
        assert error["code"] == "model_load_failed" and error["param"] == "model"
        assert victim_id in error["message"]
        if damage == "deleted":
            assert "does not exist" in error["message"]
        assert _listing(url)[victim_id]["meta"]["load_error"]
        healthy = _chat(url, healthy_id)
        assert healthy.status_code == 200 and healthy.json()["model"] == healthy_id
        assert _chat(url, victim_id).status_code == 500  # still a clear error, not a hang


def test_durations_and_keep_alive_parse_exactly():
    from selar_local.model_pool import parse_duration, parse_keep_alive
    from selar_local.openai_schema import RequestError

    assert [parse_duration(v) for v in (0, 30, 1.5, "45", "30s", "5m", "1h", "250ms", "-1", -1, "-5m")] == \
        [0.0, 30.0, 1.5, 45.0, 30.0, 300.0, 3600.0, 0.25, None, None, None]
    for bad in ("soon", "m", "", True, [], "nan"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_keep_alive(None) == "default" and parse_keep_alive("default") == "default"
    assert parse_keep_alive("10m") == 600.0 and parse_keep_alive(0) == 0.0 and parse_keep_alive(-1) is None
    with pytest.raises(RequestError, match="invalid keep_alive='soon'") as error:
        parse_keep_alive("soon")
    assert error.value.param == "keep_alive"


def test_a_busy_model_does_not_starve_a_request_for_another(model_files):
    """Under --max-loaded 1, six clients keep SmolLM2 busy without a gap (three decode, three
    wait in its queue, so its requests never all end at once); a request for
    Gemma3 is still served while they go on (SmolLM2 takes no new requests once Gemma3 waits
    for its place), not only after they stop."""
    import threading

    with running_server(None, "--models", f"{SMOL},{GEMMA}", "--max-loaded", "1", "--parallel", "3",
                        "--n-ctx", "512", "--keep-alive", "-1") as url:
        assert _chat(url, SMOL).status_code == 200
        gemma_done = threading.Event()
        budget = 40  # requests per busy client: far more than the switch needs

        def keep_busy() -> list[int]:
            statuses = []
            while not gemma_done.is_set() and len(statuses) < budget:
                statuses.append(_chat(url, SMOL).status_code)
            return statuses

        with ThreadPoolExecutor(6) as pool:
            busy = [pool.submit(keep_busy) for _ in range(6)]
            _wait_for(url, lambda h: h["slots_busy"] == 3 and h["queued"] >= 1)
            other = _chat(url, GEMMA)
            gemma_done.set()
            results = [f.result() for f in busy]
        assert other.status_code == 200 and other.json()["model"] == GEMMA
        assert all(set(r) == {200} for r in results)
        assert all(len(r) < budget for r in results), [len(r) for r in results]  # still running when served
