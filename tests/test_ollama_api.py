"""Ollama's API on a real `selar serve` (two real models, one loaded at a time), driven
by the real `ollama` Python client; answers compared with the OpenAI endpoints' for the
same greedy request (the same runtime decodes both)."""
from __future__ import annotations

import json
import time
from importlib.metadata import version

import httpx
import ollama
import pytest

from serve_helpers import running_server

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"
GREEDY = {"method": "cot", "greedy": True, "num_predict": 8}
MESSAGES = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def server(model_files):
    with running_server(None, "--models", f"{SMOL},{GEMMA}", "--max-loaded", "1", "--n-ctx", "512",
                        "--keep-alive", "-1") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server, timeout=300)


def _openai_chat(url: str, model: str, messages, **extra) -> dict:
    body = {"model": model, "messages": messages, "method": "cot", "greedy": True, "max_tokens": 8, **extra}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def _loaded(client) -> list[str]:
    return [m.model for m in client.ps().models]


def test_tags_version_and_show(server, client):
    assert sorted(m.model for m in client.list().models) == sorted([SMOL, GEMMA])
    assert all(m.details.format == "gguf" and m.size > 0 for m in client.list().models)
    assert httpx.get(server + "/api/version").json() == {"version": version("selar-local")}
    client.chat(model=SMOL, messages=MESSAGES, options=GREEDY)
    shown = client.show(SMOL)
    assert shown.details.family == "llama" and shown.details.quantization_level == "Q4_1"
    assert shown.modelinfo["general.architecture"] == "llama"
    assert "completion" in shown.capabilities


