"""The llama-cpp-python-style API (selar_local.api): OpenAI-shaped responses, parameter
mapping, and the scheduler (one background thread, queue, cancellation, error isolation).
Real model (SmolLM2-135M), short generations."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import runtime_for
from decode_compare import assert_same_greedy_text, steps_of_choice
from selar_local.api import QueueFullError, RequestError, Selar
from selar_local.errors import DecodeError, UnsupportedModelError
from selar_local.params import DecodeParams

# SmolLM2's own template adds its default system prompt (chat.py renders the GGUF's
# Jinja): with it, this wording is the one the 135M model answers with "Paris".
QUESTION = [{"role": "user", "content": "Which city is the capital of France?"}]
PROMPTS = ["What is 2+3?", "Name a color.", "What is the capital of France?", "Say hello."]


@pytest.fixture(scope="module")
def llm(smollm):
    selar = Selar(runtime=smollm, queue_size=1)  # one slot (n_parallel=1), one waiting place
    yield selar
    selar.scheduler.close()


@pytest.fixture(scope="module")
def llm4(model_files):
    selar = Selar(runtime=runtime_for("llama", model_files, n_parallel=4), queue_size=8)
    yield selar
    selar.scheduler.close()


def _wait_idle(selar: Selar, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while selar.scheduler.stats().slots_busy or selar.scheduler.stats().queued:
        assert time.monotonic() < deadline, selar.scheduler.stats()
        time.sleep(0.02)


def test_chat_completion_is_openai_shaped_with_selar_field(llm):
    out = llm.create_chat_completion(QUESTION, max_tokens=12, temperature=0, method="selar", tau=0.5)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == "smollm2-135m-instruct"
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant"
    # What a 135M model says under soft steps depends on the CPU's rounding (AVX2 and AVX-512
    # kernels differ in the last bits, and a soft step amplifies that): the API must give
    # exactly the runtime's own decode of the same request, on any CPU.
    params = llm.runtime.default_params(method="selar", tau=0.5, greedy=True, max_tokens=12)
    alone = llm.runtime.generate(messages=QUESTION, params=params)
    assert choice["message"]["content"] == alone.text
    assert choice["finish_reason"] == alone.finish_reason
    assert out["usage"]["completion_tokens"] == len(alone.tokens)
    assert out["selar"]["soft_steps"] == alone.soft_steps
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    selar = out["selar"]
    assert selar["method"] == "selar" and selar["tau"] == 0.5
    assert 0 <= selar["soft_steps"] <= usage["completion_tokens"]
    assert selar["soft_share"] == pytest.approx(selar["soft_steps"] / usage["completion_tokens"], abs=1e-6)
    assert 0.0 <= selar["mean_entropy"] <= 1.0


def test_stream_matches_non_stream_and_reports_usage(llm):
    kwargs = dict(max_tokens=16, method="selar", tau=0.3, seed=7)  # sampled, same seed: same text
    full = llm.create_chat_completion(QUESTION, **kwargs)
    chunks = list(llm.create_chat_completion(QUESTION, stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    last, usage_chunk = chunks[-2], chunks[-1]
    assert last["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert last["selar"]["soft_steps"] == full["selar"]["soft_steps"]
    cached = usage_chunk["usage"].pop("prompt_tokens_details")["cached_tokens"]
    full["usage"].pop("prompt_tokens_details")
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert cached == full["usage"]["prompt_tokens"]  # the same prompt again: all of it from the prompt cache
    # Without selar_trace, content chunks are plain OpenAI chunks.
    assert all("selar" not in c for c in chunks[:-2])


def test_selar_trace_gives_every_step_a_chunk_equal_to_the_runtime_trace(llm):
    kwargs = dict(max_tokens=24, method="selar", tau=0.3, seed=7)
    chunks = list(llm.create_chat_completion(QUESTION, stream=True, selar_trace=True, **kwargs))
    steps = [c["selar"] for c in chunks[1:-1]]
    final = chunks[-1]["selar"]
    assert [s["index"] for s in steps] == list(range(len(steps)))
    assert sum(s["soft"] for s in steps) == final["soft_steps"] > 0
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # The same generation straight from the runtime: the CLI trace's records.
    rt = llm.runtime
    params = llm.builder.chat({"messages": QUESTION, **kwargs}).params
    events = list(rt.stream(params=params, messages=QUESTION))
    assert text == "".join(e.text for e in events)
    assert len(events) == len(steps)
    for step, event in zip(steps, events):
        record = event.trace_record(rt.model.token_text(event.token))
        assert step["token"] == record["token"] and step["token_text"] == record["text"]
        assert step["top_ids"] == record["top_ids"] and step["top_probs"] == record["top_probs"]
        assert step["top_tokens"] == [rt.model.token_text(t) for t in record["top_ids"]]
        assert step["entropy"] == record["entropy"] and step["soft"] == record["soft"]
        if step["soft"]:
            assert step["mix_ids"] == record["mix_ids"] and step["mix_weights"] == record["mix_weights"]
            assert step["mix_tokens"] == [rt.model.token_text(t) for t in record["mix_ids"]]
        else:
            assert "mix_ids" not in step


def test_completion_prompt_forms_echo_and_stop(llm):
    prompt = "The capital of France is"
    out = llm.create_completion(prompt, max_tokens=8, temperature=0, method="cot")
    assert out["object"] == "text_completion"
    text = out["choices"][0]["text"]
    assert "Paris" in text
    ids = llm.runtime.encode(prompt)
    assert llm.create_completion(ids, max_tokens=8, temperature=0, method="cot")["choices"][0]["text"] == text
    echoed = llm(prompt, max_tokens=8, temperature=0, method="cot", echo=True)  # __call__ = create_completion
    assert echoed["choices"][0]["text"] == prompt + text
    stop = text.strip().split()[0]  # the first word of the greedy answer
    stopped = llm.create_completion(prompt, max_tokens=8, temperature=0, method="cot", stop=[stop])
    assert stopped["choices"][0]["finish_reason"] == "stop" and stop not in stopped["choices"][0]["text"]


def test_temperature_zero_means_greedy(llm):
    a = llm.create_chat_completion(QUESTION, max_tokens=8, temperature=0, method="cot")
    b = llm.create_chat_completion(QUESTION, max_tokens=8, greedy=True, method="cot", seed=123)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_openai_names_map_onto_decode_params(llm):
    req = llm.builder.chat({"messages": QUESTION, "max_tokens": 5, "temperature": 0.9, "top_p": 0.8, "seed": 3,
                            "stop": "x", "method": "moi", "tau": 0.7, "lam": 0.5, "ks": 4, "top_k": 30,
                            "min_p": 0.05, "thinking_only": True})
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (5, 0.9, 0.8, 3, ("x",))
    assert (p.method, p.tau, p.lam, p.ks, p.top_k, p.min_p, p.thinking_only) == ("moi", 0.7, 0.5, 4, 30, 0.05, True)
    # No max_tokens: up to the end of the context; OpenAI's max_completion_tokens is honoured.
    room = llm.runtime.context.n_ctx - len(req.prompt_tokens)
    assert llm.builder.chat({"messages": QUESTION}).params.max_tokens == room
    assert llm.builder.chat({"messages": QUESTION, "max_completion_tokens": 9}).params.max_tokens == 9
    assert llm.builder.chat({"messages": QUESTION, "max_tokens": 10**9}).params.max_tokens == room
    # Content parts of type text, and the developer role, are accepted.
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Which city is the capital"}, " of France?"]}]
    assert llm.builder.chat({"messages": parts}).prompt_tokens == llm.runtime.encode(
        messages=[{"role": "system", "content": "Be brief."}, QUESTION[0]])


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2}, "n"),
    ({"tau": -1}, "tau"),
    ({"tua": 0.5}, "tua"),
    ({"ks": 50}, "ks"),
    ({"method": "beam"}, "method"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"greedy": "yes"}, "greedy"),
    ({"stop": [1]}, "stop"),
    ({"logprobs": 3}, "logprobs"),                   # chat: a boolean (the count is top_logprobs)
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),            # without logprobs=true
    ({"ks": 65}, "ks"),                               # mixture sizes are bounded (per-step cost)
    ({"soft_topk": 1000, "method": "soft"}, "soft_topk"),
    ({"moi_topn": 49152, "method": "moi"}, "moi_topn"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop": ["x" * 257]}, "stop"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),  # no function object
    ({"model": "gpt-4o"}, "model"),
    ({"selar_trace": "yes", "stream": True}, "selar_trace"),
    ({"selar_trace": True}, "selar_trace"),  # a trace describes streamed chunks
])
def test_bad_parameters_are_rejected_by_name(llm, kwargs, param):
    with pytest.raises(RequestError) as info:
        llm.create_chat_completion(QUESTION, **kwargs)
    assert info.value.param == param
    assert info.value.status == (404 if param == "model" else 400)


@pytest.mark.parametrize("messages", [[], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}],
                                      [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], ["hi"]])
def test_bad_messages_are_rejected(llm, messages):
    with pytest.raises(RequestError) as info:
        llm.create_chat_completion(messages)
    assert info.value.param.startswith("messages")


def test_prompt_over_context_fails_alone(llm):
    with pytest.raises(RequestError) as info:
        llm.create_completion("hello " * 3000, max_tokens=4)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    assert llm.scheduler.stats().slots_busy == 0
    assert llm.create_chat_completion(QUESTION, max_tokens=4)["usage"]["completion_tokens"] > 0


def test_unsupported_method_is_a_request_error(llm, monkeypatch):
    def refuse(method):
        if method != "cot":
            raise UnsupportedModelError(f"method '{method}' feeds soft embeddings, which this model cannot take")

    monkeypatch.setattr(llm.runtime, "require_method", refuse)
    with pytest.raises(RequestError) as info:
        llm.create_chat_completion(QUESTION, method="selar", max_tokens=4)
    assert info.value.code == "unsupported_method" and info.value.param == "method"
    assert llm.create_chat_completion(QUESTION, method="cot", max_tokens=4)["selar"]["method"] == "cot"


def test_a_searchs_decodes_wait_out_a_full_queue_instead_of_failing(llm):
    """decode_requests (a search's decode: LatentSeek's checks, 16 bench searches at once) waits
    for room; a client's request on the same full queue is still refused."""
    import threading

    from selar_local.scheduler import decode_requests

    running = llm.create_chat_completion(QUESTION, stream=True, max_tokens=900, method="cot", ignore_eos=True)
    next(running), next(running)  # the one slot is generating
    waiting = llm.create_chat_completion(QUESTION, stream=True, max_tokens=4)  # takes the one queue place
    before = llm.scheduler.stats()
    params = llm.runtime.default_params(method="cot", greedy=True, max_tokens=4)
    prompt = llm.runtime.encode(messages=[{"role": "user", "content": QUESTION}])
    found: list = []
    searcher = threading.Thread(target=lambda: found.extend(decode_requests(llm.scheduler, [prompt, prompt],
                                                                            [params, params])))
    searcher.start()
    deadline = time.monotonic() + 120
    while llm.scheduler.stats().waited_for_room == before.waited_for_room:  # it reached the full queue
        assert time.monotonic() < deadline and searcher.is_alive(), llm.scheduler.stats()
        time.sleep(0.02)
    with pytest.raises(QueueFullError, match="queue size 1"):
        llm.create_chat_completion(QUESTION, max_tokens=4)
    assert not found and searcher.is_alive()
    waiting.close()
    running.close()  # room: the search's two decodes go through, one after the other
    searcher.join(120)
    assert not searcher.is_alive() and len(found) == 2
    alone = llm.runtime.generate_batch([prompt], [params])[0]
    assert [r.tokens for r in found] == [alone.tokens, alone.tokens] and found[0].finish_reason == "length"
    after = llm.scheduler.stats()
    assert after.rejected == before.rejected + 1 and after.waited_for_room >= before.waited_for_room + 1


