"""Chat templates llama.cpp's built-in engine does not recognise, rendered from the
model's own Jinja source in a sandbox (as transformers and llama-cpp-python do)."""
from __future__ import annotations

from typing import Sequence

from selar_local.errors import ModelLoadError


def render_jinja_template(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                          bos_token: str = "", eos_token: str = "") -> str:
    if not template:
        raise ModelLoadError("the model has no chat template; send a raw prompt instead")
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # jinja2 comes with llama-cpp-python; guard anyway
        raise ModelLoadError("rendering this model's chat template needs jinja2 (pip install jinja2)") from exc

    def raise_exception(message: str):  # templates call this to reject a conversation
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token,
        )
    except TemplateError as exc:
        raise ModelLoadError(f"the model's chat template rejected the conversation: {exc}") from exc
