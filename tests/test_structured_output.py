"""Structured output through the real `openai` client against a real `selar serve`:
`chat.completions.parse` with a pydantic model (strict json_schema), JSON mode,
llama-server's `grammar` field, and the 400s for bad constraints; and the same on a
random-weight model with R1's thinking tokenizer, where only the grammar makes it JSON."""
from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, Field

from serve_helpers import running_server


class City(BaseModel):
    name: str
    country: str
    population: int


class Short(BaseModel):  # bounded strings: random weights would otherwise write to max_tokens
    name: str = Field(max_length=8)
    ok: bool


ASK = [{"role": "user", "content": "Describe Paris as JSON with name, country and population."}]


@pytest.fixture(scope="module")
def qwen_client(model_files):
    with running_server(model_files["qwen2"], "--n-ctx", "1024") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("method", ["cot", "selar"])
def test_parse_with_a_pydantic_model_returns_an_object_that_validates(qwen_client, method):
    completion = qwen_client.chat.completions.parse(model="", messages=ASK, response_format=City, max_tokens=80,
                                                    seed=3, extra_body={"method": method})
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.refusal is None
    city = choice.message.parsed
    assert isinstance(city, City)
    assert City.model_validate_json(choice.message.content) == city
    assert completion.model_extra["selar"]["method"] == method


def test_json_mode_and_the_grammar_field(qwen_client):
    r = qwen_client.chat.completions.create(model="", messages=ASK, response_format={"type": "json_object"},
                                            max_tokens=80, seed=1)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = qwen_client.chat.completions.create(model="", messages=[{"role": "user", "content": "Is Paris in France?"}],
                                            max_tokens=8, extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].message.content in ("yes", "no") and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra, param, message", [
    ({"grammar": "root ::= missing"}, "grammar", "Undefined rule identifier 'missing'"),
    ({"json_schema": {"type": "foo"}}, "json_schema", "Unrecognized schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "expected an object whose type is one of"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}}, "response_format",
     "'schema' must be a JSON Schema object"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "response_format",
     "cannot go with grammar or json_schema"),
])
def test_bad_constraints_are_400_in_openais_shape(qwen_client, extra, param, message):
    with pytest.raises(openai.BadRequestError) as info:
        qwen_client.chat.completions.create(model="", messages=ASK, max_tokens=8, extra_body=extra)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == param and message in error["message"]
    # the server still answers
    ok = qwen_client.chat.completions.create(model="", messages=ASK, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_random_weights_with_a_thinking_tokenizer_still_answer_valid_json(tiny_model):
    """The span is opened by a prefill and closed by the budget; the reasoning is free."""
    with running_server(tiny_model("qwen2-r1"), "--n-ctx", "512") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        prefill = ASK + [{"role": "assistant", "content": "<think>\n"}]
        for method in ("cot", "selar"):
            completion = client.chat.completions.parse(
                model="", messages=prefill, response_format=Short, max_tokens=200, seed=5,
                extra_body={"method": method, "tau": 0.0, "max_think_tokens": 10})
            message = completion.choices[0].message
            assert completion.choices[0].finish_reason == "stop", message
            assert isinstance(message.parsed, Short)
            assert Short.model_validate_json(message.content) == message.parsed
            reasoning = message.model_extra["reasoning_content"]
            assert reasoning and not reasoning.startswith("{")