def test_chat_matches_the_openai_endpoint_streamed_and_not(server, client):
    expected = _openai_chat(server, SMOL, MESSAGES)
    reply = client.chat(model=SMOL, messages=MESSAGES, options=GREEDY)
    assert reply.model == SMOL and reply.done and reply.done_reason == expected["choices"][0]["finish_reason"]
    assert reply.message.role == "assistant"
    assert reply.message.content == expected["choices"][0]["message"]["content"]
    assert reply.prompt_eval_count == expected["usage"]["prompt_tokens"]
    assert reply.eval_count == expected["usage"]["completion_tokens"]
    assert reply.prompt_eval_duration > 0 and reply.eval_duration > 0
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration + reply.load_duration

    parts = list(client.chat(model=SMOL, messages=MESSAGES, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == reply.message.content
    final = parts[-1]
    assert final.done_reason == reply.done_reason and final.eval_count == reply.eval_count
    assert final.prompt_eval_count == reply.prompt_eval_count


def test_generate_raw_and_templated(server, client):
    raw = client.generate(model=SMOL, prompt="The capital of France is", raw=True, options=GREEDY)
    completion = httpx.post(server + "/v1/completions", json={
        "model": SMOL, "prompt": "The capital of France is", "method": "cot", "greedy": True, "max_tokens": 8},
        timeout=300).json()
    assert raw.response == completion["choices"][0]["text"]
    assert raw.eval_count == completion["usage"]["completion_tokens"]
    templated = client.generate(model=SMOL, prompt="Name a color.", options=GREEDY)
    assert templated.response == _openai_chat(server, SMOL, MESSAGES)["choices"][0]["message"]["content"]
    streamed = list(client.generate(model=SMOL, prompt="Name a color.", options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == templated.response and streamed[-1].done


def test_selar_knobs_in_options(server):
    """The SeLaR fields ride in `options` (the ollama client's models drop extra response
    fields, so this reads the raw body)."""
    response = httpx.post(server + "/api/chat", json={
        "model": SMOL, "messages": MESSAGES, "stream": False,
        "options": {"method": "selar", "tau": 0.3, "seed": 7, "num_predict": 6, "temperature": 0.7}}, timeout=300)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["selar"]["method"] == "selar"
    assert 0 <= reply["selar"]["soft_steps"] <= reply["eval_count"] <= 6
    # the done line's `selar` is chat completions' summary: the same fields, the request's settings
    chat = _openai_chat(server, SMOL, MESSAGES, method="selar", tau=0.3, seed=7, max_tokens=6, temperature=0.7,
                        greedy=False)["selar"]
    assert reply["selar"].keys() == chat.keys()
    settings = ("method", "seed", "tau", "lam", "ks")
    assert [reply["selar"][k] for k in settings] == [chat[k] for k in settings] == ["selar", 7, 0.3, 1.0, 3]


def test_model_switch_and_keep_alive(server, client):
    client.chat(model=SMOL, messages=MESSAGES, options=GREEDY)
    assert _loaded(client) == [SMOL]
    switched = client.chat(model=GEMMA, messages=MESSAGES, options=GREEDY)
    assert switched.model == GEMMA and switched.load_duration > 0  # this request waited for the load
    assert switched.message.content == _openai_chat(server, GEMMA, MESSAGES)["choices"][0]["message"]["content"]
    assert _loaded(client) == [GEMMA]
    again = client.chat(model=GEMMA, messages=MESSAGES, options=GREEDY)
    assert again.load_duration == 0
    # keep_alive 0: unloaded once the request has ended
    client.chat(model=GEMMA, messages=MESSAGES, options=GREEDY, keep_alive=0)
    deadline = time.monotonic() + 60
    while _loaded(client):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    loaded = client.generate(model=SMOL, prompt="")  # an empty prompt loads the model
    assert loaded.done_reason == "load" and _loaded(client) == [SMOL]
    unloaded = client.generate(model=SMOL, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload" and _loaded(client) == []


def test_errors_have_ollama_shape(server, client):
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="no-such-model", messages=MESSAGES)
    assert unknown.value.status_code == 404 and SMOL in unknown.value.error
    with pytest.raises(ollama.ResponseError) as bad_option:
        client.chat(model=SMOL, messages=MESSAGES, options={"mirostat": 2})
    assert bad_option.value.status_code == 400 and "'mirostat' is not supported" in bad_option.value.error
    bad_format = httpx.post(server + "/api/chat", json={"model": SMOL, "messages": MESSAGES, "format": "yaml"},
                            timeout=60)  # the client itself refuses to send this one
    assert bad_format.status_code == 400 and "format" in bad_format.json()["error"]
    with pytest.raises(ollama.ResponseError) as bad_schema:
        client.chat(model=SMOL, messages=MESSAGES, format={"type": "object", "properties": {"a": {"type": 7}}})
    assert bad_schema.value.status_code == 400
    for body, needle in [(b"{not json", "not valid JSON"), (b'{"model": "%s"}' % SMOL.encode(), "'messages'"),
                         (b'{"model": "%s", "messages": [], "keep_alive": "soon"}' % SMOL.encode(), "keep_alive"),
                         (b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
                          b'"options": {"num_ctx": 100000}}' % SMOL.encode(), "num_ctx")]:
        response = httpx.post(server + "/api/chat", content=body, timeout=60)
        assert response.status_code == 400, response.text
        assert set(response.json()) == {"error"} and needle in response.json()["error"]


def test_pull_is_refused_without_allow_pull(server):
    response = httpx.post(server + "/api/pull", json={"model": GEMMA}, timeout=30)
    assert response.status_code == 403 and "--allow-pull" in response.json()["error"]


def test_format_constrains_the_answer_to_json(server, client):
    """`format`: "json" gives a JSON object, a schema an object that validates, whatever the
    135M model would have said (llama.cpp's grammar sampler, as the OpenAI endpoints)."""
    import json

    options = {"method": "selar", "num_predict": 64, "seed": 3}
    answer = client.chat(model=SMOL, messages=[{"role": "user", "content": "Describe a cat in JSON."}],
                         format="json", options=options)
    if answer.done_reason == "stop":
        assert isinstance(json.loads(answer.message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "legs": {"type": "integer"}},
              "required": ["name", "legs"], "additionalProperties": False}
    answer = client.chat(model=SMOL, messages=[{"role": "user", "content": "A cat: its name and legs, as JSON."}],
                         format=schema, options=options)
    assert answer.done_reason == "stop", answer
    value = json.loads(answer.message.content)
    assert set(value) == {"name", "legs"} and isinstance(value["name"], str) and isinstance(value["legs"], int)


SEARCH = {"method": "latentseek", "greedy": True, "seed": 5, "latentseek_iterations": 1, "latentseek_threshold": 1.0,
          "latentseek_grader": "json"}  # threshold 1: the one iteration always runs


def test_a_search_method_answers_on_api_chat_as_on_the_openai_endpoint(server, client):
    expected = _openai_chat(server, SMOL, MESSAGES, max_tokens=12, **SEARCH)
    body = {"model": SMOL, "messages": MESSAGES, "options": {**SEARCH, "num_predict": 12}}
    reply = httpx.post(server + "/api/chat", json={**body, "stream": False}, timeout=300)
    assert reply.status_code == 200, reply.text
    reply = reply.json()
    choice, usage = expected["choices"][0], expected["usage"]

    def course(selar):  # the search's course and settings; its duration differs between two runs
        return {k: v for k, v in selar.items() if k != "search_seconds"}

    assert reply["message"] == {"role": "assistant", "content": choice["message"]["content"]}
    assert course(reply["selar"]) == course(expected["selar"]) and reply["selar"]["iterations"] == 1
    assert (reply["done"], reply["done_reason"], reply["prompt_eval_count"], reply["eval_count"]) == (
        True, choice["finish_reason"], usage["prompt_tokens"], usage["completion_tokens"])
    assert reply["total_duration"] >= reply["prompt_eval_duration"] + reply["eval_duration"] > 0

    with httpx.stream("POST", server + "/api/chat", json=body, timeout=300) as streamed:
        lines = [json.loads(line) for line in streamed.iter_lines() if line]
    assert [line["done"] for line in lines] == [False, True]
    assert lines[0]["message"] == reply["message"] and lines[1]["message"]["content"] == ""
    assert course(lines[1]["selar"]) == course(reply["selar"]) and lines[1]["eval_count"] == reply["eval_count"]
    assert client.chat(model=SMOL, messages=MESSAGES, options=body["options"]).message.content == \
        reply["message"]["content"]

    refused = httpx.post(server + "/api/generate", json={"model": SMOL, "prompt": "Name a color.",
                                                         "options": SEARCH}, timeout=60)
    assert refused.status_code == 400 and "use /api/chat" in refused.json()["error"]
    psrm = httpx.post(server + "/api/chat", json={**body, "options": {**SEARCH, "latentseek_grader": "psrm"}},
                      timeout=60)
    assert psrm.status_code == 400 and "only `selar bench` has" in psrm.json()["error"]
