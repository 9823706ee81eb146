"""Forced tool calls in every format on random-weight models, where only the grammar makes
the call well formed: each format's grammar (tool_grammar.py) drives llama.cpp's grammar
sampler on a tiny qwen2 model with Qwen2.5's vocabulary, and the format's parser must read
back a call to a listed tool whose arguments validate against its schema. Then the DeepSeek
R1 format end to end (R1's own template and tokenizer on a tiny model, the real `openai`
client against a real `selar serve`): forced calls non-streamed and streamed, and a thinking
span first, opened by a prefill or by the model itself, whose reasoning stays in
`reasoning_content` while the call is in `tool_calls`.

No offline model carries a Qwen3-Coder or gpt-oss template (or gpt-oss's harmony vocabulary),
so those two formats are tested through the Python API with the grammar and parser only."""
from __future__ import annotations

import json
import shutil
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from selar_local.params import DecodeParams
from selar_local.tool_calls import FORMATS, StreamedCalls, check_tools, parse
from selar_local.tool_grammar import call_grammar
from serve_helpers import running_server

THINK_OPEN = 151648  # R1's <think>


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=8)  # bounded: random weights would otherwise write to max_tokens
    days: int  # no bounds: llama-cpp-python's converter does not enforce minimum/maximum
    unit: Literal["C", "F"]


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(max_length=10)
    exact: bool = False  # optional


MODELS = {"get_weather": Weather, "search": Search}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} tool",
                                           "parameters": model.model_json_schema()}}
         for name, model in MODELS.items()]
TEMPLATE_MARKERS = {"hermes": "<tool_call>", "llama3": "<|start_header_id|>ipython", "mistral": "[TOOL_CALLS]",
                    "deepseek_r1": "<｜tool▁calls▁begin｜>", "qwen3_coder": "<function=x><parameter=y>",
                    "gpt_oss": "<|channel|>"}


def assert_valid_calls(calls, names=tuple(MODELS)):
    """Every call names a listed tool and its arguments validate against that tool's schema."""
    assert calls
    for call in calls:
        name, arguments = (call.name, call.arguments) if hasattr(call, "arguments") else (
            call.function.name, call.function.arguments)
        assert name in names
        assert isinstance(MODELS[name].model_validate_json(arguments), MODELS[name])
        assert isinstance(json.loads(arguments), dict)


@pytest.fixture(scope="module")
def tiny_qwen(tiny_model):
    from selar_local.runtime import Runtime

    runtime = Runtime(tiny_model("qwen2"), n_ctx=512, n_threads=1)
    yield runtime
    runtime.close()


def _generate(runtime, prompt, params):
    from selar_local.generate import stream_tokens

    stream = stream_tokens(runtime, runtime.model.tokenize(prompt), params)
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("choice, method", [("required", "cot"), ({"type": "function", "function": {"name": "search"}},
                                                                  "selar")])
def test_each_formats_forced_call_is_well_formed_from_random_weights(tiny_qwen, fmt, choice, method):
    req = check_tools({"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False}, TEMPLATE_MARKERS[fmt])
    assert req.fmt == fmt
    params = DecodeParams(method=method, tau=0.0, grammar=call_grammar(req), max_tokens=160, seed=4)
    result = _generate(tiny_qwen, "Call a tool:", params)
    assert result.finish_reason == "stop", result.text  # the grammar completed: only end of generation was left
    content, calls = parse(fmt, result.text, req.tools)
    assert content == "" and len(calls) == 1, result.text
    assert_valid_calls(calls, ("search",) if isinstance(choice, dict) else tuple(MODELS))


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "deepseek_r1", "qwen3_coder"])
def test_parallel_calls_each_parse(tiny_qwen, fmt):
    req = check_tools({"tools": TOOLS, "tool_choice": "required"}, TEMPLATE_MARKERS[fmt])
    assert req.parallel
    result = _generate(tiny_qwen, "Call tools:", DecodeParams(method="cot", grammar=call_grammar(req), max_tokens=400,
                                                              seed=1))
    assert result.finish_reason == "stop", result.text
    content, calls = parse(fmt, result.text, req.tools)
    assert content == "", result.text
    assert_valid_calls(calls)