def test_queue_full_and_cancellation_free_slot_and_kv_cells(llm):
    # ignore_eos: it cannot end before this test is done with it, however fast the machine
    running = llm.create_chat_completion(QUESTION, stream=True, max_tokens=900, method="cot", ignore_eos=True)
    next(running), next(running)  # the one slot is generating
    assert llm.runtime.context.sequence_length(0) > 0
    waiting = llm.create_chat_completion(QUESTION, stream=True, max_tokens=4)  # takes the one queue place
    assert llm.scheduler.stats().queued == 1
    with pytest.raises(QueueFullError, match="queue size 1"):
        llm.create_chat_completion(QUESTION, max_tokens=4)
    assert llm.scheduler.stats().rejected >= 1
    waiting.close()  # never started: cancelling takes it off the queue
    running.close()
    _wait_idle(llm)
    # The slot is free; its cells stay as prompt cache: exactly the tokens it records
    # (prompt and discrete inputs), nothing past them.
    slot = llm.runtime.slots.slots[0]
    assert not slot.busy and slot.tokens[:5] == llm.runtime.encode(messages=QUESTION)[:5]
    assert llm.runtime.context.sequence_length(0) == len(slot.tokens)
    stats = llm.scheduler.stats()
    assert stats.cancelled >= 2 and stats.slots_busy == 0 and stats.queued == 0
    assert llm.create_chat_completion(QUESTION, max_tokens=4)["usage"]["completion_tokens"] > 0


