"""Chat prompts as the model defines them: the GGUF's own Jinja template rendered in a
sandbox with the variables templates expect (what transformers' `apply_chat_template` and
`llama-server --jinja` do), llama.cpp's built-in template engine only as a fallback.

The environment follows transformers': `trim_blocks`/`lstrip_blocks`, the loop-control
extension, a `tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`, and
the `{% generation %}` block (rendered as its body). Templates read `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `tools` and whatever keyword arguments
the caller passes (`enable_thinking` for Qwen3-style templates, as llama-server's
`chat_template_kwargs`).
"""
from __future__ import annotations

import datetime
import json
from functools import lru_cache
from typing import Any, Mapping, Sequence

from selar_local.errors import ModelLoadError


class TemplateRejected(ModelLoadError):
    """The template itself refused the conversation (it called raise_exception)."""


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise TemplateRejected(f"the model's chat template rejected the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """transformers marks assistant text with {% generation %}...{% endgeneration %}
        (for training masks); for rendering it is just its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def compile_template(template: str):
    """The compiled Jinja template (compiling a long template costs milliseconds)."""
    return _environment().from_string(template)


def render_jinja_template(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                          bos_token: str = "", eos_token: str = "", tools: Sequence[Mapping] | None = None,
                          **template_kwargs: Any) -> str:
    """Render a chat template. Raises TemplateRejected when the template refuses the
    conversation and ModelLoadError when it cannot be rendered at all."""
    if not template:
        raise ModelLoadError("the model has no chat template; send a raw prompt instead")
    from jinja2 import TemplateError

    variables = dict(template_kwargs)
    variables.update(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                     bos_token=bos_token, eos_token=eos_token)
    if tools:
        variables["tools"] = list(tools)
    try:
        return compile_template(template).render(**variables)
    except TemplateRejected:
        raise
    except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise ModelLoadError(f"the model's chat template could not be rendered: {type(exc).__name__}: {exc}") from exc


def render_chat(model, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                tools: Sequence[Mapping] | None = None, template_kwargs: Mapping[str, Any] | None = None) -> str:
    """`model`'s chat prompt for `messages`: its own Jinja template first; llama.cpp's
    built-in engine when the model has no template or Jinja cannot render it (the
    built-in engine knows neither tools nor template keyword arguments).

    A last message from the assistant is a prefill, as llama-server treats it: the
    conversation before it gets the generation prompt, then its text follows verbatim
    and the model continues it (e.g. "<think>\n" to start inside the thinking span)."""
    if add_generation_prompt and len(messages) > 1 and messages[-1].get("role") == "assistant":
        head = render_chat(model, messages[:-1], add_generation_prompt=True, tools=tools,
                           template_kwargs=template_kwargs)
        return head + (messages[-1].get("content") or "")
    template = model.chat_template()
    error: ModelLoadError | None = None
    if template:
        try:
            return _after_tool_turns(template, render_jinja_template(
                template, messages, add_generation_prompt=add_generation_prompt,
                bos_token=model.token_text(model.bos_id) if model.bos_id >= 0 else "",
                eos_token=model.token_text(model.eos_id) if model.eos_id >= 0 else "",
                tools=tools, **dict(template_kwargs or {}),
            ), add_generation_prompt)
        except TemplateRejected:
            raise
        except ModelLoadError as exc:
            error = exc
        if _has_object_arguments(messages):  # templates that join arguments as text (R1's)
            return render_chat(model, _arguments_as_text(messages), add_generation_prompt=add_generation_prompt,
                               tools=tools, template_kwargs=template_kwargs)
    text = model.apply_builtin_chat_template(
        [{"role": m["role"], "content": m.get("content") or ""} for m in messages],
        add_generation_prompt=add_generation_prompt)
    if text is None:
        raise error or ModelLoadError(f"llama.cpp's built-in chat templates do not know this model's template "
                                      f"({model.architecture}); send a raw prompt instead")
    return text


def _has_object_arguments(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(isinstance(c.get("function", {}).get("arguments"), Mapping)
               for m in messages for c in (m.get("tool_calls") or ()))


def _arguments_as_text(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The history with tool-call arguments as JSON text instead of objects (as llama.cpp's
    minja tries both for templates that concatenate them)."""
    import json

    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(
                c["function"]["arguments"], ensure_ascii=False)}} if isinstance(
                c.get("function", {}).get("arguments"), Mapping) else c for c in m["tool_calls"]]
        out.append(m)
    return out


_R1_TOOL_OUTPUTS = "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"


def _after_tool_turns(template: str, text: str, add_generation_prompt: bool) -> str:
    """DeepSeek R1's official template leaves the conversation open after tool results (no
    end of turn, no generation prompt) and a call block unclosed before them; close both,
    as llama.cpp's common/chat.cpp does for that template."""
    if _R1_TOOL_OUTPUTS not in template:
        return text
    import re

    text = re.sub(r"(<｜tool▁call▁end｜>)\s*(<｜tool▁outputs▁begin｜>|<｜User｜>)",
                  r"\1<｜tool▁calls▁end｜><｜end▁of▁sentence｜>\2", text)
    if text.endswith("<｜tool▁outputs▁end｜>"):
        text += "<｜end▁of▁sentence｜>" + ("<｜Assistant｜>" if add_generation_prompt else "")
    return text
