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


# ------------------------------------------------------------------ the test models' own templates
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def vocab_models(model_files):
    from selar_local.engine import LlamaModel

    models = {arch: LlamaModel(path, vocab_only=True) for arch, path in model_files.items()}
    yield models
    for model in models.values():
        model.close()


def test_smollm2_prompt_is_its_templates_string(vocab_models):
    from selar_local.chat import render_chat
    from selar_local.runtime import chat_tokens

    model = vocab_models["llama"]
    text = render_chat(model, USER)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert not model.add_bos and chat_tokens(model, text)[0] == model.single_token("<|im_start|>")
    system = render_chat(model, [{"role": "system", "content": "Be brief."}] + USER)
    assert system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in system


def test_qwen25_prompt_keeps_its_default_system_prompt_and_renders_tools(vocab_models):
    from selar_local.chat import render_chat

    model = vocab_models["qwen2"]
    assert render_chat(model, USER) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    tool = {"type": "function", "function": {"name": "add", "description": "a < b & ü",
                                             "parameters": {"type": "object"}}}
    text = render_chat(model, USER, tools=[tool])
    # transformers' tojson: plain JSON, non-ASCII kept, nothing HTML-escaped
    assert '\n<tools>\n{"type": "function", "function": {"name": "add", "description": "a < b & ü", ' in text


def test_gemma3_without_a_template_uses_llamas_gemma_format_with_one_bos(vocab_models):
    from selar_local.chat import render_chat
    from selar_local.runtime import chat_tokens

    model = vocab_models["gemma3"]
    assert model.chat_template() is None
    text = render_chat(model, USER)
    assert text == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    tokens = chat_tokens(model, text)
    assert model.add_bos and tokens[0] == model.bos_id and tokens.count(model.bos_id) == 1


def test_unrenderable_template_falls_back_to_the_builtin_engine(vocab_models, monkeypatch):
    from selar_local.chat import render_chat

    model = vocab_models["llama"]
    # Jinja rejects the unknown filter; llama.cpp's engine recognises ChatML by its markers.
    monkeypatch.setattr(model, "chat_template", lambda: "{{ messages | no_such_filter }}<|im_start|>")
    assert render_chat(model, USER) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_enable_thinking_and_generation_block_reach_the_template():
    from selar_local.chat import render_jinja_template

    # The end of Qwen3's template, and transformers' {% generation %} marker.
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% generation %}{{ m.content }}{% endgeneration %}"
                "<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
                "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
                "{%- endif %}{%- endif %}")
    on = render_jinja_template(template, USER)
    off = render_jinja_template(template, USER, enable_thinking=False)
    assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
