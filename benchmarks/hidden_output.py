"""What reading the final hidden state costs (docs/PERFORMANCE.md, "The hidden state beside
the logits"): LlamaContext.set_hidden_output turns llama.cpp's embeddings output on.

Two costs, both measured in one run and interleaved so that load on a shared machine falls
on every variant alike:
- a switch: the decode step right after set_hidden_output changes the setting (llama.cpp
  builds another graph) against a step with the setting unchanged, on and off;
- a prompt: with hidden output on, llama.cpp makes every input an output, so a prefill
  computes the output layer (and keeps logits) for every prompt token, against the usual
  last-token-only prefill.

    nice -n 10 python benchmarks/hidden_output.py [--model smollm2-135m-instruct ...] [--reps 15] [--prompt 512]

Prints medians (ms) and the ratios of medians; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local.engine import LlamaContext, LlamaModel, default_threads  # noqa: E402
from selar_local.registry import resolve_model  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog while the farmer counts his seventeen sheep "
        "and the river runs past the old mill towards the sea. ")


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def measure(model_name: str, reps: int, prompt_tokens: int, n_threads: int) -> dict[str, float]:
    model = LlamaModel(resolve_model(model_name))
    ctx = LlamaContext(model, n_ctx=prompt_tokens + 64, n_batch=prompt_tokens, n_seq_max=1, n_threads=n_threads)
    try:
        tokens = (model.tokenize(TEXT * (prompt_tokens // 8 + 1)))[:prompt_tokens]
        n = len(tokens)
        step_token, pos = tokens[-1], n

        def prefill(hidden: bool) -> float:
            ctx.set_hidden_output(hidden)
            ctx.clear()
            t0 = time.perf_counter()
            ctx.decode_tokens(tokens, range(n), [0] * n, [False] * (n - 1) + [True])
            return time.perf_counter() - t0

        def step(hidden: bool) -> tuple[float, bool]:
            ctx.truncate_sequence(0, pos)
            switched = ctx.set_hidden_output(hidden)
            t0 = time.perf_counter()
            ctx.decode_tokens([step_token], [pos], [0], [True])
            elapsed = time.perf_counter() - t0
            return elapsed, switched

        prefill(False)
        times: dict[str, list[float]] = {k: [] for k in ("step off", "step on", "switch to on", "switch to off",
                                                           "prompt off", "prompt on")}
        for _ in range(reps):
            for hidden in (False, True):  # the steady state: two steps, keep the second
                step(hidden)
                elapsed, switched = step(hidden)
                assert not switched
                times["step on" if hidden else "step off"].append(elapsed)
            for hidden in (False, True):  # each step right after a switch (the state is on here)
                elapsed, switched = step(hidden)
                assert switched
                times["switch to on" if hidden else "switch to off"].append(elapsed)
        for _ in range(max(3, reps // 3)):
            for hidden in (False, True):
                prefill(hidden)  # the switch (if any) and a warm-up, untimed
                times["prompt on" if hidden else "prompt off"].append(prefill(hidden))
        return {k: median_ms(v) for k, v in times.items()} | {"prompt tokens": n}
    finally:
        ctx.close()
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="registry name or .gguf (repeatable)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens for the prefill comparison")
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()
    models = args.model or ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; decode threads {args.threads}")
    print("| model | step off ms | step on ms | step after switch on / off ms | switch cost (x a step) "
          "| prompt off ms | prompt on ms | prompt on / off |")
    print("|---|---|---|---|---|---|---|---|")
    for name in models:
        r = measure(name, args.reps, args.prompt, args.threads)
        switch_ratio = (r["switch to on"] / r["step on"] + r["switch to off"] / r["step off"]) / 2
        print(f"| {name} | {r['step off']:.2f} | {r['step on']:.2f} | {r['switch to on']:.2f} / "
              f"{r['switch to off']:.2f} | {switch_ratio:.2f} | {r['prompt off']:.0f} ({r['prompt tokens']} tok) "
              f"| {r['prompt on']:.0f} | {r['prompt on'] / r['prompt off']:.2f} |")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
