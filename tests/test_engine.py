"""The engine and the generation loop on real GGUF models of three architectures."""
from __future__ import annotations

import math

import numpy as np
import pytest

from selar_local.embeddings import EmbeddingTable
from selar_local.engine import LlamaModel
from selar_local.errors import (
    ContextOverflowError,
    InvalidParameterError,
    ModelLoadError,
    UnsupportedModelError,
)
from selar_local.params import DecodeParams
from selar_local.runtime import Runtime

from conftest import runtime_for
from decode_compare import assert_same_greedy_decode

QUESTION = [{"role": "user", "content": "A box has 3 red and 5 blue balls. How many balls are in 4 boxes?"}]


def logits_after(rt: Runtime, prefix: list[int], last_input) -> np.ndarray:
    """Logits after `prefix` (tokens) then one more input: a token id or an embedding row."""
    ctx = rt.context
    ctx.remove_sequence(0)
    try:
        ctx.decode_tokens(prefix, range(len(prefix)), [0] * len(prefix), [False] * len(prefix))
        pos = [len(prefix)]
        if isinstance(last_input, int):
            ctx.decode_tokens([last_input], pos, [0], [True])
        else:
            ctx.decode_embeddings(np.asarray(last_input, dtype=np.float32)[None, :], pos, [0], [True])
        return ctx.logits(0).copy()
    finally:
        ctx.remove_sequence(0)


def probe(rt: Runtime) -> tuple[list[int], int, int]:
    tokens = rt.model.tokenize("The capital of France is Paris, and the capital of Italy is")
    prefix = tokens[:-1]
    return prefix, tokens[-1], tokens[-2]


class TestEmbeddingPath:
    def test_self_check_passes_with_the_architecture_scale(self, any_runtime):
        rt = any_runtime
        assert rt.self_check.passed, rt.self_check.detail
        expected = math.sqrt(rt.model.n_embd_inp) if rt.model.architecture == "gemma3" else 1.0
        assert rt.self_check.scale == pytest.approx(expected)
        assert rt.table.n_embd == rt.model.n_embd_inp

    def test_one_hot_soft_embedding_equals_the_token(self, any_runtime):
        rt = any_runtime
        prefix, last, _ = probe(rt)
        by_token = logits_after(rt, prefix, last)
        by_row = logits_after(rt, prefix, rt.table.mix([last], np.array([1.0])))
        assert np.max(np.abs(by_token - by_row)) <= 1e-3

    def test_contrastive_soft_step_differs_from_both_candidates(self, any_runtime):
        rt = any_runtime
        prefix, v1, v2 = probe(rt)
        weights = np.array([0.6, 0.4]) * 1.5 - np.array([0.5, 0.0])  # push 0.5 off v1
        soft = logits_after(rt, prefix, rt.table.mix([v1, v2], weights))
        for token in (v1, v2):
            assert np.max(np.abs(soft - logits_after(rt, prefix, token))) > 0.1

    def test_gemma_rows_need_the_sqrt_scale(self, model_files):
        rt = runtime_for("gemma3", model_files)
        prefix, last, _ = probe(rt)
        unscaled = EmbeddingTable(model_files["gemma3"], scale=1.0).rows([last])[0]
        diff = np.max(np.abs(logits_after(rt, prefix, last) - logits_after(rt, prefix, unscaled)))
        assert diff > 1.0  # measured ~24 logits without the sqrt(n_embd) scale


