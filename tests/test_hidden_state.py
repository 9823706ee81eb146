"""The final hidden state read beside the logits (LlamaContext.set_hidden_output, hidden,
hidden_rows, output_rows) on the real test models.

The check that it is the right tensor: the hidden state times the dequantised output
table reproduces the step's logits. Not exactly, because ggml's kernels for quantised
weights first quantise the activation vector to 8 bits per block (on CPU Q8_0: 32 values
and an fp16 scale; Q8_K: 256 values; on GPU q8_1 or fp16): each value moves by at most
amax_b (1/254 + 2^-11) for its block's largest magnitude amax_b (half a step, and the fp16
rounding of the scale). Taking 256-value blocks covers every one of these (a wider block's
amax is at least its narrower blocks'). The logit of token v then moves by
sum_i W[v, i] d_i; treating the rounding errors d_i as independent and zero-mean (the
standard model of rounding), Hoeffding's inequality bounds it by
sqrt(2 ln(2/p) sum_i (W[v, i] D_i)^2) but with probability p per token; p = 1e-12 keeps
the chance of any false alarm over a 262k vocabulary below 1e-6. float32 accumulation
adds at most n 2^-24 sum_i |W[v, i] h_i|. (The worst-case sum_i |W[v, i]| D_i is 2-3 times
looser.) Measured on the test prompt: the largest error is 0.13-0.20 of this bound on the
three models, and the hidden state of the previous position exceeds it 11- to 27-fold.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import runtime_for
from selar_local.alignment import OUTPUT_WEIGHT, TensorRows, alignment_sources, load_alignment
from selar_local.engine import LlamaContext
from selar_local.errors import DecodeError
from selar_local.gguf_index import GGUFIndex

PROMPT = "The capital of France is Paris. The capital of Italy is"
HOEFFDING_P = 1e-12


def own_context(arch, model_files, n_seq_max: int = 2) -> LlamaContext:
    """A context of its own on the session's model (the shared runtime's stays untouched)."""
    return LlamaContext(runtime_for(arch, model_files).model, n_ctx=256, n_batch=64, n_seq_max=n_seq_max)


def prefill(ctx: LlamaContext, tokens, seq_id: int = 0, all_outputs: bool = False) -> None:
    n = len(tokens)
    ctx.decode_tokens(tokens, range(n), [seq_id] * n, [True] * n if all_outputs else [False] * (n - 1) + [True])


def rounding_bounds(w: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """[rows of w, hidden states]: how far each logit may move from w @ h by ggml's rounding
    (module docstring). float32 is plenty for a bound."""
    k, n = hidden.shape
    blocks = -(-n // 256)
    padded = np.zeros((k, blocks * 256), np.float32)
    padded[:, :n] = np.abs(hidden)
    step = np.repeat(padded.reshape(k, blocks, 256).max(axis=2) * np.float32(1 / 254 + 2**-11), 256, axis=1)[:, :n]
    spread = np.sqrt(np.float32(2 * math.log(2 / HOEFFDING_P)) * ((w * w) @ (step * step).T))
    return spread + np.float32(n * 2.0**-24) * (np.abs(w) @ np.abs(hidden).T)


def excess(path, hidden: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """For each hidden state (rows of `hidden`): max over tokens of |logit - W_out h| over
    its rounding bound, streaming W_out's rows once."""
    index = GGUFIndex(path)
    rows = TensorRows(index, alignment_sources(index).output)
    worst = np.zeros(hidden.shape[0])
    for start, block in rows.blocks():
        error = np.abs(block @ hidden.T - logits[start:start + block.shape[0], None])
        worst = np.maximum(worst, (error / rounding_bounds(block, hidden)).max(axis=0))
    return worst


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_hidden_state_times_the_output_table_gives_the_logits(arch, model_files):
    path = model_files[arch]
    index = GGUFIndex(path)
    name = index.architecture
    assert not any(f"{name}.{key}" in index.metadata for key in ("final_logit_softcapping", "logit_scale"))
    assert (OUTPUT_WEIGHT in index.tensors) == (arch == "qwen2")  # qwen2's file has its own output table
    ctx = own_context(arch, model_files)
    tokens = ctx.model.tokenize(PROMPT)
    assert ctx.set_hidden_output(True)
    prefill(ctx, tokens)
    n = len(tokens)
    assert ctx.hidden_rows(n).shape == (n, ctx.model.n_embd)
    last = int(ctx.output_rows()[0])
    assert last == n - 1  # with hidden output on, every input is an output
    logits = ctx.logits_rows(n)[last].copy()
    assert np.array_equal(ctx.hidden(n - 1), ctx.hidden_rows(n)[last])
    # The check can fail: the previous position's hidden state is far outside the bound.
    this_step, previous = excess(path, ctx.hidden_rows(n)[[last, last - 1]].copy(), logits)
    assert this_step <= 1.0
    assert previous > 3.0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_decode_step_with_hidden_output_on_gives_the_same_logits(arch, model_files):
    """One token, one output: the same graph computes the logits either way, plus a copy of
    the hidden state when on, so the logits are identical to the bit."""
    ctx = own_context(arch, model_files)
    tokens = ctx.model.tokenize(PROMPT)
    prefill(ctx, tokens[:-1])
    ctx.copy_sequence(0, 1)
    step = len(tokens) - 1
    ctx.decode_tokens([tokens[-1]], [step], [0], [True])
    off = ctx.logits(0).copy()
    assert ctx.set_hidden_output(True) and not ctx.set_hidden_output(True)
    ctx.decode_tokens([tokens[-1]], [step], [1], [True])
    assert np.array_equal(ctx.logits(0), off)
    assert np.isfinite(ctx.hidden(0)).all() and np.linalg.norm(ctx.hidden(0)) > 0
    assert ctx.set_hidden_output(False) and not ctx.set_hidden_output(False)
    ctx.decode_tokens([tokens[-1]], [step + 1], [1], [True])  # and off again, decoding goes on
    assert np.isfinite(ctx.logits(0)).all()


