"""What llama.cpp's ubatch split costs one decode step (docs/PERFORMANCE.md, "Aggregate
throughput: one ubatch per step").

With one KV stream per sequence, llama.cpp puts only a run of consecutive, increasing seq_ids
into one ubatch; a batch in another order, or with gaps, is decoded in several. This decodes
one token for each of several live sequences, in several orders, with and without a unified
KV cache, and prints the median step time of each. Asserts nothing.

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