class TestGeneration:
    def test_selar_with_tau_above_one_is_exactly_cot(self, any_runtime):
        params = DecodeParams(method="cot", max_tokens=40, seed=5)
        cot = any_runtime.generate(messages=QUESTION, params=params)
        selar = any_runtime.generate(messages=QUESTION, params=params.replace(method="selar", tau=1.01))
        assert selar.soft_steps == 0
        assert selar.tokens == cot.tokens and selar.text == cot.text

    def test_same_seed_same_output(self, smollm):
        params = DecodeParams(method="selar", max_tokens=40, seed=11)
        first = smollm.generate(messages=QUESTION, params=params)
        second = smollm.generate(messages=QUESTION, params=params)
        assert first.tokens == second.tokens and first.soft_steps == second.soft_steps
        other = smollm.generate(messages=QUESTION, params=params.replace(seed=12))
        assert other.tokens != first.tokens

    def test_soft_share_moves_with_tau(self, smollm):
        shares = []
        for tau in (0.0, 0.5, 1.01):
            result = smollm.generate(messages=QUESTION, params=DecodeParams(method="selar", tau=tau, max_tokens=64))
            shares.append(result.soft_share)
        assert shares[0] > shares[1] > 0.0 and shares[2] == 0.0
        assert shares[0] > 0.5  # tau 0 opens the gate on every step that is not a math symbol

    def test_soft_steps_only_where_gate_opens(self, smollm):
        params = DecodeParams(method="selar", tau=0.5, max_tokens=64)
        mask = smollm.token_info.math_symbol_mask
        events = list(smollm.stream(params=params, messages=QUESTION))
        assert any(e.soft for e in events)
        for e in events:
            if e.soft:
                assert e.entropy >= 0.5 and not mask[e.token]
                assert sum(e.mix_weights) == pytest.approx(1.0)
            elif e.finish_reason is None and not mask[e.token]:
                assert e.entropy < 0.5

    def test_soft_thinking_and_mixture_of_inputs_run(self, smollm):
        for method in ("soft", "moi"):
            result = smollm.generate(messages=QUESTION, params=DecodeParams(method=method, max_tokens=24))
            assert result.completion_tokens > 0 and result.soft_steps > 0

    def test_stream_text_joins_to_result_text(self, smollm):
        stream = smollm.stream(params=DecodeParams(max_tokens=30), messages=QUESTION)
        pieces = []
        while True:
            try:
                pieces.append(next(stream).text)
            except StopIteration as done:
                result = done.value
                break
        assert "".join(pieces) == result.text and result.completion_tokens == len(result.tokens)

    def test_stop_string_and_token_budget(self, smollm):
        base = DecodeParams(method="cot", greedy=True, max_tokens=60)
        full = smollm.generate(messages=QUESTION, params=base)
        assert full.finish_reason in ("stop", "length")
        word = full.text.split()[2]
        stopped = smollm.generate(messages=QUESTION, params=base.replace(stop=(word,)))
        assert stopped.finish_reason == "stop" and word not in stopped.text
        assert full.text.startswith(stopped.text)
        short = smollm.generate(messages=QUESTION, params=base.replace(max_tokens=5))
        assert short.finish_reason == "length" and short.completion_tokens == 5

    def test_parallel_greedy_matches_sequential(self, model_files):
        rt1 = runtime_for("llama", model_files)
        rt3 = runtime_for("llama", model_files, n_parallel=3)
        questions = ["What is 2 + 3?", "Name a prime number above 10.", "What is 7 times 6?", "Spell cat."]
        prompts = [rt1.encode(messages=[{"role": "user", "content": q}]) for q in questions]
        params = DecodeParams(method="selar", greedy=True, max_tokens=32, logprobs=2)
        sequential = [rt1.generate_batch([p], params)[0] for p in prompts]
        parallel = rt3.generate_batch(prompts, params)
        for got, want in zip(parallel, sequential):
            assert_same_greedy_decode(got, want, tau=params.tau)


