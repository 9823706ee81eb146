"""`/metrics` (prometheus_client's exposition, parsed back with its parser), `/tokenize`
and `/detokenize`, and `/api/pull --allow-pull`, on a real `selar serve` with an API key."""
from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_helpers import running_server

KEY = "sk-metrics-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMOL = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"


@pytest.fixture(scope="module")
def server(model_files):
    with running_server(None, "--models", SMOL, "--metrics", "--allow-pull", "--n-ctx", "512",
                        "--keep-alive", "-1", api_key=KEY) as url:
        yield url


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(url + "/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _chat(url: str, **extra) -> dict:
    response = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=300, json={
        "model": SMOL, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 6, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_api_key_guards_everything(server):
    for method, path in (("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                         ("GET", "/api/tags"), ("POST", "/api/chat"), ("POST", "/api/pull")):
        response = httpx.request(method, server + path, json={}, timeout=30)
        assert response.status_code == 401, (path, response.text)


def test_metrics_count_what_the_requests_did(server):
    before = _samples(server)
    answers = [_chat(server, method="selar", tau=0.0, seed=1), _chat(server, method="cot", seed=2)]
    after = _samples(server)
    model = (("model", SMOL),)

    def grew(name, labels=model):
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert grew("selar_prompt_tokens_total") == sum(a["usage"]["prompt_tokens"] for a in answers)
    generated = sum(a["usage"]["completion_tokens"] for a in answers)
    assert grew("selar_generated_tokens_total") == generated
    assert grew("selar_soft_steps_total", (("method", "selar"), ("model", SMOL))) == answers[0]["selar"]["soft_steps"]
    assert grew("selar_soft_steps_total", (("method", "cot"), ("model", SMOL))) == 0
    assert answers[0]["selar"]["soft_steps"] > 0  # tau 0 opens the gate at every uncertain step
    assert grew("selar_time_to_first_token_seconds_count") == 2
    assert grew("selar_inter_token_seconds_count") == generated - 2
    assert grew("selar_http_requests_total", (("route", "/v1/chat/completions"), ("status", "200"))) == 2
    assert after[("selar_model_loads_total", model)] == 1 and after[("selar_model_loaded", model)] == 1
    assert after[("selar_slots_total", model)] == 1
    assert after[("selar_slots_busy", model)] == 0 and after[("selar_queue_depth", model)] == 0
    assert after[("selar_kv_cells_in_use", model)] == 0
    assert after[("selar_model_load_seconds_total", model)] > 0
    httpx.get(server + "/metrics", timeout=30)  # refused: counted too
    assert _samples(server)[("selar_http_requests_total", (("route", "/metrics"), ("status", "401")))] >= 1


def test_tokenize_and_detokenize(server):
    text = "Hello, wörld!"
    plain = httpx.post(server + "/tokenize", headers=AUTH, json={"content": text}, timeout=60).json()
    ids = plain["tokens"]
    assert ids and all(isinstance(t, int) for t in ids)
    special = httpx.post(server + "/tokenize", headers=AUTH, json={"content": text, "add_special": True},
                         timeout=60).json()["tokens"]
    assert special[-len(ids):] == ids and len(special) >= len(ids)
    pieces = httpx.post(server + "/tokenize", headers=AUTH, json={"content": text, "with_pieces": True},
                        timeout=60).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    assert "".join(p["piece"] for p in pieces if isinstance(p["piece"], str)) in text
    back = httpx.post(server + "/detokenize", headers=AUTH, json={"tokens": ids}, timeout=60).json()
    assert back == {"content": text}
    bad = httpx.post(server + "/detokenize", headers=AUTH, json={"tokens": [10 ** 9]}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    missing = httpx.post(server + "/tokenize", headers=AUTH, json={"text": text}, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "content"


def test_pull_with_allow_pull_serves_the_model(server, model_files):
    """Gemma3-270M is already on this machine (the test fixtures), so the pull is local."""
    assert GEMMA not in [m["name"] for m in httpx.get(server + "/api/tags", headers=AUTH).json()["models"]]
    with httpx.stream("POST", server + "/api/pull", headers=AUTH, json={"model": GEMMA}, timeout=300) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[0] == {"status": f"pulling {GEMMA}"}
    assert lines[-1]["status"] == "success" and lines[-1]["model"] == GEMMA
    assert all(set(p) == {"status", "completed", "total"} for p in lines[1:-1]), lines  # verified already: no work
    assert lines[-1]["total"] == model_files["gemma3"].stat().st_size
    assert GEMMA in [m["name"] for m in httpx.get(server + "/api/tags", headers=AUTH).json()["models"]]
    unknown = httpx.post(server + "/api/pull", headers=AUTH, json={"model": "no-such-model", "stream": False})
    assert unknown.status_code == 404 and "no-such-model" in unknown.json()["error"]


def test_pull_streams_its_progress(model_files, tmp_path):
    """A pull that has work to do (Gemma's installed PyPI parts assembled into an empty cache)
    streams Ollama's progress lines: per stage, `completed` rising to `total`."""
    with running_server(None, "--models", SMOL, "--allow-pull", "--keep-alive", "-1",
                        env={"SELAR_CACHE_DIR": str(tmp_path)}) as url:
        with httpx.stream("POST", url + "/api/pull", json={"model": GEMMA}, timeout=300) as response:
            lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[0] == {"status": f"pulling {GEMMA}"}
    assert lines[-1] == {"status": "success", "model": GEMMA, "total": model_files["gemma3"].stat().st_size}
    progress = lines[1:-1]
    assert progress and all(set(p) == {"status", "completed", "total"} for p in progress), lines
    for stage in {p["status"] for p in progress}:
        counts = [p["completed"] for p in progress if p["status"] == stage]
        total = next(p["total"] for p in progress if p["status"] == stage)
        assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == total, (stage, counts, total)
