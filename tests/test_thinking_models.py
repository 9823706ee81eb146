"""The thinking path end to end on a real thinking tokenizer and template (DeepSeek-R1-
Distill-Qwen's, from the vocab-only GGUF) and a tiny random-weight qwen2 model carrying
them: span tracking by token id, thinking-only gating, the thinking budget, Cold Stop,
reasoning_content in the API and the server, and the CLI's display."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from selar_local.engine import LlamaModel
from selar_local.params import DecodeParams

THINK_OPEN, THINK_CLOSE = 151648, 151649
R1_BOS = "<｜begin▁of▁sentence｜>"
QUESTION = "What is 2 + 3?"


@pytest.fixture(scope="module")
def r1_vocab(r1_vocab_path):
    model = LlamaModel(r1_vocab_path, vocab_only=True)
    yield model
    model.close()


@pytest.fixture(scope="module")
def tiny_r1(tiny_model):
    from selar_local.runtime import Runtime

    runtime = Runtime(tiny_model("qwen2-r1"), n_ctx=256, n_parallel=2, n_threads=1)
    yield runtime
    runtime.close()


def _run(runtime, prompt_tokens, **params):
    from selar_local.generate import stream_tokens

    events, stream = [], stream_tokens(runtime, prompt_tokens, DecodeParams(**params))
    while True:
        try:
            events.append(next(stream))
        except StopIteration as done:
            return events, done.value


def test_vocab_only_r1_file_is_the_checked_build(r1_vocab_path, r1_vocab):
    import build_r1_vocab

    assert hashlib.sha256(r1_vocab_path.read_bytes()).hexdigest() == build_r1_vocab.SHA256
    assert r1_vocab.architecture == "qwen2" and r1_vocab.n_vocab == 152064
    assert r1_vocab.single_token("<think>") == THINK_OPEN and r1_vocab.single_token("</think>") == THINK_CLOSE


def test_r1_prompt_is_the_templates_own_string(r1_vocab):
    from selar_local.chat import render_chat
    from selar_local.runtime import chat_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    text = render_chat(r1_vocab, messages)
    assert text == f"{R1_BOS}Be brief.<｜User｜>{QUESTION}<｜Assistant｜>"
    tokens = chat_tokens(r1_vocab, text)
    assert tokens[0] == r1_vocab.bos_id and tokens.count(r1_vocab.bos_id) == 1  # no double BOS
    # An assistant turn in the history keeps only what follows </think> (the template's rule).
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello"},
               {"role": "user", "content": QUESTION}]
    assert render_chat(r1_vocab, history) == (f"{R1_BOS}<｜User｜>Hi<｜Assistant｜>\n\nHello<｜end▁of▁sentence｜>"
                                              f"<｜User｜>{QUESTION}<｜Assistant｜>")
    # A last assistant message is a prefill: the model continues it.
    prefill = render_chat(r1_vocab, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "<think>\n"}])
    assert prefill == f"{R1_BOS}<｜User｜>{QUESTION}<｜Assistant｜><think>\n"


def test_runtime_finds_the_markers_and_the_open_span(tiny_r1):
    span = tiny_r1.thinking_span
    assert span.open_ids == (THINK_OPEN,) and span.close_ids == (THINK_CLOSE,)
    assert tiny_r1.token_info.think_open == THINK_OPEN and tiny_r1.token_info.think_close == THINK_CLOSE
    assert tiny_r1.self_check.passed and tiny_r1.self_check.max_abs_diff == 0.0
    user = [{"role": "user", "content": QUESTION}]
    assert tiny_r1.thinking_at_end(tiny_r1.encode(messages=user)) is False
    assert tiny_r1.thinking_at_end(tiny_r1.encode(messages=user + [{"role": "assistant", "content": "<think>\n"}]))


def test_budget_closes_the_span_at_n_and_gates_soft_steps_inside_only(tiny_r1):
    prompt = tiny_r1.encode(messages=[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "<think>\n"}])
    events, result = _run(tiny_r1, prompt, method="selar", tau=0.0, thinking_only=True, max_think_tokens=16,
                          max_tokens=28, seed=3, ignore_eos=True)
    tokens = [e.token for e in events]
    assert tokens[16] == THINK_CLOSE and THINK_CLOSE not in tokens[:16]  # closed at exactly 16
    assert result.think_tokens == 16 and result.answer is not None
    assert [e.thinking for e in events] == [True] * 17 + [False] * (len(events) - 17)
    soft = [e.index for e in events if e.soft]
    # tau = 0 opens the gate on every step inside the span (math symbols excepted), never outside
    assert soft and all(i < 16 for i in soft)
    # the streamed deltas are the final split; markers are in neither
    assert "".join(e.reasoning for e in events).strip() == result.reasoning
    assert "".join(e.content for e in events).strip() == result.answer
    assert "</think>" not in result.reasoning + result.answer and "</think>" in result.text


def test_without_thinking_only_soft_steps_continue_after_the_span(tiny_r1):
    prompt = tiny_r1.encode(messages=[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "<think>\n"}])
    events, _ = _run(tiny_r1, prompt, method="selar", tau=0.0, max_think_tokens=4, max_tokens=16, seed=3,
                     ignore_eos=True)
    assert any(e.soft and not e.thinking for e in events[6:])


def test_cold_stop_emits_the_close_marker(tiny_r1):
    prompt = tiny_r1.encode(messages=[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "<think>\n"}])
    # An entropy threshold above any entropy: every step counts as confident, so Cold Stop
    # fires after cold_stop_steps soft steps and the loop emits </think> then "\n\n".
    events, result = _run(tiny_r1, prompt, method="soft", cold_stop_entropy=100.0, cold_stop_steps=5,
                          max_tokens=12, seed=3, ignore_eos=True)
    tokens = [e.token for e in events]
    assert tokens.index(THINK_CLOSE) == 4 and tokens[5] == tiny_r1.thinking_span.answer_ids[0]
    assert [e.soft for e in events[:4]] == [True] * 4 and not any(e.soft for e in events[4:])
    assert result.think_tokens == 4


def test_spans_close_alike_when_sequences_share_the_batch_wide_step(tiny_r1):
    """A budget close and a Cold Stop close, decided in one batch-wide step beside another
    sequence, give exactly the tokens each gives alone."""
    prompt = tiny_r1.encode(messages=[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "<think>\n"}])
    budget = DecodeParams(method="selar", tau=0.0, thinking_only=True, max_think_tokens=6, max_tokens=14, seed=3,
                          ignore_eos=True)
    cold = DecodeParams(method="soft", cold_stop_entropy=100.0, cold_stop_steps=5, max_tokens=12, seed=4,
                        ignore_eos=True)
    alone = [_run(tiny_r1, prompt, **params.to_dict())[1] for params in (budget, cold)]
    together = tiny_r1.generate_batch([prompt, prompt], [budget, cold])
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert THINK_CLOSE in together[0].tokens and together[0].tokens.index(THINK_CLOSE) == 6
    assert together[1].tokens.index(THINK_CLOSE) == 4
    assert [r.think_tokens for r in together] == [6, 4]


def test_budget_needs_markers(smollm):
    from selar_local.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="max_think_tokens=8: this model has no thinking markers"):
        smollm.generate("Hi", DecodeParams(max_think_tokens=8, max_tokens=4))


def test_api_returns_reasoning_content_streamed_and_not(tiny_r1):
    from selar_local.api import Selar

    llm = Selar(runtime=tiny_r1)
    try:
        messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "<think>\n"}]
        body = dict(method="selar", tau=0.0, thinking_only=True, max_think_tokens=6, max_tokens=14, seed=5,
                    ignore_eos=True)
        out = llm.create_chat_completion(messages, **body)
        message = out["choices"][0]["message"]
        assert message["reasoning_content"] and message["content"]
        chunks = list(llm.create_chat_completion(messages, stream=True, **body))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == message["reasoning_content"]
        assert "".join(d.get("content") or "" for d in deltas).strip() == message["content"]
        with pytest.raises(Exception, match="chat_template_kwargs"):
            llm.create_chat_completion(messages, chat_template_kwargs={"messages": []})
    finally:
        llm.close()


def _selar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selar_local.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_trace_budget_and_hidden_thinking(tmp_path, tiny_model, tiny_r1):
    path = str(tiny_model("qwen2-r1"))
    raw = tiny_r1.chat_prompt([{"role": "user", "content": QUESTION}]) + "<think>\n"
    trace = tmp_path / "t.jsonl"
    common = ["run", "--model", path, "--raw", "--threads", "1", "--n-ctx", "256", "--max-tokens", "24",
              "--method", "selar", "--tau", "0", "--thinking-only", "--max-think-tokens", "16", "--seed", "2"]
    done = _selar(*common, "--trace", str(trace), raw)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert records[16]["token"] == THINK_CLOSE and all(r["thinking"] for r in records[:17])
    assert all(not r["soft"] for r in records if not r["thinking"]) and any(r["soft"] for r in records)
    assert "thinking 16 tokens" in done.stderr.strip().splitlines()[-1]
    hidden = _selar(*common, "--hide-thinking", raw)
    assert hidden.returncode == 0, hidden.stderr
    assert hidden.stdout.strip() and hidden.stdout.strip() in done.stdout  # only the answer
    assert len(hidden.stdout) < len(done.stdout)


def test_cli_no_think_says_when_the_template_has_no_switch(smollm_path):
    done = _selar("run", "--model", str(smollm_path), "--threads", "1", "--method", "cot", "--max-tokens", "2",
                  "--no-think", "--system", "Be brief.", "Hi")
    assert done.returncode == 0, done.stderr
    assert "has no enable_thinking switch" in done.stderr


def test_server_returns_reasoning_content(tiny_model):
    """`selar serve` on the tiny R1 model, through the OpenAI client: the reasoning apart,
    in message.reasoning_content and in the streamed delta.reasoning_content."""
    import openai
    from serve_helpers import running_server

    with running_server(tiny_model("qwen2-r1"), "--threads", "1", "--n-ctx", "256") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "<think>\n"}]
        extra = {"method": "selar", "tau": 0.0, "thinking_only": True, "max_think_tokens": 8, "ignore_eos": True,
                 "chat_template_kwargs": {"enable_thinking": True}}
        full = client.chat.completions.create(model="tiny-qwen2-r1", messages=messages, max_tokens=16, seed=4, extra_body=extra)
        message = full.choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert reasoning and message.content and "</think>" not in reasoning + message.content
        chunks = list(client.chat.completions.create(model="tiny-qwen2-r1", messages=messages, max_tokens=16, seed=4,
                                                     stream=True, extra_body=extra))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas).strip() == reasoning
        assert "".join(d.content or "" for d in deltas).strip() == message.content
        bad = httpx_post(url, {"messages": messages, "max_think_tokens": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_think_tokens"


def httpx_post(url: str, body: dict):
    import httpx

    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def _think_prompt(runtime):
    return runtime.encode(messages=[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "<think>\n"}])


def test_a_replayed_output_is_split_as_the_loop_split_it(tiny_r1):
    """replay_output, which LatentSeek uses for an answer decoded in two pieces, gives the text,
    reasoning and answer the loop gave the same tokens, with a stop string too."""
    from selar_local.outputs import replay_output

    prompt = _think_prompt(tiny_r1)
    params = DecodeParams(greedy=True, max_think_tokens=4, max_tokens=16, ignore_eos=True)
    result = tiny_r1.generate_batch([prompt], [params])[0]
    assert result.answer and result.reasoning and result.tokens.index(THINK_CLOSE) == 4

    def replay(tokens, stop=()):
        return replay_output(tiny_r1.model.token_bytes, tiny_r1.thinking_span, True, tokens, stop)

    assert replay(result.tokens) == (result.text, result.reasoning, result.answer, result.think_tokens) and \
        result.think_tokens == 4
    stop = result.answer[len(result.answer) // 2:][:3]  # a string inside the answer, where it first occurs
    stopped = tiny_r1.generate_batch([prompt], [params.replace(stop=(stop,))])[0]
    assert stopped.text == result.text[:result.text.index(stop)]
    assert replay(result.tokens, (stop,)) == (stopped.text, stopped.reasoning, stopped.answer, stopped.think_tokens)
    # the same tokens read as if the prompt had not opened the span: all of it before the close is content
    assert replay(result.tokens)[1:] != replay_output(tiny_r1.model.token_bytes, tiny_r1.thinking_span, False,
                                                      result.tokens)[1:]


def test_latentseek_grades_and_returns_what_a_thinking_model_answers_after_its_span(tiny_r1):
    """Every answer LatentSeek grades is the text after the thinking span, the first (decoded
    whole) and the later ones (a latent prefix, then the rest decoded after it): the final
    answer is split as the loop would split those tokens."""
    from selar_local.latentseek_search import search
    from selar_local.outputs import replay_output

    prompt = _think_prompt(tiny_r1)
    params = tiny_r1.default_params(method="latentseek", greedy=True, max_tokens=16, max_think_tokens=4,
                                    ignore_eos=True, latentseek_iterations=2, latentseek_grader="psrm")
    graded = []
    found = search(tiny_r1, QUESTION, prompt, params, reference=lambda answer: graded.append(answer) or False)
    assert found.iterations == 2 and found.prefix_length >= 1 and len(graded) == 3
    assert graded[0] == found.first_answer == found.results[0].answer
    text, reasoning, answer, think_tokens = replay_output(tiny_r1.model.token_bytes, tiny_r1.thinking_span, True,
                                                          found.tokens, params.stop + tiny_r1.stop_strings)
    assert (found.text, found.reasoning, found.answer, found.think_tokens) == (text, reasoning, answer, think_tokens)
    assert think_tokens == 4 > found.prefix_length  # the budget counts the prefix's thinking tokens too
    assert answer and reasoning and graded[-1] == found.content == answer
    assert "</think>" in found.text and "</think>" not in "".join(graded)


def test_the_search_api_returns_a_thinking_models_reasoning_apart(tiny_r1):
    from selar_local.api import Selar
    from selar_local.latentseek_search import search

    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "<think>\n"}]
    body = dict(method="latentseek", greedy=True, max_tokens=16, max_think_tokens=4, ignore_eos=True,
                latentseek_iterations=1, latentseek_threshold=1.0, latentseek_grader="json")
    direct = search(tiny_r1, QUESTION, tiny_r1.encode(messages=messages), tiny_r1.default_params(**body))
    llm = Selar(runtime=tiny_r1)
    try:
        message = llm.create_chat_completion(messages, **body)["choices"][0]["message"]
        chunks = list(llm.create_chat_completion(messages, stream=True, **body))
    finally:
        llm.close()
    assert direct.answer and direct.iterations == 1
    assert message == {"role": "assistant", "content": direct.content, "reasoning_content": direct.reasoning}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[1] == {"content": direct.content, "reasoning_content": direct.reasoning}