def _logits_of_first(ctx, prompts: list[list[int]], next_tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Prefill the prompts as sequences 0..n-1 in one batch, then feed one more token to each
    in one batch: sequence 0's logits after each (copies), the KV cells removed afterwards."""
    try:
        ctx.decode_prompts(prompts)
        after_prompt = ctx.logits_rows(len(prompts))[0].copy()
        ctx.decode_tokens(next_tokens, [len(p) for p in prompts], range(len(prompts)), [True] * len(prompts))
        return after_prompt, ctx.logits_rows(len(prompts))[0].copy()
    finally:
        for s in range(len(prompts)):
            ctx.remove_sequence(s)


def test_plain_cpu_kernels_make_a_sequence_independent_of_its_batch(model_files):
    """With weights not repacked (`cpu_repack=False`, the benchmark's default) a sequence's
    logits do not depend on which sequences share its batch. Repacked Q4_K weights take
    another kernel for rows in groups of four than for the rest, and on AVX2 CPUs this very
    comparison then differs by ~0.2 in the logits (docs/BENCHMARKS.md, "Batching"). Plain
    kernels compute each row alike; 1e-3 leaves room for a CPU whose kernels sum a row's
    products in another order when the batch is even (ARM's int8 matmul path): float32
    rounding over these dot products is ~1e-5 of logits of size ~20. (On the 1.5B Q4_K_M file,
    steps of 1-7 and of 8+ tokens are two regimes that differ by 0.43: docs/BENCHMARKS.md;
    four sequences stay in the first.)"""
    rt = Runtime(model_files["qwen2"], n_ctx=2048, n_parallel=4, n_threads=2, prompt_cache=False, cpu_repack=False)
    try:
        questions = ["What is 2 + 3?", "Name a prime number above 10.", "Spell cat.", "Why is the sky blue?"]
        prompts = [rt.encode(messages=[{"role": "user", "content": q}]) for q in questions]
        next_tokens = [rt.encode("The")[-1]] * 4
        alone = _logits_of_first(rt.context, prompts[:1], next_tokens[:1])
        together = _logits_of_first(rt.context, prompts, next_tokens)
        for a, b in zip(alone, together):
            assert np.abs(a - b).max() <= 1e-3
    finally:
        rt.close()


class TestBadInput:
    def test_missing_file(self, tmp_path):
        with pytest.raises(ModelLoadError, match="not found"):
            Runtime(tmp_path / "nope.gguf")

    def test_not_a_gguf_file(self, tmp_path):
        bogus = tmp_path / "model.gguf"
        bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model")
        with pytest.raises(ModelLoadError, match="not a GGUF file"):
            Runtime(bogus)

    def test_truncated_gguf(self, tmp_path, smollm_path):
        cut = tmp_path / "cut.gguf"
        with open(smollm_path, "rb") as src, open(cut, "wb") as dst:
            dst.write(src.read(4 << 20))
        with pytest.raises(ModelLoadError):
            Runtime(cut)

    def test_unknown_architecture(self, tmp_path):
        import gguf

        path = tmp_path / "alien.gguf"
        writer = gguf.GGUFWriter(str(path), "notanarch")
        writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(UnsupportedModelError, match="architecture"):
            LlamaModel(path)

    def test_invalid_hyperparameters(self):
        with pytest.raises(InvalidParameterError, match="tau"):
            DecodeParams(tau=-1)
        with pytest.raises(InvalidParameterError, match="lam"):
            DecodeParams(lam=-0.5)
        with pytest.raises(InvalidParameterError, match="ks"):
            DecodeParams(ks=1)

    def test_prompt_longer_than_context(self, model_files):
        rt = runtime_for("llama", model_files, n_ctx=64)
        assert rt.context.n_ctx == 256  # llama.cpp's minimum context
        long_question = [{"role": "user", "content": "word " * 300}]
        with pytest.raises(ContextOverflowError, match="context holds 256"):
            rt.generate(messages=long_question)
        assert rt.generate(messages=QUESTION, params=DecodeParams(max_tokens=4)).completion_tokens == 4

    def test_generation_stops_at_context_end(self, model_files):
        rt = runtime_for("llama", model_files, n_ctx=64)
        counting = ", ".join(str(i) for i in range(1, 200))
        prompt = rt.encode(counting)[: rt.context.n_ctx - 6]  # a few cells left; counting goes on
        result = rt.generate_batch([prompt], DecodeParams(method="cot", greedy=True, max_tokens=500))[0]
        assert result.finish_reason == "length"
        # Every cell is used; the last token is shown but never fed, so it needs none.
        assert len(prompt) + result.completion_tokens == rt.context.n_ctx + 1

    def test_batch_over_n_batch_is_refused_not_aborted(self, smollm):
        too_many = list(range(smollm.context.n_batch + 1))
        with pytest.raises(ValueError, match="n_batch"):
            smollm.context.decode_tokens(too_many, too_many, [0] * len(too_many), [False] * len(too_many))
