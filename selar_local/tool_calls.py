"""Tool calls: the request's `tools`/`tool_choice` checked, the model's own tool-call syntax
recognised from its chat template (as llama.cpp's common/chat.cpp does, by the markers the
template uses) and parsed out of the answer into OpenAI's `tool_calls`. The grammar that
forces a call for `tool_choice` "required" or a named function: tool_grammar.py.

Formats: hermes (Hermes 2 Pro, Qwen2.5/Qwen3: <tool_call>{json}</tool_call>), llama3 (bare
JSON {"name", "parameters"}), mistral ([TOOL_CALLS][...]), deepseek_r1 (<｜tool▁call▁begin｜>
markers), qwen3_coder (<function=NAME><parameter=KEY>...), gpt_oss (<|channel|>commentary
to=functions.NAME ... <|message|>{json}<|call|>). An unclosed or unparsable call stays content.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from selar_local.errors import InvalidParameterError

FORMATS = ("hermes", "llama3", "mistral", "deepseek_r1", "qwen3_coder", "gpt_oss")
_R1_CALLS_BEGIN, _R1_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_R1_CALL_BEGIN, _R1_CALL_END, _R1_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
# where a call may start in the answer, per format (streaming holds text from here on)
CALL_STARTS = {"hermes": ("<tool_call>",), "qwen3_coder": ("<tool_call>", "<function="),
               "mistral": ("[TOOL_CALLS]",), "deepseek_r1": (_R1_CALLS_BEGIN, _R1_CALL_BEGIN),
               "gpt_oss": ("<|channel|>commentary to=", " to=functions."), "llama3": ("{", "<|python_tag|>")}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = ""

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def detect_format(template: str | None) -> str:
    """The tool-call family of a chat template, by its markers (hermes where none is known)."""
    t = template or ""
    if "<|channel|>" in t:
        return "gpt_oss"
    if "<function=" in t and "<parameter=" in t:
        return "qwen3_coder"
    if "<tool_call>" in t:
        return "hermes"
    if _R1_CALLS_BEGIN in t:
        return "deepseek_r1"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|start_header_id|>" in t and ("ipython" in t or "<|python_tag|>" in t):
        return "llama3"
    return "hermes"


# ------------------------------------------------------------------------- parsing


def _arguments(value: Any) -> str | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _json_call(obj: Any, args_key: str = "arguments") -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = _arguments(obj.get(args_key, obj.get("arguments", obj.get("parameters", {}))))
    return ToolCall(obj["name"], args, str(obj.get("id") or "")) if args is not None else None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse(fmt: str, text: str, tools: Sequence[Mapping] = ()) -> tuple[str, list[ToolCall]]:
    """(content, calls) of an answer. Text around the calls stays content; a call that
    does not close or does not parse leaves the whole text as content. `tools` (OpenAI
    tool objects) tell qwen3_coder's parser which parameters are strings (raw text)."""
    if fmt == "qwen3_coder":
        calls, content = _qwen3_coder(text, _string_parameters(tools))
    else:
        calls, content = _PARSERS[fmt](text)
    return (text, []) if calls is None else (content, calls)


def _hermes(text: str):
    pattern = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
    found = list(pattern.finditer(text))
    if not found or "<tool_call>" in pattern.sub("", text):
        return None, text
    calls = [_json_call(_loads(m.group(1))) for m in found]
    return (None, text) if None in calls else (calls, pattern.sub("", text).strip())


def _llama3(text: str):
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    parts = [p for p in re.split(r";\s*(?=\{)", body)] if body.startswith("{") else []
    calls = [_json_call(_loads(p), "parameters") for p in parts]
    return (None, text) if not calls or None in calls else (calls, "")


def _mistral(text: str):
    head, sep, tail = text.partition("[TOOL_CALLS]")
    if not sep:
        return None, text
    tail = tail.strip()
    decoded, end = _raw_decode(tail)
    items = decoded if isinstance(decoded, list) else None
    calls = [_json_call(i) for i in items] if items else None
    return (None, text) if not calls or None in calls else (calls, (head + tail[end:]).strip())