# ------------------------------------------------------------------ R1 end to end

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def r1_client(tiny_model):
    with running_server(tiny_model("qwen2-r1"), "--n-ctx", "1024") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def _streamed(client, **kwargs):
    """(reasoning, content, calls [(id, name, arguments)], finish) reassembled from the deltas."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, [d.id, d.function.name, ""])
                if d.id:  # id and name come first, once
                    assert entry[2] == "" and d.function.name
                entry[2] += d.function.arguments or ""
    return reasoning, content, [tuple(v) for _, v in sorted(calls.items())], finish


def _assert_same_as_streamed(client, whole, **kwargs):
    reasoning, content, calls, finish = _streamed(client, **kwargs)
    message = whole.choices[0].message
    assert finish == whole.choices[0].finish_reason == "tool_calls" and content == ""
    assert [(n, a) for _, n, a in calls] == [(c.function.name, c.function.arguments) for c in message.tool_calls]
    assert all(i.startswith("call_") for i, _, _ in calls)
    assert reasoning == ((message.model_extra or {}).get("reasoning_content") or "")


@pytest.mark.parametrize("choice, method", [("required", "cot"), ("required", "selar"),
                                            ({"type": "function", "function": {"name": "get_weather"}}, "cot")])
def test_r1_forced_call_through_the_openai_client(r1_client, choice, method):
    kwargs = dict(model="", messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
                  max_tokens=200, temperature=0, extra_body={"method": method, "tau": 0.0})
    whole = r1_client.chat.completions.create(**kwargs)
    choice_out = whole.choices[0]
    assert choice_out.finish_reason == "tool_calls" and choice_out.message.content is None
    assert len(choice_out.message.tool_calls) == 1
    assert_valid_calls(choice_out.message.tool_calls,
                       ("get_weather",) if isinstance(choice, dict) else tuple(MODELS))
    _assert_same_as_streamed(r1_client, whole, **kwargs)


def test_r1_thinking_first_then_a_forced_call(r1_client):
    """The span opened by a prefill, closed by the budget: reasoning in reasoning_content,
    the call in tool_calls, no content."""
    kwargs = dict(model="", messages=ASK + [{"role": "assistant", "content": "<think>\n"}], tools=TOOLS,
                  tool_choice="required", parallel_tool_calls=False, max_tokens=200, temperature=0,
                  extra_body={"method": "selar", "tau": 0.0, "max_think_tokens": 12})
    whole = r1_client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and "<｜tool▁call" not in reasoning and "</think>" not in reasoning
    assert message.content is None and len(message.tool_calls) == 1
    assert_valid_calls(message.tool_calls)
    _assert_same_as_streamed(r1_client, whole, **kwargs)


# --------------------------------------------- a model that opens the span itself

@pytest.fixture(scope="module")
def self_opening_r1(tiny_model, tmp_path_factory):
    """The tiny R1 model with its output row for <think> set to twice the row of the token it
    says first after ASK's prompt: greedy, its first token is <think> (the template does not
    open the span; R1's template ends the prompt with <｜Assistant｜>)."""
    from gguf import GGUFReader

    from selar_local.runtime import Runtime

    source = tiny_model("qwen2-r1")
    runtime = Runtime(source, n_ctx=256, n_threads=1)
    try:
        prompt = runtime.encode(messages=ASK)
        assert runtime.thinking_at_end(prompt) is False
        first = _generate_tokens(runtime, prompt, DecodeParams(method="cot", greedy=True, max_tokens=1))[0]
    finally:
        runtime.close()
    path = tmp_path_factory.mktemp("self-opening") / "tiny-qwen2-r1-opens.gguf"
    shutil.copy(source, path)
    reader = GGUFReader(str(path), "r+")
    (head,) = [t for t in reader.tensors if t.name == "output.weight"]
    head.data[THINK_OPEN] = 2 * head.data[first]
    reader.data.flush()
    del reader
    return path


def _generate_tokens(runtime, prompt, params):
    from selar_local.generate import stream_tokens

    return [e.token for e in stream_tokens(runtime, prompt, params)]


