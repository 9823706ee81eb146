"""What llama.cpp's CPU weight repacking changes (docs/BENCHMARKS.md, "Batching").

For each model, with weights repacked (llama.cpp's default) and not (`cpu_repack=False`):
- how far sequence 0's logits move when three other prompts share its batch (after the
  prompt, and after one more token), max |difference|;
- decode tokens/s for one sequence and for 16 together (selar, greedy, 48 tokens each), and
  prompt tokens/s for a ~500-token prompt: medians of --reps alternating repetitions.
Asserts nothing.

    python benchmarks/cpu_repack.py [--models qwen2.5-coder-0.5b-instruct,gemma3-270m] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local.params import DecodeParams  # noqa: E402
from selar_local.registry import resolve_model  # noqa: E402
from selar_local.runtime import Runtime  # noqa: E402

QUESTIONS = ["What is 2 + 3?", "Name a prime number above 10.", "Spell cat.", "Why is the sky blue?"]


def batch_dependence(rt: Runtime) -> float:
    """Max |logit difference| of sequence 0 decoded alone and beside three others."""
    ctx = rt.context
    prompts = [rt.encode(messages=[{"role": "user", "content": q}]) for q in QUESTIONS]
    nxt = rt.encode("The")[-1]

    def first_rows(n: int) -> list[np.ndarray]:
        try:
            ctx.decode_prompts(prompts[:n])
            rows = [ctx.logits_rows(n)[0].copy()]
            ctx.decode_tokens([nxt] * n, [len(p) for p in prompts[:n]], range(n), [True] * n)
            return rows + [ctx.logits_rows(n)[0].copy()]
        finally:
            for s in range(n):
                ctx.remove_sequence(s)

    return max(float(np.abs(a - b).max()) for a, b in zip(first_rows(1), first_rows(len(prompts))))


def speeds(rt: Runtime) -> dict[str, float]:
    params = DecodeParams(method="selar", greedy=True, max_tokens=48, ignore_eos=True)
    prompts = [rt.encode(messages=[{"role": "user", "content": f"What is {i} + {2 * i}? Explain."}]) for i in range(16)]
    long = rt.encode("Count the words. " + "one two three four five six seven eight " * 60)
    one = rt.generate_batch(prompts[:1], params)[0]
    started = time.perf_counter()
    many = rt.generate_batch(prompts, params)
    wall = time.perf_counter() - started
    prefill = rt.generate_batch([long], params.replace(max_tokens=1))[0]
    return {"1 sequence, tokens/s": len(one.tokens) / one.decode_seconds,
            "16 sequences, tokens/s": sum(len(r.tokens) for r in many) / wall,
            "prompt tokens/s": len(long) / prefill.prefill_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-coder-0.5b-instruct,gemma3-270m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print("| model | weights | max logit change beside 3 other sequences | 1 sequence, tokens/s | "
          "16 sequences, tokens/s | prompt tokens/s |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        path = resolve_model(name)
        runtimes = {repack: Runtime(path, n_ctx=1024, n_parallel=16, n_threads=args.threads, prompt_cache=False,
                                    cpu_repack=repack) for repack in (True, False)}
        try:
            change = {repack: batch_dependence(rt) for repack, rt in runtimes.items()}
            samples: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
            for rep in range(args.reps):  # alternate which goes first: the machine is shared
                for repack in ((True, False) if rep % 2 == 0 else (False, True)):
                    for key, value in speeds(runtimes[repack]).items():
                        samples[repack].setdefault(key, []).append(value)
            for repack in (True, False):
                med = {k: statistics.median(v) for k, v in samples[repack].items()}
                print(f"| {path.name} | {'repacked (default)' if repack else 'plain (cpu_repack=False)'} | "
                      f"{change[repack]:.3g} | " + " | ".join(f"{v:.1f}" for v in med.values()) + " |")
        finally:
            for rt in runtimes.values():
                rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
