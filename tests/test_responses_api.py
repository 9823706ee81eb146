"""`POST /v1/responses` on a real `selar serve`, driven by the `openai` client's
`client.responses.create`, streamed and not; the answers compared with chat completions'
for the same greedy request. The reasoning item on a tiny random-weight model with the
DeepSeek-R1 tokenizer and template (whose prompt opens the thinking span)."""
from __future__ import annotations

import httpx
import ollama
import openai
import pytest

from serve_helpers import running_server

SMOL = "smollm2-135m-instruct"
GREEDY = {"method": "cot", "greedy": True}


@pytest.fixture(scope="module")
def server(model_files):
    with running_server(None, "--models", SMOL, "--n-ctx", "512", "--keep-alive", "-1") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(client, messages, max_tokens):
    return client.chat.completions.create(model=SMOL, messages=messages, max_tokens=max_tokens, extra_body=GREEDY)


def test_response_matches_chat_completion(client):
    response = client.responses.create(model=SMOL, input="Name a color.", instructions="Answer in one word.",
                                       max_output_tokens=8, extra_body=GREEDY)
    expected = _chat(client, [{"role": "system", "content": "Answer in one word."},
                              {"role": "user", "content": "Name a color."}], 8)
    assert response.object == "response" and response.model == SMOL and response.id.startswith("resp_")
    assert response.output_text == expected.choices[0].message.content
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert response.usage.input_tokens == expected.usage.prompt_tokens
    assert response.usage.output_tokens == expected.usage.completion_tokens
    assert response.usage.total_tokens == expected.usage.total_tokens
    finish = expected.choices[0].finish_reason
    assert response.status == ("incomplete" if finish == "length" else "completed")
    if finish == "length":
        assert response.incomplete_details.reason == "max_output_tokens"
    assert response.model_extra["selar"]["method"] == "cot"


def test_streamed_events(client):
    messages = [{"role": "user", "content": "Name a color."}]
    plain = client.responses.create(model=SMOL, input=messages, max_output_tokens=8, extra_body=GREEDY)
    events = list(client.responses.create(model=SMOL, input=messages, max_output_tokens=8, stream=True,
                                          extra_body=GREEDY))
    types = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] == ("response.completed" if plain.status == "completed" else "response.incomplete")
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert "".join(deltas) == plain.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == plain.output_text and final.usage.output_tokens == plain.usage.output_tokens
    assert events[-4].text == plain.output_text


def test_selar_fields_and_bad_requests(server, client):
    response = client.responses.create(model=SMOL, input="Name a color.", max_output_tokens=6,
                                       extra_body={"method": "selar", "tau": 0.0, "seed": 3})
    assert response.model_extra["selar"]["method"] == "selar"
    assert 0 < response.model_extra["selar"]["soft_steps"] <= response.usage.output_tokens
    # chat completions' summary, plus the finish reason: the same fields, the request's settings
    chat = client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Name a color."}],
                                          max_tokens=6, extra_body={"method": "selar", "tau": 0.0, "seed": 3})
    selar, chat_selar = response.model_extra["selar"], chat.model_extra["selar"]
    assert selar.keys() == chat_selar.keys() | {"finish_reason"}
    settings = ("method", "seed", "tau", "lam", "ks")
    assert [selar[k] for k in settings] == [chat_selar[k] for k in settings] == ["selar", 3, 0.0, 1.0, 3]
    for body, param in [({"model": SMOL}, "input"), ({"model": SMOL, "input": "hi", "previous_response_id": "r"},
                                                      "previous_response_id"),
                        ({"model": SMOL, "input": "hi", "bogus": 1}, "bogus"),
                        ({"model": SMOL, "input": [{"type": "function_call"}]}, "input"),
                        ({"model": SMOL, "input": "hi", "max_output_tokens": 0}, "max_tokens")]:
        bad = httpx.post(server + "/v1/responses", json=body, timeout=60)
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == param, bad.text
    missing = httpx.post(server + "/v1/responses", json={"model": "nope", "input": "hi"}, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_reasoning_item_and_ollama_thinking(tiny_model):
    """A thinking model: the span comes back as the reasoning item (and as Ollama's
    message.thinking), apart from the answer. The assistant turn opens the span and the
    thinking budget closes it, so both parts are there whatever the random weights say."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\n"}]
    knobs = {**GREEDY, "max_think_tokens": 6, "ignore_eos": True}
    with running_server(tiny_model("qwen2-r1"), "--n-ctx", "256") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=14, extra_body=knobs)
        reasoning = chat.choices[0].message.model_extra["reasoning_content"]
        assert reasoning and chat.choices[0].message.content
        response = client.responses.create(model=model, input=messages, max_output_tokens=14, extra_body=knobs)
        assert [item.type for item in response.output] == ["reasoning", "message"]
        assert response.output[0].content[0].text == reasoning
        assert response.output_text == chat.choices[0].message.content
        assert response.usage.output_tokens_details.reasoning_tokens > 0
        events = list(client.responses.create(model=model, input=messages, max_output_tokens=14, stream=True,
                                              extra_body=knobs))
        thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        assert thought.strip() == reasoning
        answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert answer.strip() == response.output_text.strip()
        assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["reasoning", "message"]
        reply = ollama.Client(host=url, timeout=300).chat(
            model=model, messages=messages, options={**knobs, "num_predict": 14})
        assert reply.message.thinking == reasoning and reply.message.content == chat.choices[0].message.content
        # a search on a thinking model: the span of its final answer is the reasoning item
        search = {**SEARCH, "max_think_tokens": 4, "ignore_eos": True}
        searched = client.chat.completions.create(model=model, messages=messages, max_tokens=14, extra_body=search)
        found = client.responses.create(model=model, input=messages, max_output_tokens=14, extra_body=search)
        assert [item.type for item in found.output] == ["reasoning", "message"]
        assert found.output[0].content[0].text == searched.choices[0].message.model_extra["reasoning_content"]
        assert found.output_text == searched.choices[0].message.content
        assert found.usage.output_tokens_details.reasoning_tokens == 4  # the budget, latent prefix included


SEARCH = {"method": "latentseek", "greedy": True, "seed": 5, "latentseek_iterations": 1, "latentseek_threshold": 1.0,
          "latentseek_grader": "json"}  # threshold 1: the one iteration always runs


def _course(selar: dict) -> dict:
    """A search's course and settings (its duration differs between two runs)."""
    return {k: v for k, v in selar.items() if k not in ("search_seconds", "finish_reason")}


def test_a_search_method_answers_as_in_chat_completions(client):
    messages = [{"role": "user", "content": "Name a color."}]
    expected = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=12, extra_body=SEARCH)
    response = client.responses.create(model=SMOL, input=messages, max_output_tokens=12, extra_body=SEARCH)
    choice = expected.choices[0]
    (message,) = response.output
    assert message.type == "message" and response.output_text == choice.message.content
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (
        expected.usage.prompt_tokens, expected.usage.completion_tokens, expected.usage.total_tokens)
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    selar = response.model_extra["selar"]
    assert _course(selar) == _course(expected.model_extra["selar"]) and selar["iterations"] == 1
    assert selar["finish_reason"] == choice.finish_reason
    assert response.status == ("incomplete" if choice.finish_reason == "length" else "completed")
    events = list(client.responses.create(model=SMOL, input=messages, max_output_tokens=12, stream=True,
                                          extra_body=SEARCH))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response." + response.status]
    assert events[4].delta == response.output_text == events[-1].response.output_text
    assert _course(events[-1].response.model_extra["selar"]) == _course(selar)
