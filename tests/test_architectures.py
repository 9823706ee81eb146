"""Soft decoding on architectures beyond the three test models, on tiny random-weight
GGUFs (scripts/tiny_models.py): M-RoPE models get the 4-plane positions llama.cpp reads
for embedding inputs, and a hybrid recurrent model keeps per-sequence state that can be
removed and copied. Random weights suffice: feeding E[v] must reproduce token v's logits
whatever the weights."""
from __future__ import annotations

import pytest

from selar_local.params import DecodeParams


@pytest.fixture(scope="module", params=["qwen2vl", "qwen3vl"])
def mrope_runtime(request, tiny_model):
    from selar_local.runtime import Runtime

    runtime = Runtime(tiny_model(request.param), n_ctx=256, n_parallel=2, n_threads=1)
    yield runtime
    runtime.close()


def test_mrope_embedding_input_reproduces_token_logits(mrope_runtime):
    assert mrope_runtime.model.n_pos_per_embd == 4
    check = mrope_runtime.self_check
    assert check.passed and check.max_abs_diff == 0.0, check.detail


def test_mrope_soft_steps_batched_equal_alone(mrope_runtime):
    """Two sequences in one embedding batch (planes of n = 2 entries each) decode exactly
    as each does alone: the position layout is right for n > 1, not only for one token."""
    prompts = [mrope_runtime.encode("One two three"), mrope_runtime.encode("The answer is")]
    params = DecodeParams(method="selar", tau=0.0, greedy=True, max_tokens=8, ignore_eos=True)
    together = mrope_runtime.generate_batch(prompts, params)
    alone = [mrope_runtime.generate_batch([p], params)[0] for p in prompts]
    assert all(r.soft_steps > 0 for r in together)
    assert [r.tokens for r in together] == [r.tokens for r in alone]


def test_hybrid_recurrent_sequences_can_be_removed_and_copied(tiny_model):
    import tiny_models

    from selar_local.runtime import Runtime

    runtime = Runtime(tiny_model("lfm2"), n_ctx=256, n_parallel=2, n_threads=1)
    try:
        assert runtime.model.is_hybrid and runtime.self_check.passed
        assert tiny_models._sequence_state_check(runtime) == "remove ok, copy ok"
        # one state per sequence, not per position: a tail cannot be dropped, the whole
        # sequence goes (and the engine says so)
        ctx = runtime.context
        ctx.decode_tokens([1, 2, 3], [0, 1, 2], [0, 0, 0], [False, False, True])
        assert ctx.truncate_sequence(0, 1) is False and ctx.sequence_length(0) == 0
        result = runtime.generate("The answer is", DecodeParams(method="selar", tau=0.0, max_tokens=6, ignore_eos=True))
        assert result.soft_steps > 0
    finally:
        runtime.close()
