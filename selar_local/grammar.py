"""What a constrained answer may be: GBNF text from a grammar or a JSON Schema.

JSON Schema goes to GBNF through llama-cpp-python's own converter
(`llama_cpp.llama_grammar.json_schema_to_gbnf`); the GBNF is parsed by llama.cpp's grammar
sampler (engine.GrammarSampler), which reports the parse errors.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from selar_local.errors import InvalidParameterError

# response_format {"type": "json_object"}: any JSON object, as OpenAI's JSON mode.
JSON_OBJECT_SCHEMA = {"type": "object"}
MAX_GRAMMAR_CHARS = 200_000


def _schema_value(schema):
    """A JSON Schema given as a dict (or a bool) or as its JSON text, as a value."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidParameterError(f"json_schema: not valid JSON ({exc})") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidParameterError(f"json_schema: expected a JSON Schema object, got {type(schema).__name__}")
    return schema


# llama-cpp-python's converter lets raw control characters into JSON strings, which JSON
# forbids (a raw newline makes the text unparsable); llama.cpp's own converter excludes them.
_LENIENT_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def _strict_strings(gbnf: str) -> str:
    return gbnf.replace(_LENIENT_CHAR, _JSON_CHAR)


def schema_to_gbnf(schema) -> str:
    """GBNF for a JSON Schema (a dict, or its JSON text). A schema the converter cannot
    handle -> InvalidParameterError naming the problem."""
    schema = _schema_value(schema)
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return _strict_strings(json_schema_to_gbnf(json.dumps(schema)))
    except RecursionError:
        raise InvalidParameterError("json_schema: the schema nests too deeply to convert") from None
    except Exception as exc:  # the converter raises ValueError, KeyError, TypeError, AssertionError...
        raise InvalidParameterError(f"json_schema: the JSON-Schema-to-grammar converter cannot handle this "
                                    f"schema ({type(exc).__name__}: {exc})") from None


def schema_rules(schemas: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """GBNF rules for several JSON Schemas at once (one converter, so their shared rules
    such as `string` or `space` appear once), to be wrapped by a grammar of the caller's:
    returns {key: the rule name of that schema} and the rules' text (no `root`)."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    names = {}
    try:
        for key, schema in schemas.items():
            schema = converter.resolve_refs(_schema_value(schema), "stdin")
            names[key] = converter.visit(schema, f"{key}-schema")
    except InvalidParameterError:
        raise
    except RecursionError:
        raise InvalidParameterError("json_schema: the schema nests too deeply to convert") from None
    except Exception as exc:  # as schema_to_gbnf
        raise InvalidParameterError(f"json_schema: the JSON-Schema-to-grammar converter cannot handle this "
                                    f"schema ({type(exc).__name__}: {exc})") from None
    return names, _strict_strings(converter.format_grammar())


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def canonical_schema(schema) -> str:
    """A JSON Schema as canonical JSON text (hashable, comparable)."""
    schema = _schema_value(schema)
    try:
        return json.dumps(schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"json_schema: not JSON-serialisable ({exc})") from None


def check_gbnf_text(gbnf) -> str:
    """The checks that need no model: a non-empty string of bounded size. Parsing is
    llama.cpp's (GrammarSampler raises on a syntax error)."""
    if not isinstance(gbnf, str) or not gbnf.strip():
        raise InvalidParameterError("grammar: expected non-empty GBNF text")
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise InvalidParameterError(f"grammar: at most {MAX_GRAMMAR_CHARS} characters")
    if "root" not in gbnf:
        raise InvalidParameterError("grammar: the GBNF has no `root` rule (generation starts there)")
    return gbnf


def sampler_for(model, params):
    """llama.cpp's grammar sampler for `params`' constraint on `model`'s vocabulary, or None."""
    gbnf = params.constraint_gbnf()
    if gbnf is None:
        return None
    from selar_local.engine import GrammarSampler

    return GrammarSampler(model, gbnf)