def _raw_decode(text: str):
    try:
        return json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None, 0


def _deepseek_r1(text: str):
    pattern = re.compile(re.escape(_R1_CALL_BEGIN) + r"(?:function)?" + re.escape(_R1_SEP)
                         + r"([^\n]+)\n```(?:json)?\n(.*?)\n```\s*" + re.escape(_R1_CALL_END), re.S)
    found = list(pattern.finditer(text))
    if not found:
        return None, text
    rest = pattern.sub("", text).replace(_R1_CALLS_BEGIN, "").replace(_R1_CALLS_END, "")
    if _R1_CALL_BEGIN in rest:
        return None, text
    calls = [ToolCall(m.group(1).strip(), _arguments(m.group(2))) if _arguments(m.group(2)) else None
             for m in found]
    return (None, text) if None in calls else (calls, rest.strip())


def _string_parameters(tools: Sequence[Mapping]) -> dict[str, set[str]]:
    """function name -> its parameters whose schema is a plain string."""
    out = {}
    for tool in tools:
        fn = tool.get("function", {})
        props = (fn.get("parameters") or {}).get("properties", {})
        out[fn.get("name")] = {k for k, v in props.items() if isinstance(v, Mapping) and v.get("type") == "string"}
    return out


def _qwen3_coder(text: str, strings: Mapping[str, set[str]] | None = None):
    pattern = re.compile(r"(?:<tool_call>\s*)?<function=([^>\n]+)>(.*?)</function>(?:\s*</tool_call>)?", re.S)
    found = list(pattern.finditer(text))
    if not found or "<function=" in pattern.sub("", text):
        return None, text
    calls = []
    for m in found:
        name, args = m.group(1).strip(), {}
        raw = (strings or {}).get(name, set())
        for p in re.finditer(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", m.group(2), re.S):
            key, value = p.group(1).strip(), p.group(2)
            parsed = None if key in raw else _loads(value)  # a string parameter is its raw text
            args[key] = value if parsed is None else parsed
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    return calls, pattern.sub("", text).strip()


def _gpt_oss(text: str):
    # The call ends with <|call|>, or with the text: in gpt-oss's own vocabulary <|call|> is an
    # end-of-generation token, which ends the output without being part of it. Its control
    # tokens may render as no text at all, so each marker is optional before the JSON.
    pattern = re.compile(r"(?:(?:<\|start\|>)?assistant)?(?:(?:<\|channel\|>)?commentary)?\s*to=functions\.([\w.-]+)"
                         r"[^<{]*(?:<\|constrain\|>\w*)?(?:<\|message\|>)?(\{.*?)(?:<\|call\|>|\Z)", re.S)
    found = list(pattern.finditer(text))
    if not found:
        return None, text
    calls = [ToolCall(m.group(1), _arguments(m.group(2))) if _arguments(m.group(2)) else None for m in found]
    return (None, text) if None in calls else (calls, pattern.sub("", text).strip())


_PARSERS = {"hermes": _hermes, "llama3": _llama3, "mistral": _mistral, "deepseek_r1": _deepseek_r1,
            "qwen3_coder": _qwen3_coder, "gpt_oss": _gpt_oss}


# ------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools, checked: the OpenAI tool objects (for the template), what the
    model must do (none / auto / required / the name of one function), and the format."""

    tools: tuple[dict, ...]
    choice: str
    parallel: bool
    fmt: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)


def _bad(message: str, param: str) -> InvalidParameterError:
    from selar_local.openai_schema import RequestError

    return RequestError(message, param=param, code="invalid_value")


def check_tools(body: Mapping[str, Any], template: str | None) -> ToolRequest | None:
    """The request's tools, or None when it has none. Raises a 400 RequestError for a tool
    without a name, a parameters schema that is not an object, or a tool_choice naming no
    listed tool."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise _bad(f"tool_choice={choice!r} needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of {type: function, function: {...}} objects", "tools")
    checked, names = [], []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise _bad(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'; got {name!r}",
                       f"tools[{i}].function.name")
        if name in names:
            raise _bad(f"tools[{i}]: the function name {name!r} is listed twice", f"tools[{i}].function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise _bad(f"tools[{i}].function.parameters must be a JSON Schema of type 'object'",
                       f"tools[{i}].function.parameters")
        names.append(name)
        checked.append({"type": "function", "function": {**fn, "parameters": dict(params)}})
    if choice is None:
        choice = "auto"
    elif isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise _bad(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                       "tool_choice")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise _bad(f"tool_choice={choice!r}: expected none, auto, required or {{'type': 'function', "
                   "'function': {'name': ...}}", "tool_choice")
    return ToolRequest(tuple(checked), choice, parallel, detect_format(template))


def check_history(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Assistant tool_calls and tool results in the history, checked and kept in the form
    chat templates read (arguments as an object, as transformers' templates expect)."""
    out, open_ids = [], set()
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
            kept = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, Mapping) else None
                args = _arguments(fn.get("arguments", "{}")) if isinstance(fn, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or args is None:
                    raise _bad(f"messages[{i}].tool_calls[{j}] needs function.name and function.arguments "
                               "(a JSON object as text)", f"messages[{i}].tool_calls[{j}]")
                call_id = str(call.get("id") or "")
                open_ids.add(call_id)
                kept.append({"id": call_id, "type": "function",
                             "function": {"name": fn["name"], "arguments": json.loads(args)}})
            m["tool_calls"] = kept
            if not m.get("content"):  # a call-only turn: templates test `content is none` (R1's)
                m["content"] = None
        elif m.get("role") == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in open_ids:
                raise _bad(f"messages[{i}] is a tool result whose tool_call_id {call_id!r} answers no earlier "
                           "assistant tool call", f"messages[{i}].tool_call_id")
        out.append(m)
    return out


class StreamedCalls:
    """One streamed choice's content with tools on: text is passed on until a call may be
    starting (a start marker, or the start of one at the end), then held; at the end the
    held text is parsed into calls (or released as content)."""

    ARGUMENT_PIECE = 24  # characters of function.arguments per streamed delta

    def __init__(self, fmt: str, tools: Sequence[Mapping] = ()):
        self.fmt = fmt
        self.tools = tools
        self.starts = CALL_STARTS[fmt]
        self.held = ""
        self.shown = ""

    def push(self, text: str) -> str:
        """The part of `text` that can be shown now."""
        if self.held:
            self.held += text
            return ""
        whole = text
        cut = min((i for i in (whole.find(s) for s in self.starts) if i >= 0), default=-1)
        if cut < 0:  # hold a suffix that may begin a marker
            cut = next((len(whole) - k for k in range(min(len(whole), max(map(len, self.starts))), 0, -1)
                        if any(s.startswith(whole[-k:]) for s in self.starts)), len(whole))
        self.held, out = whole[cut:], whole[:cut]
        self.shown += out
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to show, calls) once the choice has ended."""
        content, calls = parse(self.fmt, self.shown + self.held, self.tools)
        if not calls:
            return self.held, []
        return content[len(self.shown):] if content.startswith(self.shown) else "", calls

    @classmethod
    def deltas(cls, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
        """OpenAI's streamed tool_calls deltas: id, type and name first, then the arguments
        in pieces, each carrying the call's index."""
        out = []
        for index, call in enumerate(calls):
            full = call.as_openai()
            out.append({"index": index, "id": full["id"], "type": "function",
                        "function": {"name": call.name, "arguments": ""}})
            for i in range(0, len(call.arguments), cls.ARGUMENT_PIECE):
                out.append({"index": index, "function": {"arguments": call.arguments[i:i + cls.ARGUMENT_PIECE]}})
        return out
