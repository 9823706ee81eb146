"""Tool calls: each format's parser, the template family detection, the streamed hold and
deltas, the request checks (exact, pure); then the real `openai` client against a real
`selar serve` on Qwen2.5-Coder-0.5B (whose template renders tools, Hermes format)."""
from __future__ import annotations

import json

import openai
import pytest

from selar_local.errors import InvalidParameterError
from selar_local.tool_calls import StreamedCalls, ToolCall, check_history, check_tools, detect_format, parse
from serve_helpers import running_server

ARGS = '{"city": "Paris", "days": 2}'
R1 = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
      '{"city": "Paris", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


@pytest.mark.parametrize("fmt, text, content", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
     "Sure."),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', ""),
    ("llama3", '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
     ""),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]', ""),
    ("deepseek_r1", R1, ""),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>", ""),
    ("gpt_oss", '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                '{"city": "Paris", "days": 2}<|call|>', ""),
])
def test_each_format_parses_to_one_call(fmt, text, content):
    got_content, calls = parse(fmt, text)
    assert (got_content, calls) == (content, [ToolCall("get_weather", ARGS)])


def test_a_gpt_oss_call_may_end_with_the_text_and_qwen3_coder_strings_stay_text():
    # <|call|> is an end-of-generation token in gpt-oss's vocabulary: not part of the output text
    assert parse("gpt_oss", '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
                            '<|message|>{"city": "Paris", "days": 2}') == ("", [ToolCall("get_weather", ARGS)])
    # ... and with its control tokens rendered as no text (the output text of gpt-oss's vocabulary)
    assert parse("gpt_oss", 'assistantcommentary to=functions.get_weather json{"city": "Paris", "days": 2}') == (
        "", [ToolCall("get_weather", ARGS)])
    text = ("<tool_call>\n<function=f>\n<parameter=code>\n123\n</parameter>\n<parameter=n>\n123\n</parameter>\n"
            "</function>\n</tool_call>")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"code": {"type": "string"}, "n": {"type": "integer"}}}}}]
    assert parse("qwen3_coder", text, tools) == ("", [ToolCall("f", '{"code": "123", "n": 123}')])
    assert parse("qwen3_coder", text) == ("", [ToolCall("f", '{"code": 123, "n": 123}')])  # no schemas: JSON


