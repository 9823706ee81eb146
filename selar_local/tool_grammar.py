"""The grammar that forces a tool call (`tool_choice` "required" or a named function), in
the syntax of the model's format: the format's markers around the arguments' JSON-Schema
grammar, which comes from llama-cpp-python's converter (grammar.schema_rules). After
llama.cpp's common/chat.cpp, which builds one such grammar per format.

What each format's grammar produces (one call, or several where `parallel_tool_calls`):
- hermes       <tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>
- llama3       {"name": N, "parameters": {...}}
- mistral      [TOOL_CALLS][{"name": N, "arguments": {...}}, ...]
- deepseek_r1  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>N\\n```json\\n{...}\\n```
               <｜tool▁call▁end｜> (more calls after a newline) <｜tool▁calls▁end｜>
- qwen3_coder  <tool_call>\\n<function=N>\\n<parameter=K>\\nV\\n</parameter>\\n...</function>\\n</tool_call>
               (a string parameter's value is raw text, others JSON, as the template writes them)
- gpt_oss      <|start|>assistant? <|channel|>commentary to=functions.N <|constrain|>json<|message|>{...}
               (the call ends with the model's <|call|>, an end-of-generation token)
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from selar_local.errors import InvalidParameterError
from selar_local.grammar import gbnf_literal, schema_rules, schema_to_gbnf

# A raw-text parameter value (qwen3_coder): no newline and no '<', so it cannot run into the
# closing tag; bounded by the schema's minLength/maxLength where it has them.
RAW_TEXT_CHAR = "[^<\\n]"


def call_grammar(req) -> str | None:
    """GBNF forcing a call for `req` (tool_calls.ToolRequest); None when no call is forced."""
    if req.choice in ("none", "auto"):
        return None
    tools = [t["function"] for t in req.tools if req.choice == "required" or t["function"]["name"] == req.choice]
    try:
        return _BUILDERS[req.fmt](tools, req.parallel)
    except InvalidParameterError as exc:  # a parameters schema the converter cannot handle
        from selar_local.openai_schema import RequestError

        message = str(exc).removeprefix("json_schema: ")
        raise RequestError(f"tool_choice={req.choice!r} needs a grammar of the tools' parameters: {message}",
                           param="tools", code="invalid_value") from None


def _json_call_rules(tools, args_key: str) -> str:
    """`call ::=` a JSON object {"name": one of the tools, args_key: its arguments}."""
    options = [{"type": "object", "properties": {"name": {"const": t["name"]}, args_key: t["parameters"]},
                "required": ["name", args_key], "additionalProperties": False} for t in tools]
    gbnf = schema_to_gbnf(options[0] if len(options) == 1 else {"anyOf": options})
    return re.sub(r"^root ::=", "call ::=", gbnf, flags=re.M)


def _hermes(tools, parallel: bool) -> str:
    block = '"<tool_call>\\n" call "\\n</tool_call>"'
    more = f' ("\\n" {block})*' if parallel else ""
    return f"root ::= {block}{more}\n" + _json_call_rules(tools, "arguments")


def _llama3(tools, parallel: bool) -> str:
    return "root ::= call\n" + _json_call_rules(tools, "parameters")


def _mistral(tools, parallel: bool) -> str:
    more = ' ("," call)*' if parallel else ""
    return f'root ::= "[TOOL_CALLS][" call{more} "]"\n' + _json_call_rules(tools, "arguments")


def _per_tool(tools, head, tail: str = "") -> tuple[list[str], str]:
    """One rule per tool, `head(name)` + its arguments' schema rule + `tail`; and the
    converter's rules they use."""
    names, rules = schema_rules({f"args{i}": t["parameters"] for i, t in enumerate(tools)})
    lines = [f"tool{i} ::= {head(t['name'])} {names[f'args{i}']}{tail}" for i, t in enumerate(tools)]
    return [f"tool{i}" for i in range(len(tools))], "\n".join(lines) + "\n" + rules


def _deepseek_r1(tools, parallel: bool) -> str:
    def head(name):
        return gbnf_literal(f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n")

    heads, rules = _per_tool(tools, head, " " + gbnf_literal("\n```<｜tool▁call▁end｜>"))
    more = ' ("\\n" call)*' if parallel else ""
    return (f'root ::= "<｜tool▁calls▁begin｜>" call{more} "<｜tool▁calls▁end｜>"\n'
            f"call ::= {' | '.join(heads)}\n" + rules)


def _gpt_oss(tools, parallel: bool) -> str:
    # One call per message in harmony: the model ends it with <|call|> (end of generation).
    heads, rules = _per_tool(tools, lambda name: gbnf_literal(f"{name} <|constrain|>json<|message|>"))
    return (f'root ::= "<|start|>assistant"? "<|channel|>commentary to=functions." ({" | ".join(heads)})\n'
            + rules)


def _raw_text(schema: Mapping[str, Any]) -> str | None:
    """A raw-text GBNF for a string parameter (its enum or const values as they are, else
    characters within minLength..maxLength; pattern and format are not enforced); None
    where the value is JSON."""
    if schema.get("type") != "string":
        return None
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values is not None:
        return "(" + " | ".join(gbnf_literal(str(v)) for v in values) + ")"
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    return f"{RAW_TEXT_CHAR}{{{low},{'' if high is None else int(high)}}}"


def _qwen3_coder(tools, parallel: bool) -> str:
    values, schemas = {}, {}  # "t{i}p{j}" -> a raw-text rule, or a schema for the converter
    for i, tool in enumerate(tools):
        for j, prop in enumerate(tool["parameters"].get("properties", {}).values()):
            raw = _raw_text(prop) if isinstance(prop, Mapping) else None
            if raw is None:
                schemas[f"t{i}p{j}"] = prop
            else:
                values[f"t{i}p{j}"] = raw
    names, rules = schema_rules(schemas)
    values.update(names)
    lines, heads = [], []
    for i, tool in enumerate(tools):
        required = set(tool["parameters"].get("required", []))
        parts = []
        for j, key in enumerate(tool["parameters"].get("properties", {})):
            open_tag, close_tag = gbnf_literal(f"<parameter={key}>\n"), gbnf_literal("\n</parameter>\n")
            lines.append(f"t{i}p{j}-param ::= {open_tag} {values[f't{i}p{j}']} {close_tag}")
            parts.append(f"t{i}p{j}-param" + ("" if key in required else "?"))
        function_open, function_close = gbnf_literal(f"<function={tool['name']}>\n"), gbnf_literal("</function>\n")
        lines.append(f"tool{i} ::= {function_open} {' '.join(parts)} {function_close}")
        heads.append(f"tool{i}")
    more = ' ("\\n" call)*' if parallel else ""
    return (f"root ::= call{more}\n"
            f'call ::= "<tool_call>\\n" ({" | ".join(heads)}) "</tool_call>"\n' + "\n".join(lines) + "\n" + rules)


_BUILDERS = {"hermes": _hermes, "llama3": _llama3, "mistral": _mistral, "deepseek_r1": _deepseek_r1,
             "qwen3_coder": _qwen3_coder, "gpt_oss": _gpt_oss}