def test_concurrent_threads_get_the_answers_they_get_alone(llm4):
    """The same text, or (ARM int8-matmul CPUs) one that parts at a near-tie (decode_compare.py)."""
    def ask(i):
        # logprobs: the top two of every step, to tell a near-tie from a difference
        return llm4.create_chat_completion([{"role": "user", "content": PROMPTS[i % 4]}], max_tokens=12,
                                           temperature=0, method="selar" if i < 4 else "cot",
                                           logprobs=True, top_logprobs=2)["choices"][0]

    alone = [ask(i) for i in range(6)]
    together: list[dict | None] = [None] * 6

    def worker(i):
        together[i] = ask(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for got, want in zip(together, alone):
        assert_same_greedy_text(got["message"]["content"], want["message"]["content"], steps_of_choice(want))
    # Never more than n_parallel at once. (How many overlapped depends on the machine's
    # speed; that sequences really decode side by side is shown deterministically by
    # the n-choices tests, whose sequences are admitted together.)
    assert llm4.scheduler.stats().slots_busy_peak <= 4


def test_a_failing_request_does_not_disturb_the_others(llm4):
    good = llm4.create_chat_completion(QUESTION, stream=True, max_tokens=12, temperature=0, method="selar")
    first = next(good)
    bad = llm4.scheduler.submit([10**8], DecodeParams(max_tokens=4))  # token id past the vocabulary
    with pytest.raises(DecodeError):
        bad.wait(timeout=30)
    rest = [first, *good]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in rest if c["choices"])
    alone = llm4.create_chat_completion(QUESTION, max_tokens=12, temperature=0, method="selar",
                                        logprobs=True, top_logprobs=2)["choices"][0]
    assert_same_greedy_text(text, alone["message"]["content"], steps_of_choice(alone))
    assert llm4.scheduler.stats().failed >= 1


