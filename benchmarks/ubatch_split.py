"""What llama.cpp's ubatch split costs one decode step (docs/PERFORMANCE.md, "Aggregate
throughput: one ubatch per step").

With one KV stream per sequence, llama.cpp puts only a run of consecutive, increasing seq_ids
into one ubatch; a batch in another order, or with gaps, is decoded in several. This decodes
one token for each of several live sequences, in several orders, with and without a unified
KV cache, and prints the median step time of each; then the generation loop with a gap in
its seq_ids, with `BatchGenerator(close_gaps=...)` off and on. Asserts nothing.

    python benchmarks/ubatch_split.py [--model smollm2-135m-instruct] [--reps 15]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local.registry import resolve_model  # noqa: E402
from selar_local.runtime import Runtime  # noqa: E402

ORDERS = (
    ("0..15", list(range(16))),
    ("12..15, 0..11", [12, 13, 14, 15] + list(range(12))),
    ("0, 2, .., 14, 1, 3, .., 15", list(range(0, 16, 2)) + list(range(1, 16, 2))),
    ("0..7", list(range(8))),
    ("0, 2, .., 14 (gaps)", list(range(0, 16, 2))),
)


def ubatches(seq_ids: list[int]) -> int:
    """How many ubatches llama_batch_allocr::split_equal makes (runs of consecutive ids)."""
    return 1 + sum(b != a + 1 for a, b in zip(seq_ids, seq_ids[1:]))


def step_times(model: str, unified: bool, reps: int) -> dict[str, float]:
    rt = Runtime(model, n_ctx=512, n_parallel=16, prompt_cache=False, n_threads=1, kv_unified=unified)
    ctx = rt.context
    try:
        prompt = rt.encode(messages=[{"role": "user", "content": "Write a poem about the sea."}])
        for seq in range(16):
            ctx.decode_tokens(prompt, range(len(prompt)), [seq] * len(prompt), [False] * (len(prompt) - 1) + [True])
        token, pos = int(ctx.logits(-1).argmax()), len(prompt)
        out = {}
        for name, seqs in ORDERS:
            times = []
            for _ in range(reps):
                for seq in seqs:
                    ctx.truncate_sequence(seq, pos)
                t0 = time.perf_counter()
                ctx.decode_tokens([token] * len(seqs), [pos] * len(seqs), seqs, [True] * len(seqs))
                times.append(time.perf_counter() - t0)
            out[name] = 1e3 * statistics.median(times)
        return out
    finally:
        rt.close()


def gap_closing(model: str, reps: int, n_ctx: int = 4096, steps: int = 24) -> dict[str, dict[str, float]]:
    """The generation loop with 16 requests of which every other one ends after 4 tokens:
    8 live sequences at seq_ids 0, 2, .., 14. Median ms per step after the gap appears,
    with `close_gaps` off (8 ubatches) and on (4 moves, then one ubatch), and the one step
    that pays for the moves (4 KV stream copies of n_ctx cells)."""
    from selar_local.generate import BatchGenerator
    from selar_local.params import DecodeParams

    rt = Runtime(model, n_ctx=n_ctx, n_parallel=16, prompt_cache=False, n_threads=1)
    out: dict[str, dict[str, list[float]]] = {"off": {"step": [], "first": []}, "on": {"step": [], "first": []}}
    try:
        prompt = rt.encode(messages=[{"role": "user", "content": "Write a poem about the sea."}])
        for rep in range(reps):
            for mode in (("off", "on") if rep % 2 == 0 else ("on", "off")):
                gen = BatchGenerator(rt, close_gaps=mode == "on")
                params = DecodeParams(method="cot", greedy=True, ignore_eos=True, max_tokens=64)
                for i in range(16):
                    gen.submit(prompt, params.replace(max_tokens=4 if i % 2 else 4 + 2 * steps))
                while len(gen.live_requests) > 8:
                    gen.step()
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    gen.step()
                    times.append(time.perf_counter() - t0)
                out[mode]["first"].append(times[0])
                out[mode]["step"].append(statistics.median(times[1:]))
                gen.close()
    finally:
        rt.close()
    return {mode: {k: 1e3 * statistics.median(v) for k, v in figures.items()} for mode, figures in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    model = str(resolve_model(args.model))
    split, unified = step_times(model, False, args.reps), step_times(model, True, args.reps)
    print(f"{os.path.basename(model)}, 1 thread, medians of {args.reps}\n")
    print("| live seq_ids, in batch order | ubatches | ms, one KV stream per sequence | ms, `--kv-unified` |")
    print("|---|---:|---:|---:|")
    for name, seqs in ORDERS:
        print(f"| {name} | {ubatches(seqs)} | {split[name]:.1f} | {unified[name]:.1f} |")
    gaps = gap_closing(model, max(3, args.reps // 5))
    print("\nThe generation loop, 8 live sequences left at seq_ids 0, 2, .., 14 (n_ctx 4096 per sequence; "
          "medians over alternating repetitions)\n")
    print("| close_gaps | ms per step afterwards | ms of the first step (the moves) |")
    print("|---|---:|---:|")
    for mode in ("off", "on"):
        print(f"| {mode} | {gaps[mode]['step']:.1f} | {gaps[mode]['first']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
