"""Chat-template fallback rendering (no llama.cpp needed)."""
import pytest


def test_jinja_chat_template_fallback():
    from selar_local.chat import render_jinja_template
    from selar_local.errors import ModelLoadError

    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    text = render_jinja_template(template, [{"role": "user", "content": "hi"}], bos_token="<s>")
    assert text == "<s>[user] hi\n[assistant] "
    with pytest.raises(ModelLoadError, match="rejected"):
        render_jinja_template("{{ raise_exception('no system role') }}", [])
    with pytest.raises(ModelLoadError, match="no chat template"):
        render_jinja_template("", [])