def test_the_grammar_lets_a_model_open_its_span_itself(self_opening_r1):
    from selar_local.runtime import Runtime

    runtime = Runtime(self_opening_r1, n_ctx=512, n_threads=1)
    try:
        prompt = runtime.encode(messages=ASK)
        assert _generate_tokens(runtime, prompt, DecodeParams(method="cot", greedy=True, max_tokens=1)) == [THINK_OPEN]
        req = check_tools({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
                          runtime.model.chat_template())
        assert req.fmt == "deepseek_r1"
        params = DecodeParams(method="cot", greedy=True, max_tokens=200, max_think_tokens=10,
                              grammar=call_grammar(req))
        from selar_local.generate import stream_tokens

        events, stream = [], stream_tokens(runtime, prompt, params)
        while True:
            try:
                events.append(next(stream))
            except StopIteration as done:
                result = done.value
                break
        assert events[0].token == THINK_OPEN and result.think_tokens == 10 and result.reasoning
        assert result.finish_reason == "stop"
        content, calls = parse("deepseek_r1", result.content, req.tools)
        assert content == "" and len(calls) == 1
        assert_valid_calls(calls)
    finally:
        runtime.close()


def test_a_self_opened_span_then_json_and_a_call_through_the_server(self_opening_r1):
    class Short(BaseModel):
        name: str = Field(max_length=8)
        ok: bool

    with running_server(self_opening_r1, "--n-ctx", "1024") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        extra = {"method": "selar", "tau": 0.0, "max_think_tokens": 10}
        completion = client.chat.completions.parse(model="", messages=ASK, response_format=Short, max_tokens=200,
                                                   temperature=0, extra_body=extra)
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop" and isinstance(message.parsed, Short)
        assert message.model_extra["reasoning_content"]
        kwargs = dict(model="", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                      max_tokens=200, temperature=0, extra_body=extra)
        whole = client.chat.completions.create(**kwargs)
        call_message = whole.choices[0].message
        assert call_message.model_extra["reasoning_content"] and call_message.content is None
        assert_valid_calls(call_message.tool_calls)
        _assert_same_as_streamed(client, whole, **kwargs)


def test_streamed_calls_parse_with_the_schemas():
    s = StreamedCalls("qwen3_coder", TOOLS[1:])
    text = "<tool_call>\n<function=search>\n<parameter=query>\n42\n</parameter>\n</function>\n</tool_call>"
    assert s.push(text) == ""
    content, calls = s.finish()
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("search", '{"query": "42"}')]


def test_r1_round_trip_renders_the_call_and_its_result(r1_client, r1_vocab_path):
    """R1's template joins the arguments as text and leaves the turn open after tool results:
    the history reaches the prompt whole, closed, with the generation prompt after it."""
    from selar_local.chat import render_chat
    from selar_local.engine import LlamaModel
    from selar_local.tool_calls import check_history

    r = r1_client.chat.completions.create(model="", messages=ASK, tools=TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=200, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    history = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    from selar_local.runtime import chat_tokens

    model = LlamaModel(r1_vocab_path, vocab_only=True)
    try:
        prompt = render_chat(model, check_history(history))
        prompt_tokens = len(chat_tokens(model, prompt))
    finally:
        model.close()
    arguments = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    assert prompt == ("<｜begin▁of▁sentence｜><｜User｜>What is the weather in Paris?<｜Assistant｜>"
                      f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{call.function.name}\n"
                      f"```json\n{arguments}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
                      "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
                      "<｜end▁of▁sentence｜><｜Assistant｜>")
    answer = r1_client.chat.completions.create(model="", messages=history, tools=TOOLS, tool_choice="none",
                                               max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop") and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens == prompt_tokens  # the server rendered the same prompt


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "bad"}}])
def test_a_forced_call_on_a_schema_the_converter_cannot_handle_is_a_400(r1_client, choice):
    bad = {"type": "function", "function": {"name": "bad", "parameters": {
        "type": "object", "properties": {"x": {"type": "foo"}}}}}
    with pytest.raises(openai.BadRequestError) as info:
        r1_client.chat.completions.create(model="", messages=ASK, tools=[bad], tool_choice=choice, max_tokens=4)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == "tools"
    assert error["message"].startswith(f"tool_choice={'required' if choice == 'required' else 'bad'!r} needs a "
                                       "grammar of the tools' parameters: the JSON-Schema-to-grammar converter "
                                       "cannot handle this schema") and "Unrecognized schema" in error["message"]
    ok = r1_client.chat.completions.create(model="", messages=ASK, tools=[bad], max_tokens=2)  # auto: no grammar
    assert ok.choices[0].finish_reason in ("length", "stop")