def test_too_many_messages_are_rejected(llm):
    with pytest.raises(RequestError, match="at most 1024") as info:
        llm.create_chat_completion([{"role": "user", "content": "hi"}] * 1025)
    assert info.value.param == "messages"


def test_n_choices_share_one_prefill_each_with_its_own_seed(llm4):
    out = llm4.create_chat_completion(QUESTION, n=3, seed=5, max_tokens=12, method="selar")
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["seed"] for c in out["selar"]["choices"]] == [5, 6, 7]
    alone = [llm4.create_chat_completion(QUESTION, seed=s, max_tokens=12, method="selar") for s in (5, 6, 7)]
    assert [c["message"]["content"] for c in out["choices"]] == [a["choices"][0]["message"]["content"]
                                                                 for a in alone]
    # the prompt is counted once: it was prefilled once
    assert out["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
    assert out["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    assert llm4.scheduler.stats().slots_busy_peak >= 3  # admitted together, decoded side by side
    _wait_idle(llm4)


def test_n_choices_stream_interleaved_with_indexes(llm4):
    chunks = list(llm4.create_chat_completion(QUESTION, n=2, seed=9, max_tokens=10, stream=True,
                                              stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finished.add(choice["index"])
    assert finished == {0, 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 2
    whole = llm4.create_chat_completion(QUESTION, n=2, seed=9, max_tokens=10)
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in whole["choices"]]
    _wait_idle(llm4)


def test_unseeded_requests_get_fresh_seeds_reported_for_replay(llm):
    a = llm.create_chat_completion(QUESTION, max_tokens=16, temperature=0.9)
    b = llm.create_chat_completion(QUESTION, max_tokens=16, temperature=0.9)
    assert a["selar"]["seed"] != b["selar"]["seed"]
    replay = llm.create_chat_completion(QUESTION, max_tokens=16, temperature=0.9, seed=a["selar"]["seed"])
    assert replay["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]


def test_chat_logprobs_shape_and_values(llm):
    out = llm.create_chat_completion(QUESTION, max_tokens=8, seed=1, logprobs=True, top_logprobs=2)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"]
    assert "".join(entry["token"] for entry in content) == out["choices"][0]["message"]["content"]
    for entry in content:
        assert entry["logprob"] <= 0.0 and bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        assert 1 <= len(entry["top_logprobs"]) <= 2
    plain = llm.create_chat_completion(QUESTION, max_tokens=8, seed=1)
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == out["choices"][0]["message"]["content"]
    streamed = list(llm.create_chat_completion(QUESTION, max_tokens=8, seed=1, logprobs=True, top_logprobs=2,
                                               stream=True))
    entries = [e for c in streamed for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert entries == content


def test_completion_logprobs_shape(llm):
    out = llm.create_completion("The capital of France is", max_tokens=6, seed=2, logprobs=2)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and all(len(alt) <= 2 for alt in lp["top_logprobs"])
