"""Structured output on the OpenAI-compatible API: `response_format` (OpenAI's JSON mode
and `json_schema`), beside llama-server's own `grammar` and `json_schema` fields, turned
into DecodeParams' constraint and checked against the model's vocabulary up front, so a
bad grammar is a 400 before anything is queued."""
from __future__ import annotations

from typing import Any, Mapping

from selar_local.errors import InvalidParameterError
from selar_local.grammar import JSON_OBJECT_SCHEMA, sampler_for

_TYPES = ("text", "json_object", "json_schema")


def constraint_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """DecodeParams fields (`json_schema`) for the request's `response_format`; {} for none
    or "text". Raises RequestError-shaped InvalidParameterError on a malformed one."""
    fmt = body.get("response_format")
    if fmt is None:
        return {}
    from selar_local.openai_schema import RequestError

    if not isinstance(fmt, Mapping) or fmt.get("type") not in _TYPES:
        raise RequestError(f"invalid response_format={fmt!r}: expected an object whose type is one of "
                           f"{', '.join(_TYPES)}", param="response_format", code="invalid_value")
    kind = fmt["type"]
    if kind == "text":
        return {}
    if body.get("grammar") is not None or body.get("json_schema") is not None:
        raise RequestError("response_format cannot go with grammar or json_schema: give one constraint",
                           param="response_format", code="invalid_value")
    if kind == "json_object":
        return {"json_schema": JSON_OBJECT_SCHEMA}
    spec = fmt.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name", ""), str):
        raise RequestError("response_format json_schema needs a 'json_schema' object ({'name': ..., 'schema': "
                           "{...}, 'strict': true})", param="response_format", code="invalid_value")
    schema = spec.get("schema", {})
    if not isinstance(schema, Mapping):
        raise RequestError("response_format json_schema: 'schema' must be a JSON Schema object",
                           param="response_format", code="invalid_value")
    return {"json_schema": dict(schema) if schema else JSON_OBJECT_SCHEMA}


def check_constraint(model, params) -> None:
    """Parse the request's grammar on the model's vocabulary now (llama.cpp's parser)."""
    from selar_local.openai_schema import RequestError

    try:
        sampler = sampler_for(model, params)
    except InvalidParameterError as exc:
        param = "grammar" if params.grammar is not None else "json_schema"
        raise RequestError(str(exc), param=param, code="invalid_value") from exc
    if sampler is not None:
        sampler.close()


def with_tool_grammar(params, tools):
    """tool_choice required / a named function: the answer is constrained to a call."""
    from selar_local.tool_grammar import call_grammar

    gbnf = call_grammar(tools) if tools is not None else None
    if gbnf is None:
        return params
    if params.grammar is not None or params.json_schema is not None:
        from selar_local.openai_schema import RequestError

        raise RequestError(f"tool_choice={tools.choice!r} constrains the answer already: it cannot go with "
                           "grammar, json_schema or response_format", param="tool_choice", code="invalid_value")
    return params.replace(grammar=gbnf)