def test_two_calls_and_arguments_given_as_text():
    text = ('<tool_call>\n{"name": "a", "arguments": "{\\"x\\": 1}"}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    assert parse("hermes", text) == ("", [ToolCall("a", '{"x": 1}'), ToolCall("b", "{}")])
    mistral = '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}, "id": "abc123def"}, {"name": "b", "arguments": {}}]'
    assert parse("mistral", mistral) == ("", [ToolCall("a", '{"x": 1}', "abc123def"), ToolCall("b", "{}")])


@pytest.mark.parametrize("fmt, text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),        # never closed
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": 3}\n</tool_call>'),      # not an object
    ("hermes", '<tool_call>\n{"arguments": {}}\n</tool_call>'),                             # no name
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {'),
    ("deepseek_r1", R1.replace("<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "")),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis"),
    ("gpt_oss", '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1'),
    ("llama3", "The weather is nice."),
])
def test_an_unclosed_or_malformed_call_stays_content(fmt, text):
    assert parse(fmt, text) == (text, [])


@pytest.mark.parametrize("template, fmt", [
    ("{% if tools %}<tools>{% endif %}<tool_call>", "hermes"),
    ("<|start_header_id|>ipython<|end_header_id|>", "llama3"),
    ("[AVAILABLE_TOOLS][TOOL_CALLS]", "mistral"),
    ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>", "deepseek_r1"),
    ("<tool_call>\n<function=x>\n<parameter=y>", "qwen3_coder"),
    ("<|start|>assistant<|channel|>final<|message|>", "gpt_oss"),
    ("{{ messages }}", "hermes"),
])
def test_the_family_is_recognised_from_the_template(template, fmt):
    assert detect_format(template) == fmt


def test_streaming_holds_text_from_a_possible_call_and_releases_it_when_none_came():
    s = StreamedCalls("hermes")
    assert [s.push(t) for t in ("Hello", " <tool", "ing is fun")] == ["Hello", " ", ""]
    assert s.finish() == ("<tooling is fun", [])
    s = StreamedCalls("hermes")
    pieces = ["OK ", "<tool_call>\n", '{"name": "f", "arguments": {"q": "', 'long text here, longer than a piece"}}',
              "\n</tool_call>"]
    assert [s.push(p) for p in pieces] == ["OK ", "", "", "", ""]
    content, calls = s.finish()
    assert (content, calls) == ("", [ToolCall("f", '{"q": "long text here, longer than a piece"}')])
    deltas = StreamedCalls.deltas(calls)
    assert deltas[0]["index"] == 0 and deltas[0]["function"] == {"name": "f", "arguments": ""}
    assert deltas[0]["id"].startswith("call_") and deltas[0]["type"] == "function"
    assert all(set(d) == {"index", "function"} for d in deltas[1:]) and len(deltas) == 3
    assert "".join(d["function"]["arguments"] for d in deltas) == calls[0].arguments


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather of a city now",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@pytest.mark.parametrize("body, param, message", [
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name",
     "must be 1-64 letters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", "of type 'object'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "names 'nope', which is not among the tools (get_weather)"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "expected none, auto, required"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "listed twice"),
])
def test_bad_tools_are_refused_by_name(body, param, message):
    with pytest.raises(InvalidParameterError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        check_tools(body, "<tool_call>")
    assert info.value.param == param


def test_history_needs_a_call_for_each_tool_result():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    kept = check_history(history)
    assert kept[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # what templates read
    with pytest.raises(InvalidParameterError, match="tool_call_id 'c2' answers no earlier"):
        check_history(history[:2] + [{"role": "tool", "tool_call_id": "c2", "content": "sunny"}])


# ------------------------------------------------------------------ the real server

ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(model_files):
    with running_server(model_files["qwen2"], "--n-ctx", "2048") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("method", ["cot", "selar"])
def test_a_required_tool_call_and_its_round_trip(client, method):
    r = client.chat.completions.create(model="", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=60, seed=2, extra_body={"method": method})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    answer = client.chat.completions.create(model="", messages=history, tools=[WEATHER], tool_choice="none",
                                            max_tokens=30, seed=2, extra_body={"method": method})
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_the_history_reaches_the_template(model_files):
    from selar_local.runtime import Runtime

    rt = Runtime(model_files["qwen2"], n_ctx=512, n_threads=1)
    try:
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        text = rt.chat_prompt(ASK + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                     {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], tools=[WEATHER])
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
        assert "<tool_response>\nsunny\n</tool_response>" in text and '"name": "get_weather"' in text
    finally:
        rt.close()


def test_streamed_deltas_reassemble_to_the_non_streamed_call(client):
    kwargs = dict(model="", messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                if d.id:  # id and name come first, once
                    assert entry["arguments"] == "" and d.function.name
                entry["arguments"] += d.function.arguments or ""
    (call,) = whole.message.tool_calls
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(call.function.name, call.function.arguments)]
    assert calls[0]["id"].startswith("call_")


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="", messages=ASK, max_tokens=4, extra_body=extra)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="", max_tokens=4, messages=ASK + [
            {"role": "tool", "tool_call_id": "nope", "content": "x"}])
    assert info.value.body["param"] == "messages[1].tool_call_id"


def test_forced_calls_have_a_grammar_in_every_format():
    from selar_local.tool_grammar import call_grammar

    body = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    hermes = call_grammar(check_tools(body, "<tool_call>"))
    assert hermes.startswith('root ::= "<tool_call>\\n" call "\\n</tool_call>"\n') and "\ncall ::=" in hermes
    assert call_grammar(check_tools(body, "[TOOL_CALLS]")).startswith('root ::= "[TOOL_CALLS][" call "]"\n')
    assert call_grammar(check_tools({**body, "tool_choice": "auto"}, "<tool_call>")) is None
    r1 = call_grammar(check_tools(body, "<｜tool▁calls▁begin｜>"))
    assert r1.startswith('root ::= "<｜tool▁calls▁begin｜>" call "<｜tool▁calls▁end｜>"\ncall ::= tool0\n'
                         'tool0 ::= "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\\n```json\\n" args0-schema '
                         '"\\n```<｜tool▁call▁end｜>"\n')
    assert call_grammar(check_tools(body, "<|channel|>")).startswith(
        'root ::= "<|start|>assistant"? "<|channel|>commentary to=functions." (tool0)\n'
        'tool0 ::= "get_weather <|constrain|>json<|message|>" args0-schema\n')
    assert call_grammar(check_tools(body, "<function=x><parameter=y>")).startswith(
        'root ::= call\ncall ::= "<tool_call>\\n" (tool0) "</tool_call>"\n'
        't0p0-param ::= "<parameter=city>\\n" [^<\\n]{0,} "\\n</parameter>\\n"\n'
        'tool0 ::= "<function=get_weather>\\n" t0p0-param "</function>\\n"\n')
