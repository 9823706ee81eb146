"""Serving without stalls, on a real model (SmolLM2-135M): chunked prefill beside live
streams, the prompt cache, shared prefixes, the unified KV cache option."""
from __future__ import annotations

from conftest import runtime_for
from decode_compare import assert_same_greedy_decode
from selar_local.generate import BatchGenerator
from selar_local.params import DecodeParams

CHAT = [{"role": "user", "content": "Name three colors and say why you like them."}]
LONG = [{"role": "user", "content": " ".join(f"Fact {i}: the lighthouse keeper logged ship {i}." for i in range(40))
         + " Which ship came first?"}]
# logprobs: the top two of every step, to tell a near-tie from a difference (decode_compare.py)
GREEDY = DecodeParams(method="cot", greedy=True, max_tokens=12, logprobs=2)


def test_a_new_prompt_is_prefilled_in_chunks_while_a_stream_goes_on(model_files):
    """A live stream emits a token at every step while a long prompt arrives (fed 64
    tokens per step beside it, in the same decode); both give exactly their tokens alone."""
    rt = runtime_for("llama", model_files, n_parallel=2, prefill_chunk=64, prompt_cache=False)
    short, long = rt.encode(messages=CHAT), rt.encode(messages=LONG)
    assert len(long) > 8 * 64
    a_params = GREEDY.replace(max_tokens=24, ignore_eos=True)
    alone = [rt.generate_batch([p], q)[0] for p, q in ((short, a_params), (long, GREEDY))]
    gen = BatchGenerator(rt)
    a, _ = gen.submit(short, a_params)
    while not gen.step():
        pass  # A's prompt (no one else live: whole batches)
    b, _ = gen.submit(long, GREEDY)
    steps_until_b = 0
    tokens = {a: [], b: []}
    while not tokens[b]:
        events = gen.step()
        steps_until_b += 1
        assert a in [e.request_id for e in events]  # A never waits for B's prompt
        for e in events:
            tokens[e.request_id].append(e.token)
    assert steps_until_b == -(-len(long) // 64)  # one chunk per step, the last one gives B's first token
    while gen.live_requests:
        for e in gen.step():
            if not e.finish_reason or e.request_id == a:
                tokens[e.request_id].append(e.token)
    assert_same_greedy_decode(gen.pop_result(b), alone[1])
    assert_same_greedy_decode(gen.pop_result(a), alone[0])


def test_the_next_turn_reuses_the_cached_history(model_files):
    rt = runtime_for("llama", model_files)
    cold = runtime_for("llama", model_files, prompt_cache=False)
    first = rt.generate(messages=CHAT, params=GREEDY)
    turn2 = CHAT + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a fourth?"}]
    warm = rt.generate(messages=turn2, params=GREEDY)
    reference = cold.generate(messages=turn2, params=GREEDY)
    assert_same_greedy_decode(warm, reference)
    assert reference.cached_tokens == 0
    turn1_prompt = rt.encode(messages=CHAT)
    assert warm.cached_tokens >= len(turn1_prompt)  # the whole first prompt and part of the answer
    again = rt.generate(messages=turn2, params=GREEDY)  # the same prompt again: no prefill at all
    assert again.cached_tokens == again.prompt_tokens
    assert_same_greedy_decode(again, warm)


def test_the_cache_ends_before_the_first_soft_input(model_files):
    """Cells computed from a soft input are not reusable: a slot keeps its prompt and the
    discrete inputs fed before the first soft one, and no cells past them."""
    rt = runtime_for("llama", model_files)
    prompt = rt.encode(messages=CHAT)
    result = rt.generate_batch([prompt], DecodeParams(method="selar", tau=0.3, max_tokens=40, seed=3))[0]
    assert any(result.soft_flags), "this setting should give soft steps"
    first_soft = result.soft_flags.index(True)
    slot = rt.slots.slots[0]
    assert slot.tokens == prompt + result.tokens[:first_soft + 1][:first_soft]
    assert rt.context.sequence_length(0) == len(slot.tokens)


def test_several_seeds_of_one_prompt_prefill_it_once(model_files):
    """generate_batch with one prompt and four seeds: the first prefills it, the others
    copy its cells and logits; each gives exactly its tokens alone."""
    rt1 = runtime_for("llama", model_files, prompt_cache=False)
    rt4 = runtime_for("llama", model_files, n_parallel=4)
    prompt = rt1.encode(messages=CHAT)
    params = [DecodeParams(method="selar", seed=s, max_tokens=16) for s in (1, 2, 3, 4)]
    alone = [rt1.generate_batch([prompt], p)[0] for p in params]
    rt4.slots.forget_free()
    together = rt4.generate_batch([prompt] * 4, params)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert sorted(r.cached_tokens for r in together) == [0] + [len(prompt)] * 3


def test_unified_kv_cache_lets_one_long_request_use_more_cells(model_files):
    """Three slots of 256 cells, unified: one request may hold more than 256 cells, and
    decodes exactly as in a context of 768 cells for one sequence."""
    unified = runtime_for("llama", model_files, n_ctx=256, n_parallel=3, kv_unified=True)
    single = runtime_for("llama", model_files, n_ctx=768)
    assert unified.context.n_ctx == 768
    prompt = single.encode(messages=LONG)
    assert 256 < len(prompt) + 12 < 768
    assert_same_greedy_decode(unified.generate_batch([prompt], GREEDY)[0], single.generate_batch([prompt], GREEDY)[0])


def test_live_inputs_reach_llama_cpp_in_seq_id_order(model_files):
    """With one KV stream per sequence llama.cpp decodes each run of consecutive seq_ids
    as its own ubatch, so the live inputs go in ascending seq_id order whatever order the
    requests came in, and a new request takes the lowest empty slot (filling gaps)."""
    rt = runtime_for("llama", model_files, n_parallel=4, prompt_cache=False)
    prompt = rt.encode(messages=CHAT)
    gen = BatchGenerator(rt, close_gaps=False)  # the gap at 2 stays (see the next test)
    params = DecodeParams(method="selar", seed=1, max_tokens=40, ignore_eos=True)
    first = [gen.submit(prompt, params.replace(seed=i))[0] for i in range(4)]
    while any(gen._live[r].pending is None for r in first):  # noqa: SLF001 - until all four decode
        gen.step()
    slots = {r: gen._live[r].seq_id for r in first}  # noqa: SLF001
    assert sorted(slots.values()) == [0, 1, 2, 3]
    gen.cancel(first[2]), gen.cancel(first[0])  # free seq_ids 0 and 2 (in that order)
    late = gen.submit(prompt, params.replace(seed=9))[0]
    assert gen._live[late].seq_id == 0  # noqa: SLF001 - the lowest empty slot, not the last freed
    batches = []
    ctx = rt.context
    real_tokens, real_embeddings = ctx.decode_tokens, ctx.decode_embedding_buffer
    ctx.decode_tokens = lambda tokens, positions, seq_ids, want: (
        batches.append(list(seq_ids)), real_tokens(tokens, positions, seq_ids, want))
    ctx.decode_embedding_buffer = lambda n, positions, seq_ids, want: (
        batches.append(list(seq_ids)), real_embeddings(n, positions, seq_ids, want))
    try:
        for _ in range(8):
            gen.step()
    finally:
        del ctx.decode_tokens, ctx.decode_embedding_buffer
    live_batches = [b for b in batches if len(b) == len(set(b)) == 3]
    assert live_batches and all(b == [0, 1, 3] for b in live_batches)  # not admission order [1, 3, 0]
    gen.close()


def _spy_batches(ctx, batches: list):
    real_tokens, real_embeddings = ctx.decode_tokens, ctx.decode_embedding_buffer
    ctx.decode_tokens = lambda tokens, positions, seq_ids, want: (
        batches.append(list(seq_ids)), real_tokens(tokens, positions, seq_ids, want))
    ctx.decode_embedding_buffer = lambda n, positions, seq_ids, want: (
        batches.append(list(seq_ids)), real_embeddings(n, positions, seq_ids, want))


def _gap_run(rt, close_gaps: bool, method: str = "selar"):
    """Four sequences; the one in slot 1 ends early: three decode on with a gap at 1."""
    prompt = rt.encode(messages=CHAT)
    gen = BatchGenerator(rt, close_gaps=close_gaps)
    base = DecodeParams(method=method, max_tokens=24, ignore_eos=True)
    ids = [gen.submit(prompt, base.replace(seed=i, max_tokens=4 if i == 1 else 24))[0] for i in range(4)]
    batches: list = []
    _spy_batches(rt.context, batches)
    tokens: dict = {}
    try:
        while gen.live_requests:
            for event in gen.step():
                tokens.setdefault(event.request_id, []).append(event.token)
    finally:
        del rt.context.decode_tokens, rt.context.decode_embedding_buffer
    return gen, ids, tokens, batches


def test_a_gap_in_the_live_seq_ids_is_closed_by_moving_a_sequence_and_changes_no_token(model_files):
    """A finished request leaves a hole in the seq_ids (an extra ubatch every step with one
    KV stream per sequence); the highest live sequence moves into it (its KV stream copied)
    and decodes on with exactly the tokens it would have had."""
    rt = runtime_for("llama", model_files, n_parallel=4, prompt_cache=False)
    _, ids, kept, kept_batches = _gap_run(rt, close_gaps=False)
    gen, ids2, moved, moved_batches = _gap_run(rt, close_gaps=True)
    assert moved == kept  # every request's tokens, the moved one's included
    three = [b for b in kept_batches if len(b) == len(set(b)) == 3]
    assert three and all(b == [0, 2, 3] for b in three)
    three = [b for b in moved_batches if len(b) == len(set(b)) == 3]
    assert three and all(b == [0, 1, 2] for b in three)
    assert gen.kv_cells_in_use() == 0


def test_a_moved_sequence_leaves_its_cells_as_prompt_cache(model_files):
    """With the prompt cache on, a move prefers an empty slot to one holding a cache (the
    cancelled request's cells stay reusable), and the mover's old slot becomes a cache of
    the prompt and the tokens decoded so far, matching llama.cpp's cell count."""
    rt = runtime_for("llama", model_files, n_parallel=4)  # prompt cache on
    prompt = rt.encode(messages=CHAT)
    gen = BatchGenerator(rt)
    params = DecodeParams(method="cot", max_tokens=30, ignore_eos=True)
    ids = [gen.submit(prompt, params.replace(seed=i))[0] for i in range(3)]
    while any(gen._live[r].pending is None for r in ids):  # noqa: SLF001
        gen.step()
    for _ in range(3):  # a few decoded tokens beyond the prompt
        gen.step()
    gen.cancel(ids[1])  # slot 1: free, caching the cancelled request's cells
    cancelled_cache = list(gen.slots.slots[1].tokens)
    live = [gen._live[ids[0]], gen._live[ids[2]]]  # noqa: SLF001
    before = [s.slot for s in live]
    gen.step()
    assert sorted(s.seq_id for s in live) == [2, 3]  # 0 -> 3 (empty), not 2 -> 1 (a cache)
    assert gen.slots.slots[1].tokens == cancelled_cache
    mover = live[0]
    old_slot = before[0]
    assert old_slot.seq_id == 0 and not old_slot.busy
    cached = list(old_slot.tokens)
    assert cached[:len(prompt)] == prompt and len(cached) > len(prompt)  # the prompt and the tokens so far
    assert rt.context.sequence_length(old_slot.seq_id) == len(cached)
    assert mover.slot.tokens[:len(cached)] == cached
    gen.close()
    assert gen.kv_cells_in_use() == 0
