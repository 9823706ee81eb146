"""The OpenAI-compatible server: a real `selar serve` subprocess on a free loopback port,
driven by the official `openai` client and by raw HTTP; plus an in-process server with
one slot and no queue for the 503 path. Real model (SmolLM2-135M), short generations."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from decode_compare import assert_same_greedy_text, steps_of_choice
from selar_local.api import Selar
from selar_local.server import create_app
from serve_helpers import free_port, running_server, wait_until_up

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-selar-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "smollm2-135m-instruct"
PROMPTS = ["What is 2+3?", "Name a color.", "What is the capital of France?", "Say hello."]


@pytest.fixture(scope="module")
def server(smollm_path):
    """`selar serve --parallel 4` in a subprocess: base URL."""
    with running_server(smollm_path, "--parallel", "4", "--queue-size", "8", "--n-ctx", "512",
                        api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _health(url: str) -> dict:
    return httpx.get(url + "/health", headers=AUTH, timeout=10).json()


def _wait_for(url: str, condition, timeout: float = 120.0) -> dict:
    """Poll /health until `condition(health)` holds (a state, with a generous bound)."""
    deadline = time.monotonic() + timeout
    while True:
        health = _health(url)
        if condition(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.05)


def _wait_idle(url: str, timeout: float = 120.0) -> dict:
    return _wait_for(url, lambda h: h["slots_busy"] == 0 and h["queued"] == 0, timeout)


def test_models_and_health(server, client):
    (model,) = client.models.list().data
    assert model.id == MODEL
    health = _health(server)
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["slots_total"] == 4 and health["queue_size"] == 8


def test_openai_client_streams_selar_chat(client):
    messages = [{"role": "user", "content": "Which city is the capital of France?"}]
    extra = {"method": "selar", "tau": 0.5}
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, seed=5, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()  # what SeLaR's soft steps make a 135M model say depends on CPU rounding
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    summary = finals[0].model_extra["selar"]
    assert summary["method"] == "selar" and summary["tau"] == 0.5
    assert chunks[-1].usage.completion_tokens >= 1
    # The same request without streaming gives the same text and SeLaR statistics.
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, seed=5, extra_body=extra)
    assert full.choices[0].message.content == text
    assert full.model_extra["selar"]["soft_steps"] == summary["soft_steps"]
    # And raw completions work through the client too.
    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                     temperature=0, extra_body={"method": "cot"})
    assert "Paris" in done.choices[0].text


def test_eight_concurrent_clients_get_the_answers_they_get_alone(server, client):
    """Correct = greedy answers identical to the same request served alone (or, on ARM
    int8-matmul CPUs, parting from it only at a near-tie: decode_compare.py)."""
    def ask(i: int) -> dict:
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[i % 4]}], max_tokens=12, temperature=0,
            logprobs=True, top_logprobs=2, extra_body={"method": "selar" if i < 4 else "cot", "tau": 0.5})
        return out.choices[0].model_dump()

    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    for got, want in zip(together, alone):
        assert_same_greedy_text(got["message"]["content"], want["message"]["content"], steps_of_choice(want))
    assert _health(server)["slots_busy_peak"] <= 4  # never more than --parallel at once
    _wait_idle(server)


def test_openai_client_gets_n_choices_logprobs_and_bounded_parameters(server, client):
    messages = [{"role": "user", "content": "Name a fruit."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, n=3, seed=11, max_tokens=8,
                                         logprobs=True, top_logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert _health(server)["slots_busy_peak"] >= 3  # the three choices decoded side by side
    for choice in out.choices:
        tokens = choice.logprobs.content
        assert "".join(t.token for t in tokens) == choice.message.content
        assert all(t.logprob <= 0 and 1 <= len(t.top_logprobs) <= 2 for t in tokens)
    assert [c["seed"] for c in out.model_extra["selar"]["choices"]] == [11, 12, 13]
    with pytest.raises(openai.BadRequestError, match="ks") as info:
        client.chat.completions.create(model=MODEL, messages=messages, extra_body={"ks": 1000})
    assert "64" in str(info.value)
    _wait_idle(server)


def test_disconnecting_streaming_client_frees_its_slot(server):
    before = _health(server)
    body = {"messages": [{"role": "user", "content": "Tell a long story about a dragon."}], "stream": True,
            "method": "cot", "ignore_eos": True}  # runs to the end of the context: it cannot finish first
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", server + "/v1/chat/completions", json=body, headers=AUTH) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert len(seen) >= 3
            assert _health(server)["slots_busy"] == 1
    after = _wait_idle(server)  # the slot comes back: cancelled, not completed
    assert _wait_for(server, lambda h: h["kv_cells_in_use"] == 0)["kv_cells_in_use"] == 0
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]


def test_disconnecting_waiting_client_frees_its_slot(server):
    """A non-streaming client that goes away while its answer is being generated: wait
    until the server is generating it (a state, not a time), then drop the connection."""
    before = _health(server)
    body = json.dumps({"messages": [{"role": "user", "content": "Tell a long story."}], "method": "cot",
                       "ignore_eos": True}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_for(server, lambda h: h["slots_busy"] == 1)
    after = _wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]


@pytest.mark.parametrize("path, content, status, code, param", [
    ("/v1/chat/completions", b"{not json", 400, "invalid_json", None),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json", None),
    ("/v1/chat/completions", b"", 400, "invalid_json", None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tau": "high"}, 400, "invalid_value",
     "tau"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "method": "beam"}, 400,
     "invalid_value", "method"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 5}, 400,
     "invalid_value", "n"),                      # more choices than --parallel
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "ks": 49152}, 400,
     "invalid_value", "ks"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["x"] * 40}, 400,
     "invalid_value", "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 1100}, 400,
     "too_many_messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "taus": 0.5}, 400,
     "unknown_parameter", "taus"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404,
     "model_not_found", "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 2000}]}, 400,
     "context_length_exceeded", "messages"),
    ("/v1/completions", {"prompt": "hi " * 2000, "stream": True}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, None, "prompt"),
    ("/v1/nothing", {}, 404, "not_found", None),
])
def test_malformed_requests_get_openai_errors(server, path, content, status, code, param):
    kwargs = {"json": content} if isinstance(content, dict) else {"content": content}
    response = httpx.post(server + path, headers={**AUTH, "Content-Type": "application/json"}, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_api_key_is_checked_on_every_request(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            response = httpx.request(method, server + path, headers=headers, json={}, timeout=10)
            assert response.status_code == 401, (headers, path)
            assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="tau"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"tau": -1})


# --------------------------------------------------------------- in-process, one slot


@pytest.fixture(scope="module")
def one_slot_server(smollm):
    """create_app on a Selar with one slot and no queue, under uvicorn in a thread."""
    import uvicorn

    llm = Selar(runtime=smollm, queue_size=0)
    port = free_port()
    config = uvicorn.Config(create_app(llm), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, timeout=120)
        yield url
    finally:
        uv.should_exit = True
        thread.join(10)
        llm.scheduler.close()


def test_full_queue_answers_503_until_a_slot_frees(one_slot_server):
    url = one_slot_server
    body = {"messages": [{"role": "user", "content": "Tell a story."}], "stream": True, "method": "cot",
            "ignore_eos": True}  # to the end of the context: busy for the whole test, on any machine
    small = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if '"content":"' in line and '"role"' not in line)  # it is generating
            assert _health(url)["slots_busy"] == 1
            busy = http.post(url + "/v1/chat/completions", json=small)
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "1"
            error = busy.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "server_error" and "--queue-size" in error["message"]
            stream_busy = http.post(url + "/v1/completions", json={"prompt": "Hi", "stream": True})
            assert stream_busy.status_code == 503
        _wait_idle(url)
        ok = http.post(url + "/v1/chat/completions", json=small)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
