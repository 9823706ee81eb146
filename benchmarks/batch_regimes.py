"""Whether a sequence's logits depend on how many tokens share its decode step, with plain CPU
kernels (`cpu_repack=False`, the bench's default; docs/BENCHMARKS.md, "Batching").

Sequence 0 (a short chat prompt) is prefilled alone, then decodes one token in a step beside
0..15 other sequences (each prefilled alone first); its logits are compared with the same step
decoded alone and beside 7 others (a step of 8 tokens). Prints max |difference| per step size.
Asserts nothing.

    python benchmarks/batch_regimes.py [--models qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local.registry import resolve_model  # noqa: E402
from selar_local.runtime import Runtime  # noqa: E402


def step_logits(rt: Runtime, prompt: list[int], filler: list[int], others: int, token: int) -> np.ndarray:
    """Sequence 0's logits for `token` decoded in one step with `others` more sequences."""
    ctx = rt.context
    prompts = [prompt] + [filler] * others
    try:
        for seq, p in enumerate(prompts):  # each prompt alone: the prefill is the same every time
            ctx.decode_tokens(p, list(range(len(p))), [seq] * len(p), [False] * (len(p) - 1) + [True])
        ctx.decode_tokens([token] * len(prompts), [len(p) for p in prompts], range(len(prompts)),
                          [True] * len(prompts))
        return ctx.logits_rows(len(prompts))[0].copy()
    finally:
        for seq in range(len(prompts)):
            ctx.remove_sequence(seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sizes = (1, 2, 4, 7, 8, 9, 12, 16)
    print("| model | " + " | ".join(f"{n} tokens" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in args.models.split(","):
        rt = Runtime(resolve_model(name), n_ctx=512, n_parallel=16, n_threads=args.threads,
                     prompt_cache=False, cpu_repack=False)
        try:
            prompt = rt.encode(messages=[{"role": "user", "content": "What is 2 + 3?"}])
            filler = rt.encode("word " * 40)[:30]
            token = rt.encode("The")[-1]
            alone = step_logits(rt, prompt, filler, 0, token)
            eight = step_logits(rt, prompt, filler, 7, token)
            cells = []
            for n in sizes:
                got = step_logits(rt, prompt, filler, n - 1, token)
                cells.append(f"{np.abs(got - alone).max():.3g} / {np.abs(got - eight).max():.3g}")
            print(f"| {os.path.basename(rt.model.path)} | " + " | ".join(cells) + " |")
        finally:
            rt.close()
    print("\neach cell: max |logit difference| against the step decoded alone / beside 7 others")


if __name__ == "__main__":
    main()
