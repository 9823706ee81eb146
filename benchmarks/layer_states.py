"""What reading the residual stream and switching a control vector cost (docs/BENCHMARKS.md,
"Steering: reading layers, switching control vectors").

Per model: the time to prefill one chat prompt (a GSM8K-train-sized question, the steering
extraction's unit of work) in a plain context, in LayerStates' context (cb_eval: one Python
call per graph node, a copy of each l_out row) and with llama-ext.h's layer inputs enabled for
every layer (architectures that record them only); then the time of one decode step without a
control vector, of the first step after setting one (llama.cpp re-reserves its graph), and of
the steps after. Medians of --reps alternating repetitions; asserts nothing.

    python benchmarks/layer_states.py [--models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local.engine import (LAYER_INPUT_ARCHITECTURES, LayerStates, LlamaContext, LlamaModel,  # noqa: E402
                                enable_layer_inputs, model_layer_count, set_control_vector)
from selar_local.registry import resolve_model  # noqa: E402

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
            "friends in May. How many clips did Natalia sell altogether in April and May? Think step by step.")


def _prefill(ctx: LlamaContext, tokens: list[int]) -> float:
    ctx.clear()
    n = len(tokens)
    start = time.perf_counter()
    ctx.decode_tokens(tokens, range(n), [0] * n, [False] * (n - 1) + [True])
    return time.perf_counter() - start


def _step(ctx: LlamaContext, token: int, pos: int) -> float:
    start = time.perf_counter()
    ctx.decode_tokens([token], [pos], [0], [True])
    return time.perf_counter() - start


def measure(name: str, reps: int) -> dict:
    model = LlamaModel(resolve_model(name))
    tokens = model.tokenize(QUESTION)
    kwargs = dict(n_ctx=512, n_batch=512, n_threads=1, n_threads_batch=1)
    plain = LlamaContext(model, **kwargs)
    states = LayerStates(model, n_ctx=512, n_threads=1, n_threads_batch=1)
    n_layer = model_layer_count(model)
    inputs = None
    if model.architecture in LAYER_INPUT_ARCHITECTURES:
        inputs = LlamaContext(model, **kwargs)
        enable_layer_inputs(inputs, range(n_layer))
    times: dict[str, list[float]] = {"plain": [], "cb_eval": [], "layer_inp": []}
    for _ in range(reps):
        times["plain"].append(_prefill(plain, tokens))
        states._seen[:] = False
        times["cb_eval"].append(_prefill(states.context, tokens))
        if inputs is not None:
            times["layer_inp"].append(_prefill(inputs, tokens))
    steer = np.random.default_rng(0).standard_normal((n_layer, model.n_embd)).astype(np.float32) * 0.01
    steer[0] = 0
    step, first, after = [], [], []
    for _ in range(reps):
        _prefill(plain, tokens)
        pos = len(tokens)
        step += [_step(plain, tokens[-1], pos + i) for i in range(3)]
        set_control_vector(plain, steer)
        first.append(_step(plain, tokens[-1], pos + 3))
        after += [_step(plain, tokens[-1], pos + 4 + i) for i in range(3)]
        set_control_vector(plain, None)
    row = {"model": name, "prompt_tokens": len(tokens), "n_layer": n_layer}
    row.update({f"prefill_{k}_ms": round(1000 * statistics.median(v), 1) for k, v in times.items() if v})
    row.update(step_ms=round(1000 * statistics.median(step), 2), first_step_after_switch_ms=round(
        1000 * statistics.median(first), 2), steps_after_switch_ms=round(1000 * statistics.median(after), 2))
    for ctx in (plain, states, inputs):
        if ctx is not None:
            ctx.close()
    model.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rows = [measure(name, args.reps) for name in args.models.split(",")]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "-")) for k in keys) + " |")


if __name__ == "__main__":
    main()