def test_output_rows_locate_each_prompt_when_every_token_becomes_an_output(model_files):
    ctx = own_context("llama", model_files)
    first = ctx.model.tokenize("Hello there, how are you?")
    second = ctx.model.tokenize("One two three")
    ctx.decode_prompts([first, second])
    assert ctx.output_rows().tolist() == [0, 1]
    expected = ctx.logits_rows(2).copy()
    ctx.clear()
    ctx.set_hidden_output(True)
    ctx.decode_prompts([first, second])
    rows = ctx.output_rows()
    assert rows.tolist() == [len(first) - 1, len(first) + len(second) - 1]
    got = ctx.logits_rows(len(first) + len(second))[rows]
    # The prompt computes its last layer for every token now (not only for the two outputs):
    # the same values up to summation order (1e-3 is the project's bound for that, runtime.py).
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_reading_a_hidden_state_that_was_not_computed_is_a_clear_error(model_files):
    ctx = own_context("llama", model_files)
    tokens = ctx.model.tokenize(PROMPT)
    prefill(ctx, tokens)
    with pytest.raises(DecodeError, match="hidden output is off"):
        ctx.hidden_rows(1)
    with pytest.raises(DecodeError, match="hidden output is off"):
        ctx.hidden(len(tokens) - 1)


def test_latent_steps_feed_the_aligned_hidden_state_and_read_the_next(model_files, tmp_path, monkeypatch):
    """Three latent steps on two sequences at once: the hidden state goes through the
    alignment, back in as an embedding row, and the next hidden state is read from that
    decode; afterwards the sequences continue with tokens."""
    monkeypatch.setenv("SELAR_CACHE_DIR", str(tmp_path))
    ctx = own_context("llama", model_files)
    alignment = load_alignment(ctx.model.path, n_hidden=ctx.model.n_embd)
    tokens = ctx.model.tokenize(PROMPT)
    n = len(tokens)
    ctx.decode_tokens(tokens * 2, list(range(n)) * 2, [0] * n + [1] * n, ([False] * (n - 1) + [True]) * 2)
    ctx.set_hidden_output(True)
    ctx.decode_tokens([tokens[-1]] * 2, [n, n], [0, 1], [True, True])  # one step to get hidden states
    previous = ctx.hidden_rows(2).copy()
    for step in range(3):
        rows = ctx.embedding_buffer(2)
        alignment.apply(ctx.hidden_rows(2), out=rows)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), alignment.fed_norm, rtol=1e-5)
        ctx.decode_embedding_buffer(2, [n + 1 + step] * 2, [0, 1], [True, True])
        assert ctx.output_rows().tolist() == [0, 1]
        hidden = ctx.hidden_rows(2)
        assert np.isfinite(hidden).all() and not np.array_equal(hidden, previous)
        np.testing.assert_allclose(hidden[0], hidden[1], rtol=0, atol=1e-3)  # the same inputs in both sequences
        previous = hidden.copy()
    assert ctx.sequence_length(0) == ctx.sequence_length(1) == n + 4
    ctx.set_hidden_output(False)
    ctx.decode_tokens([tokens[0]], [n + 4], [0], [True])
    assert np.isfinite(ctx.logits(0)).all()
