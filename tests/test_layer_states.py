"""Reading each layer's output (the residual stream) and llama.cpp's control vectors, on real GGUF
models: what the callback reads is what llama.cpp computes next, and a control vector adds
exactly its rows and leaves nothing behind when removed."""
from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize

from selar_local.engine import (LayerStates, LlamaContext, control_vector_id, enable_layer_inputs, layer_input,
                                model_layer_count, set_control_vector)
from selar_local.errors import InvalidParameterError, UnsupportedModelError
from selar_local.gguf_index import GGUFIndex

from conftest import runtime_for

PROMPT = "The capital of France is Paris, and the capital of Italy is"


def _prompt_tokens(model):
    return model.tokenize(PROMPT)


def test_each_layer_output_is_the_next_layers_input(model_files):
    """l_out-<il> read by the callback equals the input llama.cpp records for layer il+1
    (llama-ext.h's layer inputs, computed in the same graph), bit for bit."""
    rt = runtime_for("llama", model_files)
    states = LayerStates(rt.model, n_ctx=256, n_threads=1, n_threads_batch=1)
    tokens = _prompt_tokens(rt.model)
    read = states.read(tokens)
    n_layer = model_layer_count(rt.model)
    assert read.shape == (n_layer, rt.model.n_embd)
    reference = LlamaContext(rt.model, n_ctx=256, n_batch=256, n_threads=1, n_threads_batch=1)
    enable_layer_inputs(reference, range(1, n_layer))
    n = len(tokens)
    reference.decode_tokens(tokens, range(n), [0] * n, [False] * (n - 1) + [True])
    for il in range(n_layer - 1):
        assert np.array_equal(read[il], layer_input(reference, il + 1, n - 1)), il
    # the callback does not change what the model computes
    assert np.array_equal(states.context.logits(n - 1), reference.logits(n - 1))
    assert np.abs(read).max() > 0
    reference.close()
    states.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_final_norm_of_the_last_layer_output_is_result_norm(model_files, arch):
    """RMSNorm of the last layer's output, times the file's output_norm weights (NumPy), equals
    the final hidden state llama.cpp feeds its output layer (result_norm)."""
    rt = runtime_for(arch, model_files)
    states = LayerStates(rt.model, n_ctx=256, n_threads=1, n_threads_batch=1)
    read = states.read(_prompt_tokens(rt.model))
    index = GGUFIndex(rt.model.path)
    location = index.tensors["output_norm.weight"]
    weight = dequantize(index.raw_rows("output_norm.weight").reshape(-1), location.qtype).reshape(-1)
    eps = float(index.metadata[f"{rt.model.architecture}.attention.layer_norm_rms_epsilon"])
    last = read[-1].astype(np.float64)
    expected = last / np.sqrt(np.mean(last * last) + eps) * weight
    np.testing.assert_allclose(states.final_norm, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    # a second read of another prompt overwrites every layer
    other = states.read(rt.model.tokenize("Two plus two is"))
    assert not np.array_equal(other[-1], read[-1])
    states.close()


def test_a_prompt_over_the_reader_context_is_refused(model_files):
    rt = runtime_for("llama", model_files)
    states = LayerStates(rt.model, n_ctx=256, n_threads=1, n_threads_batch=1)
    with pytest.raises(Exception, match="layer reader takes 1 to 256"):
        states.read([1] * 300)
    states.close()


def _last_logits(context, tokens):
    context.clear()
    n = len(tokens)
    context.decode_tokens(tokens, range(n), [0] * n, [False] * (n - 1) + [True])
    return context.logits(n - 1).copy()


class TestControlVector:
    def test_zero_vector_is_bit_identical_nonzero_changes_removal_restores(self, model_files):
        rt = runtime_for("llama", model_files)
        ctx = LlamaContext(rt.model, n_ctx=256, n_batch=256, n_threads=1, n_threads_batch=1)
        tokens = _prompt_tokens(rt.model)
        plain = _last_logits(ctx, tokens)
        n_layer = model_layer_count(rt.model)
        set_control_vector(ctx, np.zeros((n_layer, rt.model.n_embd), np.float32))
        assert control_vector_id(ctx) is not None
        assert np.array_equal(_last_logits(ctx, tokens), plain)
        rng = np.random.default_rng(0)
        steer = rng.standard_normal((n_layer, rt.model.n_embd)).astype(np.float32)
        steer[0] = 0
        set_control_vector(ctx, steer)
        steered = _last_logits(ctx, tokens)
        assert np.abs(steered - plain).max() > 0.1
        set_control_vector(ctx, None)
        assert control_vector_id(ctx) is None
        assert np.array_equal(_last_logits(ctx, tokens), plain)
        ctx.close()

    def test_vector_adds_exactly_its_row_to_that_layers_output(self, model_files):
        """With only layer k's row set, the layers before k read the same and layer k's output
        is the unsteered one plus the row (one float32 add, as NumPy's)."""
        rt = runtime_for("llama", model_files)
        states = LayerStates(rt.model, n_ctx=256, n_threads=1, n_threads_batch=1)
        tokens = _prompt_tokens(rt.model)
        plain = states.read(tokens)
        k = 5
        steer = np.zeros_like(plain)
        steer[k] = np.random.default_rng(1).standard_normal(plain.shape[1]).astype(np.float32)
        set_control_vector(states.context, steer)
        steered = states.read(tokens)
        assert np.array_equal(steered[:k], plain[:k])
        assert np.array_equal(steered[k], plain[k] + steer[k])
        assert not np.array_equal(steered[k + 1], plain[k + 1])
        states.close()

    def test_bad_vectors_are_refused(self, model_files):
        rt = runtime_for("llama", model_files)
        ctx = LlamaContext(rt.model, n_ctx=256, n_batch=256, n_threads=1, n_threads_batch=1)
        n_layer = model_layer_count(rt.model)
        with pytest.raises(InvalidParameterError, match="one row per layer"):
            set_control_vector(ctx, np.zeros((n_layer - 1, rt.model.n_embd)))
        first = np.zeros((n_layer, rt.model.n_embd))
        first[0, 0] = 1
        with pytest.raises(InvalidParameterError, match="row 0 must be zero"):
            set_control_vector(ctx, first)
        bad = np.zeros((n_layer, rt.model.n_embd))
        bad[3, 3] = np.nan
        with pytest.raises(InvalidParameterError, match="non-finite"):
            set_control_vector(ctx, bad)
        assert control_vector_id(ctx) is None
        ctx.close()


def test_layer_inputs_refused_where_llama_cpp_would_abort(model_files):
    rt = runtime_for("qwen2", model_files)
    ctx = LlamaContext(rt.model, n_ctx=256, n_batch=256, n_threads=1, n_threads_batch=1)
    with pytest.raises(UnsupportedModelError, match="no layer inputs for qwen2"):
        enable_layer_inputs(ctx, [1])
    ctx.close()


def test_an_architecture_without_layer_output_names_is_a_clear_error(tiny_model):
    """llama.cpp's nemotron_h graph names no l_out tensors (measured on the tiny random model)."""
    from selar_local.engine import LlamaModel

    model = LlamaModel(tiny_model("nemotron_h"))
    states = LayerStates(model, n_ctx=64, n_threads=1, n_threads_batch=1)
    with pytest.raises(UnsupportedModelError, match="nemotron_h model: llama.cpp's graph names no f32 'l_out-<il>'"):
        states.read(model.tokenize("hello world"))
    states.close()
    model.close()
