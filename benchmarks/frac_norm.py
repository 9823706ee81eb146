"""How close llama.cpp's additive control vector is to Fractional Reasoning's norm-preserving
update (docs/BENCHMARKS.md, "Steering: additive against norm-preserving").

The paper replaces a layer's output h by (h + alpha v) * |h| / |h + alpha v|; llama.cpp adds
alpha v and stops there. Both point the same way, so they differ by the factor |h + alpha v| / |h|
alone. With the control vector applied (steering built from --pairs GSM8K train pairs), each
layer's output is read at the last token of --prompts GSM8K *test* questions; h is that output
minus the layer's row (its value before the add, given the steered layers below). Printed per
alpha: the median and the largest | |h + alpha v| / |h| - 1 | over layers and prompts, and the
layer where it is largest. Asserts nothing.

    SELAR_CACHE_DIR=... python benchmarks/frac_norm.py --model smollm2-135m-instruct [--pairs 16] [--prompts 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local import steering  # noqa: E402
from selar_local.bench.datasets import load_problems  # noqa: E402
from selar_local.engine import LayerStates, set_control_vector  # noqa: E402
from selar_local.registry import resolve_model  # noqa: E402
from selar_local.runtime import Runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--alphas", default="0.05,0.1,0.15,0.3")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for prompts and decode steps (default: the runtime's)")
    args = parser.parse_args()
    rt = Runtime(resolve_model(args.model), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads)
    built = steering.build(rt, n_pairs=args.pairs)
    states = LayerStates(rt.model, n_ctx=1024, n_threads=rt.context.n_threads,
                         n_threads_batch=rt.context.n_threads_batch)
    prompts = [rt.encode(messages=[{"role": "user", "content": p.prompt}])
               for p in load_problems("gsm8k", limit=args.prompts)]
    print(f"{args.model}: steering from {built.n_pairs} pairs, {len(prompts)} GSM8K test prompts, {states.n_layer} layers")
    print("| alpha | median \\|\\|h+c\\|/\\|h\\| - 1\\| | max | layer of max |")
    print("|---|---|---|---|")
    rows = []
    for alpha in (float(a) for a in args.alphas.split(",")):
        rows_c = steering.control_vector(built, alpha)
        set_control_vector(states.context, rows_c)
        gaps = []
        for tokens in prompts:
            steered = states.read(tokens).astype(np.float64)
            before = steered - rows_c
            gaps.append(np.abs(np.linalg.norm(steered, axis=1) / np.linalg.norm(before, axis=1) - 1)[1:])
        gaps = np.stack(gaps)
        layer = int(np.unravel_index(np.argmax(gaps), gaps.shape)[1]) + 1
        rows.append(dict(alpha=alpha, median=float(np.median(gaps)), max=float(gaps.max()), layer=layer))
        print(f"| {alpha} | {np.median(gaps):.4f} | {gaps.max():.4f} | {layer} |")
    print(json.dumps(rows))
    states.close()
    rt.close()


if __name__ == "__main__":
    main()
