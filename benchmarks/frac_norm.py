"""How llama.cpp's additive control vector compares with Fractional Reasoning's norm-preserving
update, and how far each scaling of alpha moves the model (docs/BENCHMARKS.md, "Fractional
Reasoning's alpha").

The paper's code steers each layer's MLP output x to unit(unit(x) + alpha unit(v)) |x|: a layer's
update keeps its size. llama.cpp adds c = alpha T unit(v) to the layer's output and stops there,
so the layer's update u becomes u + c. With the control vector applied (steering built from
--pairs GSM8K train pairs), every layer's output is read at the last token of --prompts GSM8K
*test* questions, and per alpha this prints:

- gap: | |u + c| / |u| - 1 | over layers 1..n-1 and prompts (median, max), u the layer's own
  update given the steered layers below: how far the additive update is from a size-keeping one;
- drift: |h(alpha) - h(0)| / |h(0)| of the last layer's output (median over prompts): how far the
  steering has moved what the output layer reads, summed over all layers.

Two scalings of T: `update`, the runtime's (T = the typical size of the layer's update, as in the
paper's code), and `output` (T = the typical norm of the layer's output, the residual stream:
steering files of version 1), so the two can be compared in one run. Asserts nothing.

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


def read_all(states: LayerStates, prompts, rows) -> np.ndarray:
    set_control_vector(states.context, rows)
    return np.stack([states.read(tokens).astype(np.float64) for tokens in prompts])


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
    plain = read_all(states, prompts, None)  # (prompts, n_layer, n_embd)
    output_norms = np.median(np.linalg.norm(plain, axis=2), axis=0).astype(np.float32)
    scalings = {"update": built, "output": steering.SteeringVectors(
        built.model_sha256, built.model_file, built.vectors, output_norms, built.n_pairs, built.questions_file)}
    print(f"{args.model}: steering from {built.n_pairs} pairs, {len(prompts)} GSM8K test prompts, {states.n_layer} layers")
    print("| scaling | alpha | gap median | gap max | drift of the last layer (median) |")
    print("|---|---|---|---|---|")
    rows = []
    for name, sv in scalings.items():
        for alpha in (float(a) for a in args.alphas.split(",")):
            c = steering.control_vector(sv, alpha).astype(np.float64)
            steered = read_all(states, prompts, c)
            update = steered[:, 1:] - c[None, 1:] - steered[:, :-1]  # layer il's own update, il >= 1
            gaps = np.abs(np.linalg.norm(update + c[None, 1:], axis=2) / np.linalg.norm(update, axis=2) - 1)
            drift = np.linalg.norm(steered[:, -1] - plain[:, -1], axis=1) / np.linalg.norm(plain[:, -1], axis=1)
            rows.append(dict(scaling=name, alpha=alpha, gap_median=float(np.median(gaps)), gap_max=float(gaps.max()),
                             drift_median=float(np.median(drift))))
            print(f"| {name} | {alpha} | {np.median(gaps):.4f} | {gaps.max():.4f} | {np.median(drift):.3f} |")
    print(json.dumps(rows))
    states.close()
    rt.close()


if __name__ == "__main__":
    main()
